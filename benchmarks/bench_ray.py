"""Benchmark of the executors: DnD neurons per minute in-process and on 1 and 2 Ray workers.

Offline profile, stages 03-06 (top images, captions, SmolLM2 concepts, retrieval synthesis,
selection) for `--neurons` units of each of `--layers`, cold: every mode starts from the same
fresh store holding only stage 01 and the retrieval pool's image features (computed once first,
not timed), at the same path, so the
outputs can be compared byte for byte. Each mode runs in its own process; the Ray modes start a
local instance with 1 or 2 CPUs (`executor.num_cpus`), and their time includes that start and
every worker's model loads. Prints seconds, neurons per minute, the speed-up over 1 worker, and
whether each mode's outputs equal those of the 1-worker run (same keys, same file hashes).

Usage: python benchmarks/bench_ray.py [--neurons 4] [--layers head,fc] [--modes local,ray1,ray2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {"local": ["executor.name=local"],                       # all cores, torch's default
         "local1": ["executor.name=local", "executor.threads=1"],  # one thread, as a Ray task
         "ray1": ["executor.name=ray", "executor.num_cpus=1", "executor.threads=1"],
         "ray2": ["executor.name=ray", "executor.num_cpus=2", "executor.threads=1"]}


def overrides(store: Path, neurons: int, layers: list[str]) -> list[str]:
    return [f"data_dir={store}", f"dnd.layers=[{', '.join(layers)}]", f"dnd.neurons={neurons}"]


def run_mode(args) -> None:
    """Child process: the DnD stages under one executor; prints one JSON line."""
    import nd_utils as nd

    cfg = nd.load_config("offline", overrides(Path(args.store), args.neurons,
                                              args.layers.split(",")) + MODES[args.mode])
    t0 = time.time()
    sel = nd.dnd_selection(cfg, progress=False)
    seconds = time.time() - t0
    print(json.dumps({"mode": args.mode, "seconds": seconds,
                      "neurons": sum(len(s.labels) for s in sel.values())}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--neurons", type=int, default=4, help="neurons per layer")
    ap.add_argument("--layers", default="head,fc")
    ap.add_argument("--modes", default="local,local1,ray1,ray2")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        return run_mode(args)

    import nd_utils as nd
    from nd_utils.stages.image_features import image_feature_jobs_if_missing
    from nd_utils.store import ArtifactStore
    from nd_utils.stages.synthesis import cache_pool_features

    root = Path(tempfile.mkdtemp(prefix="nd-bench-ray-"))
    base, store = root / "base", root / "store"
    layers = args.layers.split(",")
    cfg = nd.load_config("offline", overrides(base, args.neurons, layers))
    probe = nd.load_probe_from_config(cfg)
    t0 = time.time()
    nd.cache_activations(cfg, probe=probe, extra_jobs=image_feature_jobs_if_missing(cfg, probe),
                         progress=False)
    cache_pool_features(cfg)  # the retrieval pool's features: set-up shared by every mode
    print(f"stage 01 + pool features (not timed below): {time.time() - t0:.1f} s; "
          f"{args.neurons} neurons of "
          f"{', '.join(layers)}; every mode starts from this store", flush=True)
    results, snaps = {}, {}
    for mode in args.modes.split(","):
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(base, store)
        cmd = [sys.executable, __file__, "--mode", mode, "--store", str(store),
               "--neurons", str(args.neurons), "--layers", args.layers]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        snaps[mode] = ArtifactStore(store).file_hashes()
        r = results[mode]
        print(f"{mode:7s} {r['seconds']:7.1f} s  {60 * r['neurons'] / r['seconds']:5.2f} "
              f"neurons/min", flush=True)
    ref = "ray1" if "ray1" in results else next(iter(results))
    print(f"\n| mode | seconds | neurons/min | vs {ref} | outputs equal {ref}'s |")
    print("|---|---:|---:|---:|---|")
    for mode, r in results.items():
        rate = 60 * r["neurons"] / r["seconds"]
        ratio = results[ref]["seconds"] / r["seconds"]
        print(f"| {mode} | {r['seconds']:.1f} | {rate:.2f} | {ratio:.2f}x | "
              f"{'yes' if snaps[mode] == snaps[ref] else 'no'} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
