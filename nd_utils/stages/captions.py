"""Stage 03b: captions of every D_top item, through the per-image caption cache.

Captions are cached in `<data_dir>/cache/captions.jsonl` by (captioner backend id, decoding
settings, image content hash): the same image is captioned once across neurons and runs. The
captioner backends themselves are in `nd_utils.backends.captioners`.

Example:
    >>> caps = cache_captions(cfg, top)                               # doctest: +SKIP
    >>> list(caps.columns)
    ['layer', 'unit', 'rank', 'kind', 'image_id', 'file', 'caption']
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pandas as pd
from PIL import Image

from ..backends.captioners import Captioner, checkpoint_file, file_sha256
from ..backends.configured import load_captioner_from_config
from ..config import Config
from ..context import run_context
from ..jsonl_cache import JsonlCache
from ..stage_cache import (Stage, register_stage, StageOutput, cached_stage, stage_output,
                           stage_params)
from ..store import atomic_write_text
from .top_images import TopImages, image_sha256

STAGE = register_stage(Stage("03_captions", "03_captions.ipynb", version=1,
                            reads=("captioner.name", "captioner.model", "captioner.checkpoint",
                                   "captioner.max_new_tokens"),
                            upstream=("03_top_images",)))


def caption_images(captioner: Captioner, images: list[Image.Image], hashes: list[str],
                   cache: JsonlCache, batch_size: int = 16, executor=None,
                   files: "list[Path] | None" = None, cfg: "Config | None" = None) -> list[str]:
    """Captions of `images`, from `cache` when present (hashes = image content hashes).

    The distinct missing images are captioned in batches of `batch_size`, in order, each batch
    cached as soon as it is done. With a Ray `executor` (plus the images' `files` and `cfg`, so
    that a worker can load both) each batch is one unit: the same batches as here, so the same
    captions wherever they run.
    """
    keys = [cache.key({"captioner": captioner.backend_id, "image": h}) for h in hashes]
    found = {k: cache.get(k) for k in dict.fromkeys(keys)}
    todo = [i for i, k in enumerate(keys) if found[k] is None]
    todo = list({keys[i]: i for i in todo}.values())  # one call per distinct image
    batches = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
    if executor is not None and executor.name != "local" and batches:
        units = [[(str(files[i]), hashes[i]) for i in chunk] for chunk in batches]
        executor.map(partial(caption_batch, cfg, captioner.backend_id, str(cache.path)), units,
                     desc="captions", progress=len(units) > 1)
    else:
        for chunk in batches:
            _caption_into(cache, captioner, [images[i] for i in chunk],
                          [hashes[i] for i in chunk])
    for k, rec in found.items():
        found[k] = rec or cache.get(k)
    return [found[k]["answer"] for k in keys]


def _caption_into(cache: JsonlCache, captioner: Captioner, images: list, hashes: list) -> None:
    for digest, text in zip(hashes, captioner.caption(images)):
        request = {"captioner": captioner.backend_id, "image": digest}
        cache.put(cache.key(request), request, text)


def caption_batch(cfg: Config, backend_id: str, cache_path: str,
                  batch: "list[tuple[str, str]]") -> int:
    """One Ray unit of stage 03b: caption a batch of (file, content hash) into the cache.

    The worker loads the configured captioner once per process; returns the batch size.
    """
    from ..executors import worker_model

    captioner = worker_model("captioner", cfg, lambda: load_captioner_from_config(cfg))
    if captioner.backend_id != backend_id:
        raise RuntimeError(f"worker captioner {captioner.backend_id} is not the driver's "
                           f"{backend_id}: install the same weights on every node")
    images = []
    for path, digest in batch:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
        if image_sha256(images[-1]) != digest:
            raise RuntimeError(f"{path} changed since the driver hashed it")
    # one cache object per worker process: a fresh one would parse the whole file per batch
    cache = worker_model(f"caption cache {cache_path}", cfg, lambda: JsonlCache(cache_path))
    _caption_into(cache, captioner, images, [d for _, d in batch])
    return len(batch)


def captioner_identity(cfg: Config, _unit=None) -> str:
    """The configured captioner's `backend_id`, loaded on (and kept by) the worker."""
    from ..executors import worker_model

    return worker_model("captioner", cfg, lambda: load_captioner_from_config(cfg)).backend_id


class _RemoteCaptioner:
    """The driver's view of a captioner that only Ray workers load: its identity."""

    def __init__(self, backend_id: str):
        self.backend_id = backend_id

    def caption(self, images):
        raise RuntimeError("this captioner runs on Ray workers (caption_batch), not here")


def caption_cache(data_dir: "str | Path") -> JsonlCache:
    return JsonlCache(Path(data_dir) / "cache" / "captions.jsonl")


def caption_output(cfg: Config, top: TopImages) -> StageOutput:
    inputs = {}
    captioner = run_context(cfg).settings.captioner
    checkpoint = captioner.checkpoint if captioner.name == "blip" else None
    weights_file = checkpoint_file(checkpoint) if checkpoint else None
    if weights_file is not None:  # new bytes at the same path are other weights: another key
        inputs["checkpoint_sha256"] = file_sha256(weights_file)
    params = {**stage_params(cfg, STAGE), "layer": top.layer}
    return stage_output(STAGE, params, inputs=inputs,
                        upstream={"03_top_images": top.key})


def caption_key(cfg: Config, top: TopImages) -> str:
    return caption_output(cfg, top).key


def cache_captions(cfg: Config, top: TopImages, captioner: "Captioner | None" = None,
                   force: bool = False) -> pd.DataFrame:
    """Stage 03b: captions of every D_top item of `top` as a DataFrame.

    Columns: layer, unit, rank, kind, image_id, file, caption. Each distinct image is captioned
    once (the caption cache is shared across neurons, layers and runs).
    """
    ctx = run_context(cfg)

    def build(tmp: Path) -> dict:
        nonlocal captioner
        ex = ctx.executor
        if captioner is None:  # on Ray only a worker loads it: the driver needs its identity
            captioner = load_captioner_from_config(cfg) if ex.name == "local" else \
                _RemoteCaptioner(ex.map(partial(captioner_identity, cfg), [0],
                                        desc="load captioner", progress=False)[0])
        rows = top.items[top.items.in_top].sort_values(["unit", "rank"])
        images = [top.image(f) for f in rows.file]
        cache = caption_cache(cfg.data_dir)
        captions = caption_images(captioner, images, [image_sha256(im) for im in images], cache,
                                  batch_size=int(ctx.settings.captioner.batch_size), executor=ex,
                                  files=[top.path / f for f in rows.file], cfg=cfg)
        table = rows[["layer", "unit", "rank", "kind", "image_id", "file"]].copy()
        table["caption"] = captions
        atomic_write_text(tmp / "captions.csv", table.to_csv(index=False))
        return {"captioner": captioner.backend_id, "cache": cache.stats(),
                "executor": ex.describe()}

    art = cached_stage(ctx.store, caption_output(cfg, top), build, force=force)
    return pd.read_csv(art.file("captions.csv"), keep_default_na=False)
