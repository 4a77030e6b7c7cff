"""Stage 01 at the paper's scale: pooled activations streamed to the store in bounded memory.

113,000 synthetic images (8x8 PNGs of seeded noise, a folder probe set) through a synthetic
target with ResNet-50's pooled widths: conv1 64, layer1 256, layer2 512, layer3 1,024, layer4
2,048 and fc 1,000, together 4,904 neurons (113,000 x 4,904 float32 = 2.2 GB). The image is
pooled to 1x1 first, so the forward pass is cheap and the store's writes dominate. Each step
runs in its own subprocess, so each peak RSS is its own:

- cache: the decode-once pass and the publication of the six layer artifacts (chunks of
  --chunk images), top 50 images per neuron;
- load <layer>: one layer's artifact read back and every value touched (its file only), for
  conv1 and layer4.

Usage: python benchmarks/bench_paper_activations.py [--images 113000] [--chunk 256] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTHS = {"conv1": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048, "fc": 1000}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_images(folder: Path, n: int) -> None:
    """n 8x8 RGB PNGs of seeded noise, 1,000 per sub-folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"c{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(sub / f"{i:06d}.png")


def synthetic_target():
    import torch
    from torch import nn
    from torchvision import transforms as T

    import nd_utils as nd

    class PaperWidths(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.conv1 = nn.Conv2d(3, 64, 1)
            self.layer1, self.layer2 = nn.Conv2d(64, 256, 1), nn.Conv2d(256, 512, 1)
            self.layer3, self.layer4 = nn.Conv2d(512, 1024, 1), nn.Conv2d(1024, 2048, 1)
            self.fc = nn.Linear(2048, 1000)

        def forward(self, x):
            x = self.conv1(self.pool(x))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x).relu()).relu()).relu())
            return self.fc(x.flatten(1))
    return nd.from_module(PaperWidths(), T.ToTensor(), name="paper-widths")


def jobs(target):
    from nd_utils.stages.activations import TargetConsumer
    from nd_utils.decode_once import CacheJob

    consumer = TargetConsumer(target, list(WIDTHS))
    return [CacheJob(consumer, layer, "bench", f"paper-{layer}", 1, {}, top_k=50)
            for layer in WIDTHS]


def step_cache(folder: str, store_dir: str, chunk: int, batch: int) -> dict:
    import nd_utils as nd
    from nd_utils.decode_once import run_decode_once
    from nd_utils.store import ArtifactStore

    t0 = time.perf_counter()
    probe = nd.load_probe("folder", path=folder)
    probe_s = time.perf_counter() - t0
    target = synthetic_target()
    base = rss_mb()
    t0 = time.perf_counter()
    run_decode_once(probe, jobs(target), ArtifactStore(store_dir), batch_size=batch,
                    chunk_size=chunk, progress=False)
    return {"images": len(probe), "probe_seconds": probe_s,
            "seconds": time.perf_counter() - t0, "start_mb": base, "peak_mb": rss_mb()}


def step_load(store_dir: str, layer: str) -> dict:
    from safetensors.torch import load_file

    from nd_utils.store import ArtifactStore

    store = ArtifactStore(store_dir)   # imports done first: the baseline counts them
    base = rss_mb()
    t0 = time.perf_counter()
    art = store.open("bench", f"paper-{layer}")
    tensors = load_file(str(art.file("activations.safetensors")))
    checksum = sum(float(t.sum()) for t in tensors.values())   # every byte read, no copy
    size = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    return {"layer": layer, "shape": list(tensors["activations"].shape),
            "seconds": time.perf_counter() - t0, "layer_mb": size, "checksum": checksum,
            "start_mb": base, "peak_mb": rss_mb()}


def child(*args) -> dict:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"step {args[:2]} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=113_000)
    ap.add_argument("--chunk", type=int, default=256, help="images per chunk (activations.chunk_size)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--keep", default=None, help="scratch folder to keep and reuse")
    ap.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        kind, *rest = args.step
        out = step_cache(rest[0], rest[1], args.chunk, args.batch) if kind == "cache" \
            else step_load(rest[0], rest[1])
        print(json.dumps(out))
        return
    root = Path(args.keep or tempfile.mkdtemp(prefix="nd-bench-paper-acts-"))
    folder, store = root / "images", root / "store"
    t0 = time.perf_counter()
    if not folder.exists():
        make_images(folder, args.images)
    total_mb = args.images * sum(WIDTHS.values()) * 4 / 2**20
    print(f"{args.images:,} synthetic images written in {time.perf_counter() - t0:.0f} s; "
          f"6 layers, {sum(WIDTHS.values()):,} neurons: {total_mb / 1024:.2f} GB of activations; "
          f"largest layer (layer4) {args.images * 2048 * 4 / 2**20:.0f} MB", flush=True)
    shutil.rmtree(store, ignore_errors=True)
    c = child("--chunk", str(args.chunk), "--batch", str(args.batch), "--step", "cache",
              str(folder), str(store))
    print(f"cache: {c['images']:,} images in {c['seconds']:.0f} s ({c['images'] / c['seconds']:.0f} "
          f"img/s; probe listed and hashed in {c['probe_seconds']:.0f} s); peak RSS "
          f"{c['peak_mb']:.0f} MB, {c['peak_mb'] - c['start_mb']:.0f} MB over the process before "
          f"the pass ({(c['peak_mb'] - c['start_mb']) / total_mb:.3f}x the activations)", flush=True)
    for layer in ("conv1", "layer4"):
        r = child("--step", "load", str(store), layer)
        print(f"load {layer}: {r['shape']} in {r['seconds']:.1f} s; RSS grew "
              f"{r['peak_mb'] - r['start_mb']:.0f} MB for a {r['layer_mb']:.0f} MB layer "
              f"(the other layers: {total_mb - r['layer_mb']:.0f} MB, not read)", flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
