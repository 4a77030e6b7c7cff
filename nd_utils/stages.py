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
    # v2: rank_reorder floors pairs with mean cosine <= 0 (was NaN, ranked first); label
    # tables rank NaN last and break ties by concept index
    Stage("02_clip_dissect", "02_clip_dissect.ipynb", version=2,
          reads=("clip_dissect.similarity", "clip_dissect.hyperparameters"),
          upstream=("01_activation_caching", "01_image_features", "02_text_features")),
    # Describe-and-Dissect (03-06); keys also carry the layer and the chosen neurons
    Stage("03_top_images", "03_captions.ipynb", version=3,
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
