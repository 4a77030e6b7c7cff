"""The numbered pipeline stages: notebook, version and the config fields each one reads.

A stage's output key is `hash(stage name, version, the fields below, content inputs, upstream
keys)`: changing a field a stage reads changes its key and every downstream key; changing any
other field changes nothing. Bump `version` whenever a stage's output format or numerics change,
so that older cache folders are recomputed rather than reused.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import unknown_name


@dataclass(frozen=True)
class Stage:
    name: str                  # also the artifact folder name
    notebook: str              # the notebook that produces this stage's outputs
    version: int
    reads: tuple[str, ...]     # dotted config fields that decide the output
    upstream: tuple[str, ...] = ()

    @property
    def number(self) -> str:
        return self.name[:2]


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("01_activation_caching", "01_activation_caching.ipynb", version=1,
          reads=("target.name", "target.pooling", "probe.sets", "probe.limit",
                 "activations.top_k")),
    # the vision-language image features share stage 01's decode-once pass over the probe set
    Stage("01_image_features", "01_activation_caching.ipynb", version=1,
          reads=("vlm.name", "probe.sets", "probe.limit")),
    Stage("02_text_features", "02_clip_dissect.ipynb", version=1,
          reads=("vlm.name", "clip_dissect.concept_set", "clip_dissect.clean",
                 "clip_dissect.template")),
    Stage("02_clip_dissect", "02_clip_dissect.ipynb", version=1,
          reads=("clip_dissect.similarity", "clip_dissect.hyperparameters"),
          upstream=("01_activation_caching", "01_image_features", "02_text_features")),
]}


def get_stage(name: str) -> Stage:
    """Look a stage up by full name (`01_activation_caching`) or number (`01`)."""
    if name in STAGES:
        return STAGES[name]
    for stage in STAGES.values():
        if stage.number == name:
            return stage
    raise unknown_name("stage", name, list(STAGES))
