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

import importlib
import inspect
import os
import re
from typing import Annotated, Any, Literal, Mapping, Optional, Union, get_args

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag,
                      ValidationError)

from .errors import ConfigError, closest


# ------------------------------------------------------------------ value checks
def _one_of(kind: str, choices) -> AfterValidator:
    """A name that must be in `choices()` (read when validating, so registries stay the truth)."""
    def check(value: str) -> str:
        valid = list(choices())
        if value not in valid:
            near = closest(value, valid, n=1)
            hint = f" (closest: {near[0]})" if near else ""
            article = "an" if kind[0] in "aeiou" else "a"
            raise ValueError(f"{article} {kind}: one of {', '.join(valid)}{hint}")
        return value
    return AfterValidator(check)


def _registry(module: str, attr: str):
    """Names registered as nd_utils.<module>.<attr> (a dict, or a function listing them).

    Imported when validating, not here: those modules import torch and import this one.
    """
    def names() -> list:
        found = getattr(importlib.import_module(f".{module}", __package__), attr)
        return list(found() if callable(found) else found)
    return names


_similarities = _registry("similarity", "list_similarities")
_scorings = _registry("selection", "list_scorings")
_captioners = _registry("backends.captioners", "list_captioners")
_language_models = _registry("backends.language_models", "list_language_models")
_synthesizers = _registry("backends.synthesizers", "list_synthesizers")
_probe_sets = _registry("probes", "list_probes")
_executors = _registry("executors", "list_executors")


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise ValueError("auto, cpu, cuda, cuda:N (N = GPU index, e.g. cuda:0) or mps")
    return value


def _neuron_spec(value: Any) -> Any:
    is_int = lambda u: isinstance(u, int) and not isinstance(u, bool)  # noqa: E731
    if (is_int(value) and value >= 1) or (isinstance(value, list) and value
                                          and all(is_int(u) and u >= 0 for u in value)):
        return value
    raise ValueError("a count >= 1 (the first N units) or a non-empty list of unit ids >= 0, "
                     "e.g. 5 or [0, 7, 12]")


def _top_n(value: int) -> int:
    from .clip_dissect import STORED_TOP
    if not 1 <= value <= STORED_TOP:
        raise ValueError(f"a whole number from 1 to {STORED_TOP} (concepts stored per neuron)")
    return value


def _prompt_version(value: str) -> str:
    from .backends.language_models import list_templates
    tasks = ("simplify", "summarize", "reask")
    found = set(list_templates())
    versions = sorted({t.split(".", 1)[1] for t in found if "." in t})
    if not all(f"{task}.{value}" in found for task in tasks):
        raise ValueError(f"a prompt template version with nd_utils/prompts/"
                         f"{{{','.join(tasks)}}}.<version>.txt: one of {', '.join(versions)}")
    return value


def _template(value: Optional[str]) -> Optional[str]:
    if value is not None and "{}" not in value:
        raise ValueError("null (the raw word) or text with {} where the concept goes, "
                         "e.g. 'a photo of {}'")
    return value


def _prompt(value: str) -> str:
    try:
        value.format(concept="x")
        ok = "{concept}" in value
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        raise ValueError("text with {concept} where the concept goes and no other {...}, "
                         "e.g. 'One realistic image of {concept}'")
    return value


def _image_side(value: Optional[int]) -> Optional[int]:
    if value is not None and (value < 8 or value % 8):
        raise ValueError("null (the pipeline's resolution) or a multiple of 8 pixels, e.g. 512")
    return value


def _path(value: Any) -> Any:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError("a folder path, e.g. data or /scratch/nd-data")
    return value


def _gpus(value: Any) -> Any:
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                           and value >= 0):
        return value
    raise ValueError("auto or a number >= 0")


def _f(expected: str, **constraints) -> Any:
    """A field whose description is the `expected` text of its error line."""
    return Field(description=expected, **constraints)


PosInt = Annotated[int, Field(ge=1)]
Text = Annotated[str, Field(min_length=1)]
Unit = Annotated[float, Field(ge=0, le=1)]
NeuronSpec = Annotated[Any, AfterValidator(_neuron_spec)]
_TAGS = ("per-layer", "all-layers")  # union tags: dropped from error locations
Neurons = Annotated[
    Union[Annotated[dict[str, NeuronSpec], Tag(_TAGS[0])], Annotated[NeuronSpec, Tag(_TAGS[1])]],
    Discriminator(lambda v: _TAGS[0] if isinstance(v, dict) else _TAGS[1])]
Similarity = Annotated[str, _one_of("similarity function", _similarities)]

_BATCH = "a whole number >= 1 (items per batch)"
_TOKENS = "a whole number >= 1 (tokens generated per answer)"
_SECTION = "a mapping of settings, as in configs/offline.yaml"
_MODEL = "null or a model name, hub id or folder (text)"


# ------------------------------------------------------------------ one model per section
class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ProbeSpec(BaseModel):
    """`{name: ..., **parameters}`; the parameters depend on the probe set (path, ...)."""
    model_config = ConfigDict(strict=True, extra="allow")
    name: Annotated[str, _one_of("probe set", _probe_sets)] = _f(
        "a probe set name (see nd_utils.list_probes())")


ProbeSets = Annotated[list[ProbeSpec], Field(min_length=1)]
_SETS = "a non-empty list of probe sets, e.g. [{name: offline-sample}]"


class Target(_Section):
    name: Text = _f("a target model name such as efficientnet-lite0, resnet50:IMAGENET1K_V1 "
                    "or timm:<model> (see nd_utils.list_targets())")
    layers: Annotated[list[Text], Field(min_length=1)] = _f(
        "a non-empty list of layer names in brackets, e.g. [head, fc]")
    pooling: Literal["avg", "max", "cls"] = _f("avg, max or cls (cls: token sequences only)")


class Probe(_Section):
    sets: ProbeSets = _f(_SETS)
    limit: Optional[PosInt] = _f("null (all images) or a whole number >= 1, e.g. 40")


class Activations(_Section):
    top_k: PosInt = _f("a whole number >= 1 (top image ids stored per neuron)")
    batch_size: PosInt = _f(_BATCH)
    chunk_size: PosInt = _f("a whole number >= 1 (images per resumable chunk)")
    num_workers: Annotated[int, Field(ge=0)] = _f(
        "a whole number >= 0 (DataLoader workers; 0 = decode in the main process)")


class Vlm(_Section):
    name: Annotated[str, Field(pattern=r"^(conse|open_clip:[^:]+:[^:]+)$")] = _f(
        "conse or open_clip:<model>:<pretrained>, e.g. open_clip:ViT-B-16:openai")
    batch_size: PosInt = _f(_BATCH)
    # a config written before the key existed means float32, as it computed then
    dtype: Literal["float32", "float16", "bfloat16"] = _f(
        "float32, float16 or bfloat16 (the VLM's compute precision; conse: float32 only)",
        default="float32")


class Clean(_Section):
    """Keyword arguments of `load_concept_set`; absent ones take its defaults."""
    dedupe: Optional[bool] = _f("true, false or null (true except for index-aligned class lists)",
                                default=None)
    drop_stopwords: bool = _f("true or false", default=False)
    drop_profanity: bool = _f("true or false", default=False)
    allow_download: bool = _f("true or false", default=True)
    cache_dir: Optional[str] = _f("null or a folder path (text)", default=None)
    local_dir: Optional[str] = _f("null or a folder path (text)", default=None)


class ClipDissect(_Section):
    concept_set: Text = _f("a concept set name (see nd_utils.list_concept_sets()) or the path "
                           "of a text file with one concept per line")
    clean: Optional[Clean] = _f("null or {dedupe: ..., drop_stopwords: ..., drop_profanity: ...}")
    template: Annotated[Optional[str], AfterValidator(_template)] = _f(
        "null (the raw word) or text with {} where the concept goes, e.g. 'a photo of {}'")
    similarity: Similarity = _f("a similarity function name (see nd_utils.list_similarities())")
    hyperparameters: Optional[dict[str, Any]] = _f(
        "null or a mapping of keyword arguments of the similarity function, e.g. {top_k: 50}")
    top_n: Annotated[int, AfterValidator(_top_n)] = _f("a whole number >= 1")


class Evaluation(_Section):
    probe_sets: ProbeSets = _f(_SETS)
    layer: Text = _f("a layer name (text), e.g. fc")
    concept_sets: Annotated[list[Text], Field(min_length=1)] = _f(
        "a non-empty list of concept set names or file paths, e.g. [imagenet_classes, words-10k]")
    similarities: Annotated[list[Similarity], Field(min_length=1)] = _f(
        "a non-empty list of similarity function names, e.g. [soft_wpmi, wpmi]")
    sentence_model: Text = _f("a sentence-transformers model name or folder")


class Quality(_Section):
    probe_sets: ProbeSets = _f("a list of one probe set, e.g. [{name: imagenet-sample-1k}]")
    split: dict[Text, Unit] = _f("fractions of the probe per part adding up to 1, e.g. "
                                 "{select: 0.4, pool: 0.2, calibrate: 0.1, test: 0.3}")
    cosy_prompt: Annotated[str, AfterValidator(_prompt)] = _f(
        "text with {concept}, e.g. 'realistic photo of a close up of {concept}'")
    cosy_images: PosInt = _f("a whole number >= 1 (images per label)")
    bootstrap: PosInt = _f("a whole number >= 1 (bootstrap resamples)")


class Trust(_Section):
    heldout: Annotated[float, Field(gt=0, lt=1)] = _f(
        "a fraction strictly between 0 and 1 (the part of the probe held out), e.g. 0.5")
    null_concepts: Annotated[int, Field(ge=10)] = _f(
        "a whole number >= 10 (random concepts behind each permutation p-value), e.g. 1000")
    alpha: Annotated[float, Field(gt=0, lt=1)] = _f(
        "a number strictly between 0 and 1 (trusted: Benjamini-Hochberg q below it), e.g. 0.05")
    cosy: bool = _f("true or false (compute cosy_auc: images of every distinct label)")
    cosy_images: PosInt = _f("a whole number >= 1 (images per label for cosy_auc)")


class Crops(_Section):
    size: PosInt = _f("a whole number >= 1 (pixels of the square image the crops come from)")
    max_per_image: Annotated[int, Field(ge=0)] = _f("a whole number >= 0 (crops per image)")
    iou_max: Unit = _f("a number from 0 to 1 (largest overlap between crops)")
    image_iou_max: Unit = _f("a number from 0 to 1 (largest overlap of a crop with its image)")


class Dnd(_Section):
    layers: Annotated[list[Text], Field(min_length=1)] = _f(
        "a non-empty list of layer names in brackets, e.g. [head, fc]")
    neurons: Neurons = _f("per layer {layer: count or list of unit ids}, or one count or list "
                          "for every layer, e.g. {head: 5, fc: [99, 305]}")
    top_k: PosInt = _f("a whole number >= 1 (|D_top|: top images per neuron)")
    crops: Crops = _f("{size: ..., max_per_image: ..., iou_max: ..., image_iou_max: ...}")


class Captioner(_Section):
    """Keys every captioner has; a captioner's own keys may follow (extra keys, checked against
    its loader's parameters by `_cross_checks` and passed to it by `load_captioner_from_config`)."""
    model_config = ConfigDict(strict=True, extra="allow")
    name: Annotated[str, _one_of("captioner", _captioners)] = _f(
        "a captioner name (see nd_utils.list_captioners())")
    model: Optional[str] = _f(_MODEL)
    checkpoint: Optional[str] = _f("null or the path of other weights (text)")
    max_new_tokens: PosInt = _f(_TOKENS)
    batch_size: PosInt = _f(_BATCH)


class Llm(_Section):
    name: Annotated[str, _one_of("language model", _language_models)] = _f(
        "a language model backend (see nd_utils.list_language_models())")
    model: Optional[str] = _f(_MODEL)
    temperature: Annotated[float, Field(ge=0)] = _f("a number >= 0 (0 = greedy), e.g. 0.3")
    max_new_tokens: PosInt = _f(_TOKENS)
    summaries: PosInt = _f("a whole number >= 1 (summarise calls per neuron)")
    prompts: Annotated[str, AfterValidator(_prompt_version)] = _f(
        "a prompt template version, e.g. v1")
    mode: Literal["live", "replay"] = _f("live or replay (answers only from the cache)")
    guards: Literal["reference", "strict"] = _f(
        "reference (re-ask once on commas, keep the second answer) or strict (also reject "
        "empty, garbled, over-long and example-copying answers)")


class Synthesis(_Section):
    name: Annotated[str, _one_of("synthesis backend", _synthesizers)] = _f(
        "a synthesis backend: diffusers or retrieve")
    model: Optional[str] = _f("null or a diffusers pipeline id or folder (text)")
    prompt: Annotated[str, AfterValidator(_prompt)] = _f(
        "text with {concept}, e.g. 'One realistic image of {concept}'")
    images_per_concept: PosInt = _f("a whole number >= 1")
    steps: PosInt = _f("a whole number >= 1 (denoising steps)")
    scheduler: Literal["dpm-multistep", "default"] = _f("dpm-multistep or default")
    guidance_scale: Annotated[float, Field(ge=0)] = _f("a number >= 0, e.g. 7.5")
    height: Annotated[Optional[int], AfterValidator(_image_side)] = _f(
        "null or a multiple of 8 pixels")
    width: Annotated[Optional[int], AfterValidator(_image_side)] = _f(
        "null or a multiple of 8 pixels")
    batch_size: PosInt = _f(_BATCH)
    pool: ProbeSets = _f(_SETS)


class Selection(_Section):
    scoring: Annotated[str, _one_of("scoring function", _scorings)] = _f(
        "a scoring function name (see nd_utils.selection.list_scorings())")
    beta: PosInt = _f("a whole number >= 1 (ranks averaged by topk-sq-mean)")
    zeta: PosInt = _f("a whole number >= 1 (global top images for image-products)")
    labels: PosInt = _f("a whole number >= 1 (labels kept per neuron)")


class Executor(_Section):
    name: Annotated[str, _one_of("executor", _executors)] = _f(
        "local (in this process) or ray (Ray tasks; see nd_utils.list_executors())")
    address: Optional[str] = _f("null (a local Ray instance), auto or HOST:PORT of a running "
                                "cluster (text)", default=None)
    num_cpus: Optional[PosInt] = _f("null (all) or a whole number >= 1 (CPUs of a local Ray "
                                    "instance)", default=None)
    gpus_per_task: Annotated[Any, AfterValidator(_gpus)] = _f(
        "auto (1 when the cluster has GPUs, else 0) or a number >= 0", default="auto")
    max_retries: Annotated[int, Field(ge=0)] = _f(
        "a whole number >= 0 (retries of a task whose worker died)", default=2)
    threads: Optional[PosInt] = _f("null or a whole number >= 1 (CPU threads per unit)",
                                   default=None)


class Schema(_Section):
    """The whole configuration (`configs/*.yaml` after overrides)."""
    profile: Text = _f("a profile name (text)")
    seed: int = _f("a whole number, e.g. 0")
    device: Annotated[str, AfterValidator(_device)] = _f("auto, cpu, cuda, cuda:N or mps")
    data_dir: Annotated[Any, AfterValidator(_path)] = _f("a folder path")
    target: Target = _f(_SECTION)
    probe: Probe = _f(_SECTION)
    activations: Activations = _f(_SECTION)
    vlm: Vlm = _f(_SECTION)
    clip_dissect: ClipDissect = _f(_SECTION)
    evaluation: Evaluation = _f(_SECTION)
    quality: Quality = _f(_SECTION)
    trust: Optional[Trust] = _f(_SECTION, default=None)
    dnd: Dnd = _f(_SECTION)
    captioner: Captioner = _f(_SECTION)
    llm: Llm = _f(_SECTION)
    synthesis: Synthesis = _f(_SECTION)
    selection: Selection = _f(_SECTION)
    executor: Optional[Executor] = _f(_SECTION, default=None)


# ------------------------------------------------------------------ checks across keys
def _cross_checks(cfg: Schema) -> list[tuple[tuple, Any, str]]:
    """Rules tying two keys together, as (location, value, expected) triples."""
    out = []
    neurons = cfg.dnd.neurons
    if isinstance(neurons, dict):
        missing = [layer for layer in cfg.dnd.layers if layer not in neurons]
        if missing:
            out.append((("dnd", "neurons"), neurons, f"an entry for every layer of dnd.layers "
                        f"(missing: {', '.join(missing)}), or one count or list for all layers"))
    from .similarity import get_similarity
    fn = get_similarity(cfg.clip_dissect.similarity)
    accepted = [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind == p.KEYWORD_ONLY
                and p.name not in ("layer", "device", "chunk_size", "num_workers")]
    for name, value in (cfg.clip_dissect.hyperparameters or {}).items():
        if name not in accepted:
            out.append((("clip_dissect", "hyperparameters", name), value,
                        f"a keyword of {fn.__name__}: one of {', '.join(accepted)}"))
    out += _captioner_keys(cfg.captioner)
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


def _captioner_keys(section: Captioner) -> list[tuple]:
    """The extra keys of `captioner:` that its captioner's loader does not take (all of them are
    taken by a loader with **kwargs), as unknown keys."""
    from .backends.captioners import captioner_parameters
    accepted, takes_any = captioner_parameters(section.name)
    out = []
    for key, value in (section.model_extra or {}).items():
        if not takes_any and key not in accepted:
            near = closest(key, [*Captioner.model_fields, *sorted(accepted)], n=3)
            out.append((("captioner", key), value, "no such key: remove it" + (
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
    key = ".".join(str(p) for p in loc if p not in _TAGS)
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


def validate_config(data: Mapping, source: str = "<dict>") -> None:
    """Check types, ranges and choices of every key of `data`; ConfigError lists every problem.

    Each line names the dotted key, the value found and what is expected; the last line names
    `source` and the two ways to fix a value (edit the file or `--set key=value`).
    """
    try:
        problems = [_line(*p) for p in _cross_checks(Schema.model_validate(dict(data)))]
    except ValidationError as exc:
        # An absent key is left to the stage that reads it (Config names it then), so run
        # folders saved before a key was added stay readable.
        problems = list(dict.fromkeys(_problem(e) for e in exc.errors() if e["type"] != "missing"))
    if problems:
        problems.append(f"({len(problems)} invalid config value(s) in {source} after overrides: "
                        f"correct them in that file or with --set key=value)")
        raise ConfigError("\n".join(problems))
