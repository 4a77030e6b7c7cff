"""Types, ranges and choices of every config key, checked before any stage runs.

One pydantic model per config section. `validate_config` checks a whole config mapping and raises
one ConfigError listing every problem, one per line, as `dotted.key: got VALUE; expected WHAT`,
followed by a line saying where to fix it. Values are only checked, never rewritten, so the
content-addressed cache keys built from the config do not change. Unknown keys are errors; absent
keys are not (Config.__getitem__ names them when a stage reads them).

Example:
    >>> validate_config({"seed": "one", "device": "tpu"}, "my.yaml")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nd_utils.errors.ConfigError: seed: got 'one'; expected a whole number, e.g. 0
    device: got 'tpu'; expected auto, cpu, cuda, cuda:N (N = GPU index, e.g. cuda:0) or mps
    (2 invalid config value(s) in my.yaml after overrides: ...)
"""
from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal, Mapping, Optional, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .config_values import (BACKEND_SECTIONS, UNION_TAGS, Neurons, PosInt, Similarity, Text, Unit,
                            check_device, check_gpus, check_image_side, check_module_name,
                            check_path, check_prompt, check_prompt_version, check_template,
                            check_top_n, expect, one_of)
from .errors import ConfigError, closest


_BATCH = "a whole number >= 1 (items per batch)"
_TOKENS = "a whole number >= 1 (tokens generated per answer)"
_SECTION = "a mapping of settings, as in configs/offline.yaml"
_MODEL = "null or a model name, hub id or folder (text)"


# ------------------------------------------------------------------ one model per section
class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _BackendSection(_Section):
    """The section of a backend family (`config_values.BACKEND_SECTIONS`): the keys every backend
    of the family has, then a backend's own keys (extra keys, checked against its loader's
    parameters by `_backend_keys` and passed to it by its `*_from_config`)."""
    model_config = ConfigDict(strict=True, extra="allow")


class ProbeSpec(BaseModel):
    """`{name: ..., **parameters}`; the parameters depend on the probe set (path, ...)."""
    model_config = ConfigDict(strict=True, extra="allow")
    name: Annotated[str, one_of("probe set", "probe_set")] = expect(
        "a probe set name (see nd_utils.list_probes())")


ProbeSets = Annotated[list[ProbeSpec], Field(min_length=1)]
_SETS = "a non-empty list of probe sets, e.g. [{name: offline-sample}]"


class Target(_BackendSection):
    name: Text = expect("a target model name such as efficientnet-lite0, resnet50:IMAGENET1K_V1 "
                    "or timm:<model> (see nd_utils.list_targets())")
    layers: Annotated[list[Text], Field(min_length=1)] = expect(
        "a non-empty list of layer names in brackets, e.g. [head, fc]")
    pooling: Literal["avg", "max", "cls"] = expect("avg, max or cls (cls: token sequences only)")


class Probe(_Section):
    sets: ProbeSets = expect(_SETS)
    limit: Optional[PosInt] = expect("null (all images) or a whole number >= 1, e.g. 40")


class Activations(_Section):
    top_k: PosInt = expect("a whole number >= 1 (top image ids stored per neuron)")
    batch_size: PosInt = expect(_BATCH)
    chunk_size: PosInt = expect("a whole number >= 1 (images per resumable chunk)")
    num_workers: Annotated[int, Field(ge=0)] = expect(
        "a whole number >= 0 (DataLoader workers; 0 = decode in the main process)")


class Vlm(_BackendSection):
    name: Annotated[str, Field(pattern=r"^(conse|open_clip:[^:]+:[^:]+)$")] = expect(
        "conse or open_clip:<model>:<pretrained>, e.g. open_clip:ViT-B-16:openai")
    batch_size: PosInt = expect(_BATCH)
    # a config written before the key existed means float32, as it computed then
    dtype: Literal["float32", "float16", "bfloat16"] = expect(
        "float32, float16 or bfloat16 (the VLM's compute precision; conse: float32 only)",
        default="float32")


class Clean(_Section):
    """Keyword arguments of `load_concept_set`; absent ones take its defaults."""
    dedupe: Optional[bool] = expect(
        "true, false or null (true except for index-aligned class lists)",
                                default=None)
    drop_stopwords: bool = expect("true or false", default=False)
    drop_profanity: bool = expect("true or false", default=False)
    allow_download: bool = expect("true or false", default=True)
    cache_dir: Optional[str] = expect("null or a folder path (text)", default=None)
    local_dir: Optional[str] = expect("null or a folder path (text)", default=None)


class ClipDissect(_Section):
    concept_set: Text = expect("a concept set name (see nd_utils.list_concept_sets()) or the path "
                           "of a text file with one concept per line")
    clean: Optional[Clean] = expect(
        "null or {dedupe: ..., drop_stopwords: ..., drop_profanity: ...}")
    template: Annotated[Optional[str], AfterValidator(check_template)] = expect(
        "null (the raw word) or text with {} where the concept goes, e.g. 'a photo of {}'")
    similarity: Similarity = expect("a similarity function name (see nd_utils.list_similarities())")
    hyperparameters: Optional[dict[str, Any]] = expect(
        "null or a mapping of keyword arguments of the similarity function, e.g. {top_k: 50}")
    top_n: Annotated[int, AfterValidator(check_top_n)] = expect("a whole number >= 1")


class Evaluation(_Section):
    probe_sets: ProbeSets = expect(_SETS)
    layer: Text = expect("a layer name (text), e.g. fc")
    concept_sets: Annotated[list[Text], Field(min_length=1)] = expect(
        "a non-empty list of concept set names or file paths, e.g. [imagenet_classes, words-10k]")
    similarities: Annotated[list[Similarity], Field(min_length=1)] = expect(
        "a non-empty list of similarity function names, e.g. [soft_wpmi, wpmi]")
    sentence_model: Text = expect("a sentence-transformers model name or folder")


class Quality(_Section):
    probe_sets: ProbeSets = expect("a list of one probe set, e.g. [{name: imagenet-sample-1k}]")
    split: dict[Text, Unit] = expect("fractions of the probe per part adding up to 1, e.g. "
                                 "{select: 0.4, pool: 0.2, calibrate: 0.1, test: 0.3}")
    cosy_prompt: Annotated[str, AfterValidator(check_prompt)] = expect(
        "text with {concept}, e.g. 'realistic photo of a close up of {concept}'")
    cosy_images: PosInt = expect("a whole number >= 1 (images per label)")
    bootstrap: PosInt = expect("a whole number >= 1 (bootstrap resamples)")


class Trust(_Section):
    heldout: Annotated[float, Field(gt=0, lt=1)] = expect(
        "a fraction strictly between 0 and 1 (the part of the probe held out), e.g. 0.5")
    null_concepts: Annotated[int, Field(ge=10)] = expect(
        "a whole number >= 10 (random concepts behind each permutation p-value), e.g. 1000")
    alpha: Annotated[float, Field(gt=0, lt=1)] = expect(
        "a number strictly between 0 and 1 (trusted: Benjamini-Hochberg q below it), e.g. 0.05")
    cosy: bool = expect("true or false (compute cosy_auc: images of every distinct label)")
    cosy_images: PosInt = expect("a whole number >= 1 (images per label for cosy_auc)")


class Crops(_Section):
    size: PosInt = expect("a whole number >= 1 (pixels of the square image the crops come from)")
    max_per_image: Annotated[int, Field(ge=0)] = expect("a whole number >= 0 (crops per image)")
    iou_max: Unit = expect("a number from 0 to 1 (largest overlap between crops)")
    image_iou_max: Unit = expect("a number from 0 to 1 (largest overlap of a crop with its image)")


class Dnd(_Section):
    layers: Annotated[list[Text], Field(min_length=1)] = expect(
        "a non-empty list of layer names in brackets, e.g. [head, fc]")
    neurons: Neurons = expect("per layer {layer: count or list of unit ids}, or one count or list "
                          "for every layer, e.g. {head: 5, fc: [99, 305]}")
    top_k: PosInt = expect("a whole number >= 1 (|D_top|: top images per neuron)")
    crops: Crops = expect("{size: ..., max_per_image: ..., iou_max: ..., image_iou_max: ...}")


class Captioner(_BackendSection):
    name: Annotated[str, one_of("captioner", "captioner")] = expect(
        "a captioner name (see nd_utils.list_captioners())")
    model: Optional[str] = expect(_MODEL)
    checkpoint: Optional[str] = expect("null or the path of other weights (text)")
    max_new_tokens: PosInt = expect(_TOKENS)
    batch_size: PosInt = expect(_BATCH)


class Llm(_BackendSection):
    name: Annotated[str, one_of("language model", "language_model")] = expect(
        "a language model backend (see nd_utils.list_language_models())")
    model: Optional[str] = expect(_MODEL)
    temperature: Annotated[float, Field(ge=0)] = expect("a number >= 0 (0 = greedy), e.g. 0.3")
    max_new_tokens: PosInt = expect(_TOKENS)
    summaries: PosInt = expect("a whole number >= 1 (summarise calls per neuron)")
    prompts: Annotated[str, AfterValidator(check_prompt_version)] = expect(
        "a prompt template version, e.g. v1")
    mode: Literal["live", "replay"] = expect("live or replay (answers only from the cache)")
    guards: Literal["reference", "strict"] = expect(
        "reference (re-ask once on commas, keep the second answer) or strict (also reject "
        "empty, garbled, over-long and example-copying answers)")


class Synthesis(_BackendSection):
    name: Annotated[str, one_of("synthesis backend", "synthesizer")] = expect(
        "a synthesis backend: diffusers or retrieve")
    model: Optional[str] = expect("null or a diffusers pipeline id or folder (text)")
    prompt: Annotated[str, AfterValidator(check_prompt)] = expect(
        "text with {concept}, e.g. 'One realistic image of {concept}'")
    images_per_concept: PosInt = expect("a whole number >= 1")
    steps: PosInt = expect("a whole number >= 1 (denoising steps)")
    scheduler: Literal["dpm-multistep", "default"] = expect("dpm-multistep or default")
    guidance_scale: Annotated[float, Field(ge=0)] = expect("a number >= 0, e.g. 7.5")
    height: Annotated[Optional[int], AfterValidator(check_image_side)] = expect(
        "null or a multiple of 8 pixels")
    width: Annotated[Optional[int], AfterValidator(check_image_side)] = expect(
        "null or a multiple of 8 pixels")
    batch_size: PosInt = expect(_BATCH)
    pool: ProbeSets = expect(_SETS)


class Selection(_Section):
    scoring: Annotated[str, one_of("scoring function", "scoring")] = expect(
        "a scoring function name (see nd_utils.scoring.list_scorings())")
    beta: PosInt = expect("a whole number >= 1 (ranks averaged by topk-sq-mean)")
    zeta: PosInt = expect("a whole number >= 1 (global top images for image-products)")
    labels: PosInt = expect("a whole number >= 1 (labels kept per neuron)")


class Executor(_Section):
    name: Annotated[str, one_of("executor", "executor")] = expect(
        "local (in this process) or ray (Ray tasks; see nd_utils.list_executors())")
    address: Optional[str] = expect("null (a local Ray instance), auto or HOST:PORT of a running "
                                "cluster (text)", default=None)
    num_cpus: Optional[PosInt] = expect("null (all) or a whole number >= 1 (CPUs of a local Ray "
                                    "instance)", default=None)
    gpus_per_task: Annotated[Any, AfterValidator(check_gpus)] = expect(
        "auto (1 when the cluster has GPUs, else 0) or a number >= 0", default="auto")
    max_retries: Annotated[int, Field(ge=0)] = expect(
        "a whole number >= 0 (retries of a task whose worker died)", default=2)
    threads: Optional[PosInt] = expect("null or a whole number >= 1 (CPU threads per unit)",
                                   default=None)


class Schema(_Section):
    """The whole configuration (`configs/*.yaml` after overrides)."""
    profile: Text = expect("a profile name (text)")
    seed: int = expect("a whole number, e.g. 0")
    device: Annotated[str, AfterValidator(check_device)] = expect("auto, cpu, cuda, cuda:N or mps")
    data_dir: Annotated[Any, AfterValidator(check_path)] = expect("a folder path")
    plugins: list[Annotated[str, AfterValidator(check_module_name)]] = expect(
        "a list of importable module names in brackets, e.g. [my_package.nd_plugins]",
        default_factory=list)
    target: Target = expect(_SECTION)
    probe: Probe = expect(_SECTION)
    activations: Activations = expect(_SECTION)
    vlm: Vlm = expect(_SECTION)
    clip_dissect: ClipDissect = expect(_SECTION)
    evaluation: Evaluation = expect(_SECTION)
    quality: Quality = expect(_SECTION)
    trust: Optional[Trust] = expect(_SECTION, default=None)
    dnd: Dnd = expect(_SECTION)
    captioner: Captioner = expect(_SECTION)
    llm: Llm = expect(_SECTION)
    synthesis: Synthesis = expect(_SECTION)
    selection: Selection = expect(_SECTION)
    executor: Optional[Executor] = expect(_SECTION, default=None)


# ------------------------------------------------------------------ checks across keys
def _cross_checks(cfg: Schema, names: Mapping) -> list[tuple[tuple, Any, str]]:
    """Rules tying two keys together, as (location, value, expected) triples."""
    out = []
    neurons = cfg.dnd.neurons
    if isinstance(neurons, dict):
        missing = [layer for layer in cfg.dnd.layers if layer not in neurons]
        if missing:
            out.append((("dnd", "neurons"), neurons, f"an entry for every layer of dnd.layers "
                        f"(missing: {', '.join(missing)}), or one count or list for all layers"))
    accepted = (names.get("similarity_keywords") or {}).get(cfg.clip_dissect.similarity)
    for name, value in (cfg.clip_dissect.hyperparameters or {}).items():
        if accepted is not None and name not in accepted:
            out.append((("clip_dissect", "hyperparameters", name), value,
                        f"a keyword of {cfg.clip_dissect.similarity}: one of "
                        f"{', '.join(accepted)}"))
    out += _backend_keys(cfg, names)
    parts = {"select", "pool", "calibrate", "test"}
    if cfg.quality is not None and (set(cfg.quality.split) != parts
                                    or abs(sum(cfg.quality.split.values()) - 1) > 1e-6):
        out.append((("quality", "split"), cfg.quality.split,
                    "fractions for select, pool, calibrate and test adding up to 1"))
    if cfg.synthesis.name == "diffusers" and not cfg.synthesis.model:
        out.append((("synthesis", "model"), cfg.synthesis.model,
                    "a diffusers pipeline id or folder when synthesis.name is diffusers, "
                    "e.g. CompVis/stable-diffusion-v1-4"))
    return out


def _backend_keys(cfg: Schema, names: Mapping) -> list[tuple]:
    """The extra keys of each backend family's section that its backend's loader does not take,
    as unknown keys (a loader with **kwargs takes all but a near-copy of a schema key: a typo);
    a family is unchecked without its loaders' parameters (`<family>_parameters`) in `names`."""
    out = []
    for section_name, names_key in BACKEND_SECTIONS.items():
        section = getattr(cfg, section_name)
        extra = section.model_extra or {}
        table = names.get(f"{names_key}_parameters") if extra else None
        found = table.get(section.name) if table is not None else None
        if found is None:
            continue
        accepted, takes_any = found
        fields = list(type(section).model_fields)
        for key, value in extra.items():
            typo = key not in accepted and difflib.get_close_matches(key, fields, n=1, cutoff=0.8)
            if (takes_any and not typo) or key in accepted:
                continue
            near = closest(key, [*fields, *sorted(accepted)], n=3)
            out.append(((section_name, key), value, "no such key: remove it" + (
                f", or did you mean {' / '.join(near)}?" if near else ""), "extra_forbidden"))
    return out


# ------------------------------------------------------------------ errors -> one message
def _model_in(annotation: Any) -> "type[BaseModel] | None":
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _walk(loc: tuple) -> "tuple[Any, str]":
    """The schema type at `loc` and the description of the deepest field on the way."""
    node, text = Schema, ""
    for part in loc:
        model = _model_in(node)
        if model is not None and isinstance(part, str) and part in model.model_fields:
            field = model.model_fields[part]
            text, node = field.description or text, field.annotation
    return node, text


def _line(loc: tuple, value: Any, expected: str, kind: str = "") -> str:
    key = ".".join(str(p) for p in loc if p not in UNION_TAGS)
    if kind == "extra_forbidden":
        return f"{key}: unknown key (value {_show(value)}); expected {expected}"
    fix = f"; write {key}=[{value}]" if kind == "list_type" and isinstance(value, str) else ""
    return f"{key}: got {_show(value)}; expected {expected}{fix}"


def _show(value: Any) -> str:
    if value is None or isinstance(value, bool):  # as written in YAML
        return "null" if value is None else str(value).lower()
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _problem(err: dict) -> str:
    loc, kind = tuple(err["loc"]), err["type"]
    if kind == "value_error":  # our own checks phrase their message as the expectation
        expected = str(err["ctx"]["error"])
    elif kind == "extra_forbidden":
        parent = _model_in(_walk(loc[:-1])[0])
        near = closest(str(loc[-1]), parent.model_fields if parent else [], n=3)
        expected = "no such key: remove it" + (f", or did you mean {' / '.join(near)}?"
                                               if near else "")
    else:
        expected = _walk(loc)[1] or err["msg"]
    return _line(loc, err.get("input"), expected, kind)


def validate_config(data: Mapping, source: str = "<dict>",
                    names: "Mapping | None" = None) -> "Schema | None":
    """Check types, ranges and choices of every key of `data`; ConfigError lists every problem.

    Each line names the dotted key, the value found and what is expected; the last line names
    `source` and the two ways to fix a value (edit the file or `--set key=value`). `names`
    ({family: registered names}, see config_values.NAME_FAMILIES) checks the names a config
    chooses; without it names are only typed. Returns the settings, or None when keys are absent (a run folder
    saved before a key existed: Config names an absent key when a stage reads it).
    """
    names = dict(names or {})
    settings = None
    try:
        settings = Schema.model_validate(dict(data), context={"names": names})
        problems = [_line(*p) for p in _cross_checks(settings, names)]
    except ValidationError as exc:
        problems = list(dict.fromkeys(_problem(e) for e in exc.errors() if e["type"] != "missing"))
    if problems:
        problems.append(f"({len(problems)} invalid config value(s) in {source} after overrides: "
                        f"correct them in that file or with --set key=value)")
        raise ConfigError("\n".join(problems))
    return settings
