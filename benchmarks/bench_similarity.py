"""Benchmark of the five similarity functions: seconds and peak memory (printed, not asserted).

Every measurement runs in its own subprocess, so that its peak RSS (ru_maxrss) is its own:
"peak MB" counts everything (Python, torch, the inputs). Inputs are synthetic and seeded: unit
image and text features [N, 512] / [M, 512] sharing one direction (cosines ~0.17 on average,
as CLIP's are positive) and activations randn [N, K]. Three ways to pass P:

- dense: P = I @ T.T formed first (its seconds shown apart), then f(P, A);
- factorized: f(cosines.factorized(I, T), A), blocks of P computed where they are read (what
  stages 02, 07 and 08 do);
- reference: the released code's approach, written out here from METHODS.md: softmax(a*P) [N, M]
  whole and a Python loop over neurons (wpmi, soft_wpmi); normalised or centred-and-cubed copies
  of P (the cosines). Run only where its estimated memory fits this machine's available memory;
  rank_reorder's reference (one argsort per neuron) is never run (hours at these sizes).

Sections (--sections, default all): `dense10k` (N=10,000, M=20,000, K=1,000: dense, factorized,
and reference), `paper` (N=113,000, M=20,000, K=2,048: dense, factorized, reference where it fits;
rank_reorder on --rank-neurons of the 2,048 neurons, its time scaled to all of them and marked so),
`wide` (soft_wpmi factorized with 100,000 concepts at N=113,000), `scaling` (factorized, three N
and three M), `cuda` (soft_wpmi on CUDA vs CPU, skipped without CUDA).

Usage: python benchmarks/bench_similarity.py [--sections paper wide] [--functions soft_wpmi]
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
SECTIONS = ("dense10k", "paper", "wide", "scaling", "cuda")
D = 512
PAPER = (113_000, 20_000, 2_048)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def available_mb() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 1024


def features(n: int, m: int, k: int, seed: int = 0):
    """Unit image/text features sharing a direction, and activations; seeded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)

    def unit(rows):
        x = torch.randn(rows, D, generator=g).div_(D ** 0.5).add_(0.45 * u)
        return torch.nn.functional.normalize(x, dim=1)
    return unit(n), unit(m), torch.randn(n, k, generator=g)


# ---- the reference approach (METHODS.md section 2, as the released code computes it) --------

def reference(name: str, P, A):
    import torch

    N, M = P.shape
    if name == "cos_similarity":
        return (A / A.norm(dim=0, keepdim=True)).T @ (P / P.norm(dim=0, keepdim=True))
    if name == "cos_similarity_cubed":
        Pc, Ac = (P - P.mean(0)) ** 3, (A - A.mean(0)) ** 3
        Pc, Ac = Pc / Pc.norm(dim=0, keepdim=True).clamp_min(1e-3), Ac / Ac.norm(dim=0, keepdim=True).clamp_min(1e-3)
        return Ac.T @ Pc
    soft = name == "soft_wpmi"
    top_k, a, lam = (100, 10, 1) if soft else (28, 2, 0.6)
    Q = torch.softmax(a * P, dim=1)                                   # [N, M] whole
    inds = torch.topk(A, top_k, dim=0).indices                        # [top_k, K]
    p = (0.998 - torch.arange(top_k) / top_k * (0.998 - 0.97)).unsqueeze(1)
    rows = []
    for k in range(A.shape[1]):                                       # one neuron at a time
        q = Q.gather(0, inds[:, k:k + 1].expand(-1, M))
        q = 1 + p * (q - 1) if soft else q
        rows.append(torch.log(q + 1e-7).sum(0, keepdim=True))
    L = torch.cat(rows)
    prior = torch.logsumexp(L, 0, keepdim=True) - torch.log(torch.tensor(float(A.shape[1])))
    return L - lam * prior


def reference_mb(name: str, n: int, m: int, k: int) -> float:
    """Estimated peak of `reference` over its inputs: P and the [N, M] temporaries, outputs."""
    nm, km = 4 * n * m / 2**20, 4 * k * m / 2**20
    temporaries = {"cos_similarity": 1, "cos_similarity_cubed": 2}.get(name, 2)  # a*P and Q
    return (1 + temporaries) * nm + 3 * km + 4 * n * k / 2**20


# ---- one measurement, in a subprocess ----------------------------------------------------------

def worker(spec: dict) -> dict:
    import torch

    from nd_utils.cosines import factorized
    from nd_utils.similarity import get_similarity

    name, mode, (n, m, k) = spec["function"], spec["mode"], spec["shape"]
    fn = get_similarity(name)
    fn(torch.rand(300, 70), torch.randn(300, 8))                      # warm-up
    I, T, A = features(n, m, k)
    used = spec.get("neurons") or k
    A_used = A[:, :used]
    base = rss_mb()
    gemm = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "factorized":
        out = fn(factorized(I, T), A_used)
    else:
        g0 = time.perf_counter()
        P = I @ T.T
        gemm = time.perf_counter() - g0
        out = fn(P, A_used) if mode == "dense" else reference(name, P, A_used)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    # by row blocks: out.isfinite() whole makes float temporaries of out's size (1.2 GB at
    # 100,000 concepts), which would count in this peak though no similarity function needs them
    assert out.shape == (used, m) and any(bool(out[k0:k0 + 64].isfinite().any())
                                          for k0 in range(0, used, 64))
    return {"function": name, "mode": mode, "shape": [n, m, k], "neurons": used,
            "seconds": seconds, "gemm_seconds": gemm, "cpu_seconds": cpu,
            "peak_mb": rss_mb(), "start_mb": base,
            "top1": out.argmax(1).tolist()}


def measure(function: str, mode: str, shape, neurons: "int | None" = None) -> "dict | None":
    spec = {"function": function, "mode": mode, "shape": list(shape), "neurons": neurons}
    res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                         capture_output=True, text=True)
    if res.returncode:
        print(f"  {function} {mode}: failed\n{res.stderr[-1500:]}", flush=True)
        return None
    r = json.loads(res.stdout.strip().splitlines()[-1])
    scale = r["shape"][2] / r["neurons"]
    note = f" ({r['neurons']} neurons, x{scale:.0f} -> {r['seconds'] * scale:.0f} s)" if scale > 1 else ""
    print(f"  {function:22s} {mode:10s} {r['seconds']:8.1f} s  peak {r['peak_mb']:7.0f} MB{note}",
          flush=True)
    return r


def table(rows: list[dict], title: str) -> None:
    print(f"\n{title}\n| function | mode | seconds | of which P = I @ T.T | peak MB | top-1 as dense |\n"
          f"|---|---|---:|---:|---:|---|")
    dense = {r["function"]: r for r in rows if r["mode"] == "dense"}
    for r in rows:
        scale = r["shape"][2] / r["neurons"]
        secs = f"{r['seconds'] * scale:.1f}" + (f" (x{scale:.0f} of {r['neurons']} neurons)"
                                                  if scale > 1 else "")
        d = dense.get(r["function"])
        same = "-" if d is None or r is d else (
            f"{sum(a == b for a, b in zip(r['top1'], d['top1']))}/{len(d['top1'])}")
        gemm = f"{r['gemm_seconds']:.1f}" if r["mode"] != "factorized" else "-"
        print(f"| {r['function']} | {r['mode']} | {secs} | {gemm} | {r['peak_mb']:.0f} | {same} |")


def ratios(rows: list[dict]) -> None:
    by = {(r["function"], r["mode"]): r for r in rows}
    for name in FUNCTIONS:
        d, f, ref = by.get((name, "dense")), by.get((name, "factorized")), by.get((name, "reference"))
        parts = []
        if d and f:
            parts.append(f"factorized / dense = {f['seconds'] / d['seconds']:.2f}x time "
                         f"({f['seconds'] / (d['seconds'] - d['gemm_seconds']):.2f}x of f(P, A) alone), "
                         f"{f['peak_mb'] / d['peak_mb']:.2f}x peak")
        if d and ref:
            parts.append(f"dense / reference = {d['seconds'] / ref['seconds']:.2f}x time, "
                         f"{d['peak_mb'] / ref['peak_mb']:.2f}x peak")
        if parts:
            print(f"  {name}: " + "; ".join(parts))


def run_shape(functions, shape, modes, rank_neurons=None) -> list[dict]:
    rows = []
    for name in functions:
        neurons = rank_neurons if name == "rank_reorder" and rank_neurons else None
        for mode in modes:
            if mode == "reference":
                if name == "rank_reorder":
                    continue
                need = reference_mb(name, *shape) + 1500
                if need > available_mb():
                    print(f"  {name:22s} reference  does not fit: needs ~{need / 1024:.1f} GB, "
                          f"{available_mb() / 1024:.1f} GB available", flush=True)
                    continue
            r = measure(name, mode, shape, neurons)
            if r:
                rows.append(r)
    return rows


def scaling(functions) -> None:
    k = 256
    grid = [((10_000, 20_000, k), "N"), ((20_000, 20_000, k), "N"), ((40_000, 20_000, k), "N"),
            ((20_000, 5_000, k), "M"), ((20_000, 10_000, k), "M")]
    print(f"\nScaling (factorized, K={k}; rank_reorder on 32 neurons, scaled to {k}); each cell: "
          "seconds, then how much the call raised the process's peak RSS (MB; inputs not counted):")
    res = {}
    for shape, _ in grid:
        for name in functions:
            r = measure(name, "factorized", shape, 32 if name == "rank_reorder" else None)
            if r:
                res[(name, tuple(shape))] = (r["seconds"] * k / r["neurons"],
                                             r["peak_mb"] - r["start_mb"])
    print("| function | N=10k | N=20k | N=40k | M=5k (N=20k) | M=10k | M=20k |\n|---|---:|---:|---:|---:|---:|---:|")
    cols = [(10_000, 20_000), (20_000, 20_000), (40_000, 20_000), (20_000, 5_000),
            (20_000, 10_000), (20_000, 20_000)]
    for name in functions:
        cells = [res.get((name, (n, m, k))) for n, m in cols]
        print(f"| {name} | " + " | ".join("-" if c is None else f"{c[0]:.1f} s, {c[1]:,.0f} MB"
                                           for c in cells) + " |")


def cuda_section(n: int, m: int, k: int) -> None:
    """soft_wpmi on CUDA vs CPU at [n, m] x k, P factorized as stage 02 passes it."""
    import torch

    from nd_utils.cosines import factorized
    from nd_utils.similarity import similarity_on_device
    from nd_utils.similarity_formulas import soft_wpmi

    if not torch.cuda.is_available():
        print("\nCUDA section skipped: CUDA is not available here")
        return
    I, T, A = features(n, m, k)
    P, dev = factorized(I, T), torch.device("cuda")
    print(f"\nCUDA section: soft_wpmi, N={n}, M={m}, K={k}, D={D} (P factorized); "
          f"{torch.cuda.get_device_name(dev)}, free "
          f"{torch.cuda.mem_get_info(dev)[0] / 2**30:.1f} GiB", flush=True)
    similarity_on_device(soft_wpmi, factorized(I[:300], T[:70]), A[:300, :8], device=dev)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    on_gpu = similarity_on_device(soft_wpmi, P, A, device=dev)
    torch.cuda.synchronize()
    gpu_s = time.perf_counter() - t0
    print(f"  CUDA: {gpu_s:.2f} s, max_memory_allocated "
          f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB", flush=True)
    t0 = time.perf_counter()
    on_cpu = soft_wpmi(P, A)
    cpu_s = time.perf_counter() - t0
    same = (on_gpu.argmax(1) == on_cpu.argmax(1)).float().mean().item()
    print(f"  CPU: {cpu_s:.2f} s; CPU / CUDA = {cpu_s / gpu_s:.1f}x; max |CUDA - CPU| = "
          f"{(on_gpu - on_cpu).abs().max().item():.2e}; same top concept for {100 * same:.2f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--functions", nargs="+", default=list(FUNCTIONS), choices=FUNCTIONS)
    ap.add_argument("--modes", nargs="+", default=["dense", "factorized", "reference"],
                    choices=["dense", "factorized", "reference"])
    ap.add_argument("--rank-neurons", type=int, default=64,
                    help="rank_reorder's neurons at paper scale (its time is scaled to 2,048)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{available_mb() / 1024:.1f} GB available, load average {os.getloadavg()[0]:.2f} "
          f"(other processes slow every number below)", flush=True)
    if "dense10k" in args.sections:
        print("\nN=10,000 images, M=20,000 concepts, K=1,000 neurons:")
        rows = run_shape(args.functions, (10_000, 20_000, 1_000), args.modes)
        table(rows, "N=10,000, M=20,000, K=1,000")
        ratios(rows)
    if "paper" in args.sections:
        print(f"\nPaper scale: N={PAPER[0]:,}, M={PAPER[1]:,}, K={PAPER[2]:,}:")
        rows = run_shape(args.functions, PAPER, args.modes, rank_neurons=args.rank_neurons)
        table(rows, f"Paper scale N={PAPER[0]:,}, M={PAPER[1]:,}, K={PAPER[2]:,}")
        ratios(rows)
    if "wide" in args.sections and "soft_wpmi" in args.functions:
        print("\n100,000 concepts at N=113,000, K=2,048 (soft_wpmi, factorized):")
        measure("soft_wpmi", "factorized", (PAPER[0], 100_000, PAPER[2]))
    if "scaling" in args.sections:
        scaling(args.functions)
    print(f"(load average after: {os.getloadavg()[0]:.2f})")
    if "cuda" in args.sections:
        cuda_section(*PAPER)


if __name__ == "__main__":
    main()
