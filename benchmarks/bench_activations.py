"""Benchmark of activation caching: images per second and peak memory (printed, not asserted).

Scenarios, each in its own subprocess so that peak RSS is its own:
  one        EfficientNet-Lite0 alone (layers blocks.10, head, fc)
  decode1    Lite0 + a second consumer (EfficientNet-Lite2 logits, the image side of the offline
             vision-language backend) fed from ONE decode of each image
  separate   the same two consumers in two passes (each image decoded twice): the baseline

Usage: python benchmarks/bench_activations.py [--probe imagenet-sample-1k] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

SCENARIOS = ("one", "decode1", "separate")


def run_scenario(name: str, probe_name: str, limit: "int | None", batch: int) -> dict:
    import torch

    import nd_utils as nd
    from nd_utils.stages.activations import TargetConsumer
    from nd_utils.errors import ProbeError
    from nd_utils.decode_once import CacheJob, run_decode_once
    from nd_utils.store import ArtifactStore

    probe = nd.load_probe(probe_name)
    if limit:
        probe = probe.subset(limit)
    store = ArtifactStore(tempfile.mkdtemp(prefix="nd-bench-"))
    lite0 = TargetConsumer(nd.load_target("efficientnet-lite0"), ["blocks.10", "head", "fc"])
    jobs0 = [CacheJob(lite0, layer, "bench", f"lite0-{layer}", 1, {}, top_k=50)
             for layer in lite0.outputs]
    second = []
    if name != "one":
        lite2 = TargetConsumer(nd.load_target("efficientnet-lite2"), ["fc"])
        second = [CacheJob(lite2, "fc", "bench", "lite2-fc", 1, {})]
    kw = dict(batch_size=batch, chunk_size=256, progress=False)
    t0 = time.perf_counter()
    if name == "separate":
        run_decode_once(probe, jobs0, store, **kw)
        run_decode_once(probe, second, store, **kw)
    else:
        run_decode_once(probe, jobs0 + second, store, **kw)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"scenario": name, "images": len(probe), "seconds": round(seconds, 2),
            "images_per_s": round(len(probe) / seconds, 1), "peak_rss_mb": round(peak_mb)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe", default="imagenet-sample-1k")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--scenario", choices=SCENARIOS)
    args = ap.parse_args()
    if args.scenario:  # child process
        print(json.dumps(run_scenario(args.scenario, args.probe, args.limit, args.batch)))
        return
    import nd_utils as nd
    from nd_utils.stages.activations import TargetConsumer
    from nd_utils.errors import ProbeError
    try:
        nd.load_probe(args.probe)
    except ProbeError as exc:
        sys.exit(f"benchmark needs the probe set {args.probe!r}: {exc}")
    rows = []
    for name in SCENARIOS:
        cmd = [sys.executable, __file__, "--scenario", name, "--probe", args.probe,
               "--batch", str(args.batch)] + (["--limit", str(args.limit)] if args.limit else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{name:>9}: {rows[-1]}", flush=True)
    one, dec, sep = rows
    print(f"\nactivation caching, EfficientNet-Lite0, probe {args.probe} ({one['images']} images), "
          f"{torch_threads()} threads")
    print(f"{'scenario':<34}{'img/s':>8}{'seconds':>9}{'peak MB':>9}")
    for label, r in [("Lite0 alone", one), ("Lite0 + Lite2, decode once", dec),
                     ("Lite0 + Lite2, two passes", sep)]:
        print(f"{label:<34}{r['images_per_s']:>8}{r['seconds']:>9}{r['peak_rss_mb']:>9}")
    print(f"decode-once speed-up over two passes: {sep['seconds'] / dec['seconds']:.2f}x; "
          f"peak memory ratio (decode once / two passes): {dec['peak_rss_mb'] / sep['peak_rss_mb']:.2f}")


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


if __name__ == "__main__":
    main()
