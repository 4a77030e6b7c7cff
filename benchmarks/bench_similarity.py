"""Benchmark of the five similarity functions: seconds and peak memory (printed, not asserted).

Inputs are random: P = U(0, 0.4) cosine-like values [N, M], activations randn [N, K]; default
N=10,000 images, M=20,000 concepts, K=1,000 neurons (the size of the speed target). Each function
runs in its own subprocess so that its peak RSS (ru_maxrss) is its own; "peak MB" is that peak
minus the RSS right after the inputs were created (and a tiny warm-up call), "total MB" the peak.

"seconds" is the fastest of --repeat calls, "CPU seconds" the process CPU time of that call.

Usage: python benchmarks/bench_similarity.py [--small] [--functions soft_wpmi wpmi] [--repeat 3]

CUDA section (run when CUDA is available, else it says it was skipped): soft_wpmi at a paper-like
shape (--cuda-n 113000 images, --cuda-m 20000 concepts, --cuda-k 2048 neurons, D=512 features),
P given as `Cosines` as stage 02 passes it, on CUDA (`similarity_on_device`) and on the CPU:
seconds, their ratio, torch.cuda.max_memory_allocated, and how far the two results differ.
--cuda-only skips the CPU table above it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

FUNCTIONS = ("cos_similarity", "cos_similarity_cubed", "rank_reorder", "wpmi", "soft_wpmi")
REFERENCE_SOFT_WPMI = {"seconds": 10.0, "peak_mb": 3000.0}  # CLIP-Dissect's code, this machine


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(name: str, n: int, m: int, k: int, repeat: int) -> dict:
    import torch

    from nd_utils.similarity import get_similarity

    fn = get_similarity(name)
    fn(torch.rand(300, 70), torch.randn(300, 8))          # import/thread-pool/allocator warm-up
    g = torch.Generator().manual_seed(0)
    P = torch.rand(n, m, generator=g).mul_(0.4)            # in place: no [N, M] temporary
    A = torch.randn(n, k, generator=g)
    base = rss_mb()
    times, cpus = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(P, A)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        assert out.shape == (k, m) and bool(out.isfinite().all())
        del out
    peak = rss_mb()
    best = times.index(min(times))
    return {"function": name, "seconds": round(times[best], 2), "cpu_seconds": round(cpus[best], 2),
            "all_seconds": [round(t, 2) for t in times],
            "peak_mb": round(peak - base), "total_mb": round(peak), "inputs_mb": round((P.numel() + A.numel()) * 4 / 2**20)}


def cuda_section(n: int, m: int, k: int, d: int = 512) -> None:
    """soft_wpmi on CUDA vs CPU at [n, m] x k (see the module docstring)."""
    import torch

    from nd_utils.similarity import Cosines, similarity_on_device, soft_wpmi

    if not torch.cuda.is_available():
        print("\nCUDA section skipped: CUDA is not available here")
        return
    g = torch.Generator().manual_seed(0)
    I = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    T = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    A = torch.randn(n, k, generator=g)
    P = Cosines(I, T)
    dev = torch.device("cuda")
    print(f"\nCUDA section: soft_wpmi, N={n}, M={m}, K={k}, D={d} (P as Cosines, never whole); "
          f"{torch.cuda.get_device_name(dev)}, free "
          f"{torch.cuda.mem_get_info(dev)[0] / 2**30:.1f} GiB", flush=True)
    similarity_on_device(soft_wpmi, Cosines(I[:300], T[:70]), A[:300, :8], device=dev)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    on_gpu = similarity_on_device(soft_wpmi, P, A, device=dev)   # returned on the CPU
    torch.cuda.synchronize()
    gpu_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev)
    print(f"  CUDA: {gpu_s:.2f} s, max_memory_allocated {peak / 2**30:.2f} GiB", flush=True)
    t0 = time.perf_counter()
    on_cpu = soft_wpmi(P, A)
    cpu_s = time.perf_counter() - t0
    diff = (on_gpu - on_cpu).abs().max().item()
    same = (on_gpu.argmax(1) == on_cpu.argmax(1)).float().mean().item()
    print(f"  CPU: {cpu_s:.2f} s ({torch.get_num_threads()} threads); CPU / CUDA = "
          f"{cpu_s / gpu_s:.1f}x; max |CUDA - CPU| = {diff:.2e} (|sim| up to "
          f"{on_cpu.abs().max().item():.0f}); same top concept for {100 * same:.2f} % of neurons")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="N=2000, M=3000, K=200: a quick run")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--m", type=int, default=20_000)
    ap.add_argument("--k", type=int, default=1_000)
    ap.add_argument("--functions", nargs="+", default=list(FUNCTIONS), choices=FUNCTIONS)
    ap.add_argument("--repeat", type=int, default=1, help="calls per function; the fastest is shown")
    ap.add_argument("--cuda-n", type=int, default=113_000)
    ap.add_argument("--cuda-m", type=int, default=20_000)
    ap.add_argument("--cuda-k", type=int, default=2_048)
    ap.add_argument("--cuda-only", action="store_true", help="only the CUDA section")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.small:
        args.n, args.m, args.k = 2_000, 3_000, 200
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.m, args.k, args.repeat)))
        return

    import torch
    if args.cuda_only:
        cuda_section(args.cuda_n, args.cuda_m, args.cuda_k)
        return
    print(f"N={args.n} images, M={args.m} concepts, K={args.k} neurons; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} (other processes slow every number below)")
    rows = []
    for name in args.functions:
        cmd = [sys.executable, __file__, "--worker", name, "--n", str(args.n), "--m", str(args.m),
               "--k", str(args.k), "--repeat", str(args.repeat)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(f"{name}: failed\n{res.stderr[-2000:]}")
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"  {name:22s} done: {r['seconds']:.2f} s (runs {r['all_seconds']})", flush=True)
    print(f"\n| function | seconds | CPU seconds | peak MB (over inputs) | total peak MB |\n"
          f"|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['function']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['peak_mb']} "
              f"| {r['total_mb']} |")
    print(f"(load average after: {os.getloadavg()[0]:.2f}; CPU seconds ~ 2x seconds means both cores"
          f" were ours)")
    if rows:
        print(f"(inputs: {rows[0]['inputs_mb']} MB)")
    soft = [r for r in rows if r["function"] == "soft_wpmi"]
    if soft and (args.n, args.m, args.k) == (10_000, 20_000, 1_000):
        s, ref = soft[0], REFERENCE_SOFT_WPMI
        print(f"\nsoft_wpmi vs the reference (~{ref['seconds']:.0f} s, ~{ref['peak_mb'] / 1000:.0f} GB): "
              f"{s['seconds'] / ref['seconds']:.2f}x the time, {s['peak_mb'] / ref['peak_mb']:.2f}x "
              f"the memory over inputs ({s['total_mb'] / ref['peak_mb']:.2f}x counting the inputs)")
    cuda_section(args.cuda_n, args.cuda_m, args.cuda_k)


if __name__ == "__main__":
    main()
