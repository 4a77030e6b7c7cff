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

from pathlib import Path

import pandas as pd
from PIL import Image

from .backends.captioners import Captioner
from .backends.configured import load_captioner_from_config
from .config import Config
from .jsonl_cache import JsonlCache
from .stages import STAGES, StageOutput, cached_stage, stage_output
from .store import ArtifactStore, atomic_write_text
from .top_images import TopImages, image_sha256

STAGE = STAGES["03_captions"]


def caption_images(captioner: Captioner, images: list[Image.Image], hashes: list[str],
                   cache: JsonlCache, batch_size: int = 16) -> list[str]:
    """Captions of `images`, from `cache` when present (hashes = image content hashes)."""
    keys = [cache.key({"captioner": captioner.backend_id, "image": h}) for h in hashes]
    found = {k: cache.get(k) for k in dict.fromkeys(keys)}
    todo = [i for i, k in enumerate(keys) if found[k] is None]
    todo = list({keys[i]: i for i in todo}.values())  # one call per distinct image
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        for i, text in zip(chunk, captioner.caption([images[i] for i in chunk])):
            found[keys[i]] = cache.put(keys[i], {"captioner": captioner.backend_id,
                                                 "image": hashes[i]}, text)
    return [found[k]["answer"] for k in keys]


def caption_cache(data_dir: "str | Path") -> JsonlCache:
    return JsonlCache(Path(data_dir) / "cache" / "captions.jsonl")


def caption_output(cfg: Config, top: TopImages) -> StageOutput:
    return stage_output(STAGE, {**cfg.select(STAGE.reads), "layer": top.layer},
                        upstream={"03_top_images": top.key})


def caption_key(cfg: Config, top: TopImages) -> str:
    return caption_output(cfg, top).key


def cache_captions(cfg: Config, top: TopImages, captioner: "Captioner | None" = None,
                   force: bool = False) -> pd.DataFrame:
    """Stage 03b: captions of every D_top item of `top` as a DataFrame.

    Columns: layer, unit, rank, kind, image_id, file, caption. Each distinct image is captioned
    once (the caption cache is shared across neurons, layers and runs).
    """
    def build(tmp: Path) -> dict:
        nonlocal captioner
        captioner = captioner or load_captioner_from_config(cfg)
        rows = top.items[top.items.in_top].sort_values(["unit", "rank"])
        images = [top.image(f) for f in rows.file]
        cache = caption_cache(cfg.data_dir)
        captions = caption_images(captioner, images, [image_sha256(im) for im in images], cache,
                                  batch_size=int(cfg["captioner.batch_size"]))
        table = rows[["layer", "unit", "rank", "kind", "image_id", "file"]].copy()
        table["caption"] = captions
        atomic_write_text(tmp / "captions.csv", table.to_csv(index=False))
        return {"captioner": captioner.backend_id, "cache": cache.stats()}

    art = cached_stage(ArtifactStore(cfg.data_dir), caption_output(cfg, top), build, force=force)
    return pd.read_csv(art.file("captions.csv"), keep_default_na=False)
