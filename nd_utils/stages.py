"""The numbered pipeline stages: notebook, version and the config fields each one reads.

A stage's output key is `hash(stage name, version, the fields below, content inputs, upstream
keys)`: changing a field a stage reads changes its key and every downstream key; changing any
other field changes nothing. Bump `version` whenever a stage's output format or numerics change,
so that older cache folders are recomputed rather than reused.

Every stage output goes through one mechanism: `stage_output` gathers what decides it (params,
the keys of the stages in `Stage.upstream`, content inputs) into a `StageOutput`, whose key and
manifest both come from that one record; `cached_stage` opens it when it exists and otherwise
runs the body once, under the key's lock, and publishes what it wrote.

Example:
    >>> out = stage_output("03_captions", {"captioner.name": "keywords", "layer": "fc"},
    ...                    upstream={"03_top_images": "0123abcd0123abcd"})
    >>> len(out.key)
    16
    >>> art = cached_stage(store, out, lambda tmp: write_captions(tmp))   # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import NdUtilsError, unknown_name
from .store import Artifact, ArtifactStore


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


_TRUST_READS = ("seed", "clip_dissect.similarity", "clip_dissect.hyperparameters",
                "quality.cosy_prompt", "synthesis.name", "synthesis.model", "synthesis.steps",
                "synthesis.scheduler", "synthesis.guidance_scale", "synthesis.height",
                "synthesis.width", "target.name", "target.pooling")

STAGES: dict[str, Stage] = {s.name: s for s in [
    # v2: top images merged chunk by chunk, equal activations by ascending image index and NaN
    # last (torch.topk over the whole layer left ties unspecified and put NaN first)
    Stage("01_activation_caching", "01_activation_caching.ipynb", version=2,
          reads=("target.name", "target.pooling", "probe.sets", "probe.limit",
                 "activations.top_k")),
    # the vision-language image features share stage 01's decode-once pass over the probe set
    Stage("01_image_features", "01_activation_caching.ipynb", version=1,
          reads=("vlm.name", "probe.sets", "probe.limit")),
    Stage("02_text_features", "02_clip_dissect.ipynb", version=1,
          reads=("vlm.name", "clip_dissect.concept_set", "clip_dissect.clean",
                 "clip_dissect.template")),
    # v2: rank_reorder floors pairs with mean cosine <= 0 (was NaN, ranked first); label
    # tables rank NaN last and break ties by concept index
    Stage("02_clip_dissect", "02_clip_dissect.ipynb", version=2,
          reads=("clip_dissect.similarity", "clip_dissect.hyperparameters"),
          upstream=("01_activation_caching", "01_image_features", "02_text_features")),
    # a held-out trust score for every label (label_trust): keyed by the trust settings (added
    # from `trust:` by TrustSettings.key_params) and by the labels' inputs, so changing a trust
    # setting recomputes no label; the synthesis fields decide CoSy's images
    Stage("02_label_trust", "02_clip_dissect.ipynb", version=1,
          reads=_TRUST_READS,
          upstream=("01_activation_caching", "01_image_features", "02_text_features")),
    # Describe-and-Dissect (03-06); keys also carry the layer and the chosen neurons
    # version 4: maps of torchvision-preset targets (ResNet-50) cover the whole image
    Stage("03_top_images", "03_captions.ipynb", version=4,
          reads=("dnd.top_k", "dnd.crops", "target.pooling"),
          upstream=("01_activation_caching",)),
    Stage("03_captions", "03_captions.ipynb", version=1,
          reads=("captioner.name", "captioner.model", "captioner.checkpoint",
                 "captioner.max_new_tokens"),
          upstream=("03_top_images",)),
    # v3: the background rule adds "<c> background" beside <c> (it replaced it); llm.guards
    Stage("04_concepts", "04_concepts.ipynb", version=3,
          reads=("llm.name", "llm.model", "llm.temperature", "llm.max_new_tokens",
                 "llm.summaries", "llm.prompts", "llm.guards", "seed"),
          upstream=("03_captions",)),
    # one artifact per (backend, model, prompt, settings, seed): shared by neurons and runs
    Stage("05_concept_images", "05_synthesis.ipynb", version=1,
          reads=("synthesis.name", "synthesis.model", "synthesis.prompt",
                 "synthesis.images_per_concept", "synthesis.steps", "synthesis.scheduler",
                 "synthesis.guidance_scale", "synthesis.height", "synthesis.width", "seed")),
    Stage("06_concept_activations", "06_selection.ipynb", version=2,
          reads=("target.name", "target.pooling"),
          upstream=("05_concept_images",)),
    Stage("06_selection", "06_selection.ipynb", version=1,
          reads=("selection.scoring", "selection.beta", "selection.zeta", "selection.labels"),
          upstream=("03_top_images", "04_concepts", "06_concept_activations")),
    # DnD's Label 1 of each neuron, scored as 02_label_trust (its D_top images left out)
    Stage("06_label_trust", "06_selection.ipynb", version=1,
          reads=_TRUST_READS,
          upstream=("01_activation_caching", "01_image_features", "02_text_features",
                    "03_top_images", "06_selection")),
    # label quality: the labels judged (see labelling_config) are an input, hashed with the
    # settings that decide the CoSy images, the simulator and the held-out activations
    Stage("08_label_quality", "08_label_quality.ipynb", version=1,
          reads=("quality.probe_sets", "quality.split", "quality.cosy_prompt",
                 "quality.cosy_images", "seed", "target.name", "target.pooling", "vlm.name",
                 "synthesis.name", "synthesis.model", "synthesis.steps", "synthesis.scheduler",
                 "synthesis.guidance_scale", "synthesis.height", "synthesis.width")),
]}


def get_stage(name: str) -> Stage:
    """Look a stage up by full name (`01_activation_caching`) or number (`01`)."""
    if name in STAGES:
        return STAGES[name]
    for stage in STAGES.values():
        if stage.number == name:
            return stage
    raise unknown_name("stage", name, list(STAGES))


@dataclass(frozen=True)
class StageOutput:
    """What decides one output of a stage; its key and its manifest are both made from it.

    `params`: the config fields the stage reads, plus per-output fields (layer, neurons);
    `upstream`: {stage name: key, or a list of keys}, one entry per stage of `Stage.upstream`;
    `inputs`: content the config does not name (probe fingerprint, weights, prompt).
    """

    stage: Stage
    params: dict
    upstream: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """16 hex chars of sha256(stage, version, params, inputs, upstream)."""
        return ArtifactStore.key(self.stage.name, self.stage.version, self.params,
                                 upstream=self.upstream, inputs=self.inputs)


def stage_output(stage: "Stage | str", params: Mapping, *,
                 upstream: "Mapping[str, Any] | None" = None,
                 inputs: "Mapping | None" = None) -> StageOutput:
    """A `StageOutput`, checking that `upstream` names exactly the stages `Stage.upstream` lists.

    The check keeps the declaration and the keys in step: an upstream stage added to a key but
    not declared (or declared but left out of the key) is an error, not a silent cache mix-up.
    """
    stage = stage if isinstance(stage, Stage) else get_stage(stage)
    upstream = dict(upstream or {})
    if set(upstream) != set(stage.upstream):
        raise NdUtilsError(f"stage {stage.name} declares upstream {sorted(stage.upstream)} but "
                           f"its key was given {sorted(upstream)}: update Stage.upstream in "
                           f"nd_utils/stages.py or the caller")
    return StageOutput(stage, dict(params), upstream, dict(inputs or {}))


def cached_stage(store: ArtifactStore, out: StageOutput,
                 build: "Callable[[Path], Mapping | None]", *, force: bool = False,
                 resume: bool = False, extra: "Mapping | None" = None,
                 produced_by: str = "") -> Artifact:
    """The verified artifact of `out`; `build` runs only when it is not in the store yet.

    `build(tmp)` writes the output's files into the staging folder `tmp` and may return more
    manifest fields (e.g. counts known only after the work); `extra` adds fields known before.
    `force` removes the cached output first. `resume` hands an interrupted run's staging folder
    back to `build` as it is. Concurrent callers of one key build it once (`ArtifactStore.writer`).
    """
    name = out.stage.name
    if force:
        store.remove(name, out.key)
    if not store.exists(name, out.key):
        # under the key's lock, look again: a writer that held it (another worker wanting the
        # same concept) has published meanwhile, and its output is used, not built again
        with store.lock(name, out.key).acquire_context(
                wait_message=f"waiting for another process that is writing {name}/{out.key}"):
            if not store.exists(name, out.key):
                _build(store, out, build, resume, dict(extra or {}))
    return store.open(name, out.key, produced_by=produced_by)


def _build(store: ArtifactStore, out: StageOutput, build, resume: bool, fields: dict) -> None:
    name = out.stage.name
    # the writer reads `fields` after the body, so the fields that build returns count
    with store.writer(name, out.key, version=out.stage.version, params=out.params,
                      upstream=out.upstream, inputs=out.inputs, extra=fields,
                      resume=resume) as tmp:
        more = build(tmp)
        if more is not None and not isinstance(more, Mapping):
            raise TypeError(f"the body of stage {name} returned {type(more).__name__}: "
                            f"return a dict of manifest fields, or None")
        fields.update(more or {})
