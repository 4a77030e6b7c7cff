"""One pass over a probe set that feeds every consumer, resumable chunk by chunk.

Each image is decoded once and handed to each consumer's own preprocessing (the target network
now, a vision-language image encoder later). Every (consumer, output) pair is a `CacheJob` that
becomes one artifact of the store. Work is split into chunks of images; a finished chunk is saved
atomically into the job's staging folder, so a killed run resumes at its last finished chunk, and
only the jobs that still miss a chunk run on it.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .locks import wait_until_free
from .machine import pins_memory
from .store import Artifact, ArtifactStore, atomic_write_text, save_tensors
from .tensor_stream import RunningTopK, SafetensorsStream

if TYPE_CHECKING:
    from .stage_cache import StageOutput


class SimulatedInterruption(RuntimeError):
    """Raised by `run_decode_once(..., stop_after_chunks=n)` to imitate a killed run."""


class Consumer(Protocol):
    """Anything that turns a batch of preprocessed images into named `[B, K]` outputs."""

    name: str
    preprocess: Callable
    outputs: list[str]

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]: ...


@dataclass
class CacheJob:
    """One artifact to produce: output `output` of `consumer`, stored as (stage, key)."""

    consumer: Consumer
    output: str
    stage: str
    key: str
    version: int
    params: dict
    inputs: dict = field(default_factory=dict)
    top_k: int = 0                       # store each column's top image ids when > 0
    extra: dict = field(default_factory=dict)
    upstream: dict = field(default_factory=dict)

    @classmethod
    def for_output(cls, out: "StageOutput", consumer: Consumer, output: str, top_k: int = 0,
                   extra: "dict | None" = None) -> "CacheJob":
        """The job that produces `out` (stage, key and manifest fields all taken from it)."""
        return cls(consumer=consumer, output=output, stage=out.stage.name, key=out.key,
                   version=out.stage.version, params=out.params, inputs=out.inputs,
                   upstream=out.upstream, top_k=top_k, extra=dict(extra or {}))


class _DecodeOnce(Dataset):
    """Decodes image i once and applies every active consumer's preprocessing to it."""

    def __init__(self, probe, indices: list[int], preprocessors: list[Callable]):
        self.probe, self.indices, self.preprocessors = probe, indices, preprocessors

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        img = self.probe.load_image(self.indices[j])
        return tuple(p(img) for p in self.preprocessors)


def _chunk_file(staging: Path, chunk: int) -> Path:
    return staging / "chunks" / f"{chunk:05d}.safetensors"


def _prepare_staging(store: ArtifactStore, job: CacheJob, n: int, chunk_size: int) -> Path:
    """Staging folder of a job, emptied when it belongs to another chunking or image count.

    Called only while holding the job's key lock, so no other writer uses the folder.
    """
    staging = store.staging_path(job.stage, job.key)
    plan = {"n_images": n, "chunk_size": chunk_size, "key": job.key}
    plan_file = staging / "plan.json"
    if staging.exists():
        try:
            same = json.loads(plan_file.read_text()) == plan
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    if not plan_file.exists():
        atomic_write_text(plan_file, json.dumps(plan))
    return staging


def run_decode_once(probe, jobs: list[CacheJob], store: ArtifactStore, *, batch_size: int = 32,
                    chunk_size: int = 256, num_workers: int = 0,
                    device: "torch.device | str" = "cpu", progress: bool = True,
                    stop_after_chunks: "int | None" = None,
                    log: "Callable[[str], None] | None" = None,
                    run_chunks: "Callable[[list], list[dict]] | None" = None
                    ) -> dict[tuple[str, str], Artifact]:
    """Compute every job's `[N, K]` output over `probe` in one decode-once pass and publish it.

    Jobs already in the store are skipped. A job whose key another process is computing (its
    lock is held) is not computed twice: this pass waits for it at the end and reuses the
    published output (or computes it, when that writer died). `stop_after_chunks` interrupts
    the pass after that many chunks (tests use it to simulate a killed run). `run_chunks`
    computes the missing chunks elsewhere (see `_compute`).
    Returns {(stage, key): Artifact}.
    """
    if int(chunk_size) < 1 or int(batch_size) < 1:
        raise ValueError(f"chunk_size and batch_size must be >= 1, got {chunk_size} and "
                         f"{batch_size} (activations.chunk_size / activations.batch_size)")
    todo = [j for j in jobs if not store.exists(j.stage, j.key)]
    mine, theirs = _claim(store, todo)
    try:
        if mine:
            _compute(probe, mine, store, batch_size=batch_size, chunk_size=chunk_size,
                     num_workers=num_workers, device=device, progress=progress,
                     stop_after_chunks=stop_after_chunks, run_chunks=run_chunks)
    finally:
        for j in mine:
            store.lock(j.stage, j.key).release()
    for j in theirs:
        wait_until_free(store.lock(j.stage, j.key), f"{j.stage}/{j.key}", log=log)
    orphans = [j for j in theirs if not store.exists(j.stage, j.key)]
    if orphans:  # their writer stopped before publishing: resume its work here
        run_decode_once(probe, orphans, store, batch_size=batch_size, chunk_size=chunk_size,
                        num_workers=num_workers, device=device, progress=progress,
                        stop_after_chunks=stop_after_chunks, log=log, run_chunks=run_chunks)
    return {(j.stage, j.key): store.open(j.stage, j.key) for j in jobs}


def _claim(store: ArtifactStore, todo: list[CacheJob]) -> tuple[list[CacheJob], list[CacheJob]]:
    """Split jobs into those whose lock this process took and those another process holds."""
    mine, theirs = [], []
    for j in sorted(todo, key=lambda j: (j.stage, j.key)):
        lock = store.lock(j.stage, j.key)
        if not lock.acquire(blocking=False):
            theirs.append(j)
        elif store.exists(j.stage, j.key):      # published between our check and the lock
            lock.release()
        else:
            mine.append(j)
    return mine, theirs


def _compute(probe, todo: list[CacheJob], store: ArtifactStore, *, batch_size, chunk_size,
             num_workers, device, progress, stop_after_chunks, run_chunks=None) -> None:
    """The decode-once pass over the jobs this process holds the locks of; publishes each.

    `run_chunks(plan)` (an executor's fan-out, see `cache_activations`) computes the missing
    chunks elsewhere: plan items are `(chunk, lo, hi, [(stage, key, staging folder), ...],
    batch_size)` and each returns `{"seconds": ..., "images": ...}`; by default they run here, in order.
    """
    n = len(probe)
    stagings = {id(j): _prepare_staging(store, j, n, chunk_size) for j in todo}
    n_chunks = (n + chunk_size - 1) // chunk_size
    started = time.time()
    timings = {"decode_and_forward_s": 0.0, "images_processed": 0}
    plan = []
    for c in range(n_chunks):
        lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
        need = [j for j in todo if not _chunk_file(stagings[id(j)], c).exists()]
        if need:
            plan.append((c, lo, hi, need))
    if run_chunks is not None and plan:
        # the batch size travels with each chunk: the worker must cut the same batches
        for done in run_chunks([(c, lo, hi, [(j.stage, j.key, str(stagings[id(j)]))
                                             for j in need], int(batch_size))
                                for c, lo, hi, need in plan]):
            timings["decode_and_forward_s"] += done["seconds"]
            timings["images_processed"] += done["images"]
    else:
        bar = tqdm(total=n, desc="caching activations", unit="img", disable=not progress)
        bar.update(n - sum(hi - lo for _, lo, hi, _ in plan))
        for done_chunks, (c, lo, hi, need) in enumerate(plan):
            if stop_after_chunks is not None and done_chunks >= stop_after_chunks:
                raise SimulatedInterruption(f"stopped after {done_chunks} chunks")
            t0 = time.time()
            compute_chunk(probe, need, {id(j): stagings[id(j)] for j in need}, c, lo, hi,
                          batch_size=batch_size, num_workers=num_workers, device=device,
                          bar=bar)
            timings["decode_and_forward_s"] += time.time() - t0
            timings["images_processed"] += hi - lo
        bar.close()
    elapsed = time.time() - started
    for j in todo:
        _publish(store, j, stagings[id(j)], n_chunks, probe, timings, elapsed)


def compute_chunk(probe, need: list[CacheJob], stagings: dict, c: int, lo: int, hi: int, *,
                  batch_size: int, num_workers: int, device, bar=None) -> None:
    """Images `lo:hi` (chunk `c`) through every consumer of `need`; saves each job's chunk file
    into its staging folder (`stagings[id(job)]`), atomically."""
    consumers = list({id(j.consumer): j.consumer for j in need}.values())
    loader = DataLoader(_DecodeOnce(probe, list(range(lo, hi)), [cn.preprocess for cn in consumers]),
                        **loader_kwargs(device, batch_size=batch_size, num_workers=num_workers))
    parts: dict[tuple[int, str], list[torch.Tensor]] = {}
    with torch.inference_mode():
        for batch in loader:
            for cn, x in zip(consumers, batch):
                outs = cn(x.to(device, non_blocking=True))
                for name, value in outs.items():
                    parts.setdefault((id(cn), name), []).append(value.float().cpu())
            if bar is not None:
                bar.update(len(batch[0]))
    for j in need:
        got = parts.get((id(j.consumer), j.output))
        if got is None:
            raise RuntimeError(f"consumer {j.consumer.name!r} produced no output {j.output!r}")
        save_tensors({"values": torch.cat(got)}, _chunk_file(stagings[id(j)], c))


def loader_kwargs(device, *, batch_size: int, num_workers: int) -> dict:
    """The DataLoader settings of a decode pass feeding `device`: in order, and with pinned
    batches only for CUDA, so that the `non_blocking=True` copies are asynchronous.

    >>> loader_kwargs("cpu", batch_size=8, num_workers=0)["pin_memory"]
    False
    """
    return {"batch_size": batch_size, "num_workers": num_workers, "shuffle": False,
            "pin_memory": pins_memory(device)}


def _publish(store, job: CacheJob, staging: Path, n_chunks: int, probe, timings, elapsed) -> None:
    """Stream a job's chunks into the artifact's one file, add top ids, publish it atomically.

    Memory is one chunk (plus the [K, top_k] top lists), not the layer: the file is written
    block by block (`tensor_stream.SafetensorsStream`) and the top images merged per chunk
    (`RunningTopK`: equal values by ascending image index)."""
    files = [_chunk_file(staging, c) for c in range(n_chunks)]
    shapes = []
    for f in files:  # headers only: the row counts must add up before anything is written
        with safe_open(str(f), framework="pt") as fh:
            shapes.append(tuple(fh.get_slice("values").get_shape()))
    n, width = sum(s[0] for s in shapes), (shapes[0][1:] if shapes else ())
    if n != len(probe) or any(s[1:] != width for s in shapes):
        raise RuntimeError(f"{job.output}: chunks hold {n} rows of shapes {sorted(set(shapes))} "
                           f"for {len(probe)} images")
    specs = {"activations": (torch.float32, (n, *width))}
    k = min(job.top_k, n) if job.top_k else 0
    if k:
        specs["top_ids"] = (torch.int64, (width[0], k))
        specs["top_values"] = (torch.float32, (width[0], k))
    top, nonfinite = RunningTopK(k), 0
    # read by the writer when the block ends, so the count below reaches the manifest
    extra = {**job.extra, "output": job.output, "consumer": job.consumer.name,
             "shape": [n, *width], "nonfinite_values": 0, "top_k": k, "probe": probe.describe(),
             "skipped_images": [list(s) for s in probe.skipped],
             "timings": {**timings, "pass_seconds": round(elapsed, 3)}}
    with store.writer(job.stage, job.key, version=job.version, params=job.params,
                      inputs=job.inputs, upstream=job.upstream, resume=True, extra=extra) as tmp:
        with SafetensorsStream(tmp / "activations.safetensors", specs) as out:
            for f in files:
                values = load_file(str(f))["values"]
                out.write("activations", values)
                nonfinite += int((~torch.isfinite(values)).sum())
                if k:
                    top.update(values)
            if k:
                out.write("top_ids", top.indices())
                out.write("top_values", top.values())
        extra["nonfinite_values"] = nonfinite
        _write_image_table(probe, tmp / "images.csv")
        shutil.rmtree(tmp / "chunks", ignore_errors=True)
        (tmp / "plan.json").unlink(missing_ok=True)


def _write_image_table(probe, path: Path) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "path", "label", "class_index", "source", "sha256"])
    for i, it in enumerate(probe.items):
        w.writerow([i, it.path, "" if it.label is None else it.label,
                    "" if getattr(it, "class_index", None) is None else it.class_index,
                    it.source, it.sha256])
    atomic_write_text(path, buf.getvalue())
