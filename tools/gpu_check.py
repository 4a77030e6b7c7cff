"""`make gpu-check`: the paper-profile smoke on CUDA, then on the CPU, and how far they agree.

Runs `python -m nd_utils run paper` on the stand-ins of tests/paper_standins.py (ResNet-50 under
its real name with placed random weights, `open_clip:ViT-B-16:none`, tiny BLIP and Stable
Diffusion folders, a local OpenAI-compatible server, ImageNet-val and Broden layouts) twice into
one scratch folder: all nine stages with `device=cuda`, then stages 01-06 with `device=cpu` in a
store of their own. Prints each stage's seconds, the peak GPU memory (sampled with nvidia-smi,
all processes of the GPU), and the label agreement between the two runs: CLIP-Dissect's top-1
label per neuron of every layer and DnD's chosen label. Needs CUDA and ../shared (the ImageNet
sample photos and the concept-set files); meant for at most 5 minutes on one GPU.

    python tools/gpu_check.py [--images 80] [--vlm-dtype float32] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import pandas as pd  # noqa: E402

from paper_standins import (ConceptServer, paper_overrides,  # noqa: E402
                             place_resnet50_checkpoint, standin_env)

CPU_STAGES = "01,02,03,04,05,06"


class GpuMemorySampler:
    """Peak `memory.used` of GPU 0 over a run, sampled every `interval` s with nvidia-smi."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak_mib, self.samples = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                                      "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.peak_mib = max(self.peak_mib, int(out.strip().splitlines()[0]))
                self.samples += 1
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "GpuMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def run_paper(overrides: list[str], env: dict, stages: "str | None" = None) -> Path:
    """One `nd_utils run paper`; returns its run folder (raises with the stderr tail on failure)."""
    args = [sys.executable, "-m", "nd_utils", "run", "paper",
            *sum((["--set", o] for o in overrides), [])]
    if stages:
        args += ["--stages", stages]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(args[3:6])} ...):\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1]).parent


def stage_seconds(run: Path) -> dict[str, float]:
    record = json.loads((run / "run.json").read_text())
    return {s["notebook"][:2]: float(s.get("seconds") or 0.0) for s in record["stages"]}


def label_agreement(a: Path, b: Path) -> dict[str, tuple[int, int]]:
    """{table: (equal labels, neurons)} for CLIP-Dissect's layers and DnD's choices."""
    out = {}
    for left in sorted((a / "results").glob("02_clip_dissect_*.csv")):
        right = b / "results" / left.name
        if right.exists():
            x, y = (pd.read_csv(p, keep_default_na=False) for p in (left, right))
            out[left.stem] = (int((x.description == y.description).sum()), len(x))
    for left in sorted((a / "results").glob("06_dnd_*.csv")):
        right = b / "results" / left.name
        if right.exists() and "Label 1" in pd.read_csv(left, nrows=0).columns:
            x, y = (pd.read_csv(p, keep_default_na=False) for p in (left, right))
            out[left.stem] = (int((x["Label 1"] == y["Label 1"]).sum()), len(x))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=80, help="ImageNet-layout probe photos")
    parser.add_argument("--broden", type=int, default=16, help="Broden-layout probe photos")
    parser.add_argument("--vlm-dtype", default=None, help="vlm.dtype of the CUDA run "
                        "(default: the profile's)")
    parser.add_argument("--keep", default=None, help="scratch folder to keep (default: a temp)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; this check runs only where a GPU is", flush=True)
        return 2
    shared = Path(os.environ.get("ND_SHARED_DIR") or REPO.parent / "shared")
    concept_sets = shared / "data" / "reference" / "concept_sets"
    if not (shared / "data" / "imagenet-sample-images").is_dir() or not concept_sets.is_dir():
        print(f"gpu-check: needs the ImageNet sample and concept sets under {shared}", flush=True)
        return 2
    from tiny_models import build_tiny_blip, build_tiny_stable_diffusion

    root = Path(args.keep or tempfile.mkdtemp(prefix="nd-gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    blip, sd = root / "blip", root / "sd"
    if not blip.exists():
        build_tiny_blip(blip)
    if not sd.exists():
        build_tiny_stable_diffusion(sd)
    place_resnet50_checkpoint(root / "torch")
    base = paper_overrides(root, shared, blip, sd, args.images, args.broden)
    print(f"gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}; stand-ins "
          f"built in {time.perf_counter() - t0:.1f} s; {args.images} + {args.broden} probe "
          f"images, layers conv1/layer4/fc, 2 DnD neurons", flush=True)
    cuda_overrides = [o for o in base if not o.startswith("device=")] + ["device=cuda"]
    if args.vlm_dtype:
        cuda_overrides.append(f"vlm.dtype={args.vlm_dtype}")
    cpu_overrides = [o if not o.startswith("data_dir=") else f"data_dir={root / 'data-cpu'}"
                     for o in base]
    with ConceptServer() as server:
        env = standin_env(root, concept_sets, server)
        t = time.perf_counter()
        with GpuMemorySampler() as memory:
            cuda_run = run_paper(cuda_overrides, env)
        cuda_wall = time.perf_counter() - t
        t = time.perf_counter()
        cpu_run = run_paper(cpu_overrides, env, CPU_STAGES)
        cpu_wall = time.perf_counter() - t
    cuda_s, cpu_s = stage_seconds(cuda_run), stage_seconds(cpu_run)
    print(f"\n{'stage':<6}{'cuda s':>9}{'cpu s':>9}")
    for stage in sorted(cuda_s):
        cpu = f"{cpu_s[stage]:9.1f}" if stage in cpu_s else f"{'-':>9}"
        print(f"{stage:<6}{cuda_s[stage]:9.1f}{cpu}")
    print(f"{'all':<6}{cuda_wall:9.1f}{cpu_wall:9.1f}   (wall, kernel starts included; "
          f"cpu: stages {CPU_STAGES})")
    print(f"peak GPU memory used: {memory.peak_mib} MiB (nvidia-smi, {memory.samples} samples)")
    print("\nlabel agreement, CUDA vs CPU:")
    for table, (same, n) in label_agreement(cuda_run, cpu_run).items():
        print(f"  {table:<28} {same}/{n} = {same / max(n, 1):.3f}")
    print(f"\ntotal {time.perf_counter() - t0:.1f} s; runs: {cuda_run} {cpu_run}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
