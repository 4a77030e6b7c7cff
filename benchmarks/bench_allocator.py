"""Benchmark of the allocator setting made at import (`nd_utils.machine.keep_freed_memory`).

Runs the offline target (EfficientNet-Lite0) on batches of 32 random images in two fresh
processes, with `ND_MALLOC_TUNING=1` (the default) and `=0` (glibc's defaults), and prints
milliseconds per image, minor page faults per image and the ratio.

Usage: python benchmarks/bench_allocator.py [--batches 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

WORKER = """
import resource, sys, time, torch, nd_utils as nd
torch.set_num_threads(int(sys.argv[2]))
model = nd.load_target("efficientnet-lite0").model.eval()
x = torch.randn(32, 3, 224, 224)
with torch.inference_mode():
    model(x)  # warm-up
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(int(sys.argv[1])):
        model(x)
    seconds = time.perf_counter() - t0
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
n = 32 * int(sys.argv[1])
print(seconds / n * 1000, faults / n)
"""


def run(tuning: str, batches: int, threads: int) -> tuple[float, float]:
    env = {**os.environ, "ND_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", WORKER, str(batches), str(threads)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[-2]), float(out[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"allocator: EfficientNet-Lite0 forward, batch 32, {args.threads} threads")
    tuned = run("1", args.batches, args.threads)
    default = run("0", args.batches, args.threads)
    for name, (ms, faults) in (("freed memory kept (default)", tuned),
                               ("glibc defaults (ND_MALLOC_TUNING=0)", default)):
        print(f"  {name:36s} {ms:7.1f} ms/image  {faults:9.0f} page faults/image")
    print(f"  speed-up {default[0] / tuned[0]:.2f}x, page faults / {default[1] / max(tuned[1], 1):.0f}")


if __name__ == "__main__":
    main()
