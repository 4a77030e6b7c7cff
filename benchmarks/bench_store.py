"""Benchmark of the store's integrity and concurrency costs (printed, not asserted).

- verify on open: first open of an activation artifact (sizes + sha256 of every file) and a
  second open in the same process (sizes + stat signature only), against reading the tensors;
- publishing under the key lock: seconds per small artifact with and without contention;
- JSONL appends under the file lock: records per second.

Usage: python benchmarks/bench_store.py [--images 50000] [--neurons 2048]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def bench_verify(root: Path, n_images: int, n_neurons: int) -> None:
    import torch
    from safetensors.torch import load_file

    from nd_utils.store import ArtifactStore, save_tensors

    store = ArtifactStore(root)
    acts = torch.randn(n_images, n_neurons)
    with store.writer("bench", "acts") as tmp:
        save_tensors({"activations": acts}, tmp / "activations.safetensors")
    del acts
    mb = (store.path("bench", "acts") / "activations.safetensors").stat().st_size / 2**20
    t0 = time.perf_counter()
    art = store.open("bench", "acts")
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.open("bench", "acts")
    again = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_file(str(art.file("activations.safetensors")))["activations"].sum()
    read = time.perf_counter() - t0
    print(f"verify on open, {n_images} x {n_neurons} float32 ({mb:.0f} MB):")
    print(f"  first open (sizes + sha256)      {first:8.3f} s  ({mb / first:.0f} MB/s)")
    print(f"  later opens (sizes + stat)       {again * 1e3:8.3f} ms")
    print(f"  reading the tensor (for scale)   {read:8.3f} s;  first open / read = "
          f"{first / read:.2f}x")


def bench_publish(root: Path, n: int = 200) -> None:
    from nd_utils.store import ArtifactStore

    store = ArtifactStore(root)
    t0 = time.perf_counter()
    for i in range(n):
        with store.writer("small", f"k{i}") as tmp:
            (tmp / "x.txt").write_text(str(i))
    per = (time.perf_counter() - t0) / n
    print(f"publish a one-file artifact under its lock: {per * 1e3:.1f} ms each ({n} keys)")


def bench_jsonl(root: Path, n: int = 2000) -> None:
    from nd_utils.jsonl_cache import JsonlCache

    cache = JsonlCache(root / "answers.jsonl")
    t0 = time.perf_counter()
    for i in range(n):
        req = {"i": i, "prompt": "describe the common concept " * 5}
        cache.put(cache.key(req), req, f"answer {i}")
    sec = time.perf_counter() - t0
    t0 = time.perf_counter()
    fresh = JsonlCache(root / "answers.jsonl")
    assert len(fresh) == n
    load = time.perf_counter() - t0
    print(f"JSONL appends under the file lock (fsync each): {n / sec:.0f} records/s; "
          f"loading {n} records: {load * 1e3:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--neurons", type=int, default=2048)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nd-bench-store-") as d:
        bench_verify(Path(d), args.images, args.neurons)
        bench_publish(Path(d))
        bench_jsonl(Path(d))


if __name__ == "__main__":
    main()
