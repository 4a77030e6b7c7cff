"""The value checks of config keys: names chosen from registries, devices, prompts, sizes.

Each check raises ValueError phrased as what is expected; `config_schema` turns it into one line
of its ConfigError. Names are checked against the `names` given as pydantic validation context.

Example:
    >>> check_device("cuda:0")
    'cuda:0'
"""
from __future__ import annotations

import os
import re
from typing import Annotated, Any, Optional, Union

from pydantic import AfterValidator, Discriminator, Field, Tag, ValidationInfo

from .errors import closest
from .plugins import MODULE_NAME


# The registries live above this layer (similarity, backends, executors), so the names they hold
# reach validation as pydantic context: `validate_config(..., names=registered_names())`, built by
# `nd_utils.context`. Without names (parsing a saved config into settings) a name is only typed.
def one_of(kind: str, family: str) -> AfterValidator:
    """A name that must be one of the `family` names given in the validation context."""
    def check(value: str, info: ValidationInfo) -> str:
        valid = ((info.context or {}).get("names") or {}).get(family)
        if valid is None or value in valid:
            return value
        near = closest(value, valid, n=1)
        hint = f" (closest: {near[0]})" if near else ""
        article = "an" if kind[0] in "aeiou" else "a"
        raise ValueError(f"{article} {kind}: one of {', '.join(valid)}{hint}")
    return AfterValidator(check)


# the families `names` may hold (see one_of); also "prompt_version" (templates) and
# "similarity_keywords" ({function name: keyword arguments it accepts})
# the sections that choose a backend, with the key of their names in the validation context: a
# section's extra keys are that backend's own settings (`<names key>_parameters` checks them)
BACKEND_SECTIONS = {"captioner": "captioner", "llm": "language_model", "synthesis": "synthesizer",
                    "vlm": "vlm", "target": "target"}
NAME_FAMILIES = ("similarity", "scoring", "captioner", "language_model", "synthesizer",
                 "probe_set", "executor")
STORED_TOP = 20  # concepts kept per neuron in stage 02's artifact; clip_dissect.top_n shows fewer


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise ValueError("auto, cpu, cuda, cuda:N (N = GPU index, e.g. cuda:0) or mps")
    return value


def check_module_name(value: str) -> str:
    if not MODULE_NAME.fullmatch(value):
        raise ValueError("an importable module name (dotted Python names), e.g. "
                         "my_package.nd_plugins")
    return value


def _neuron_spec(value: Any) -> Any:
    is_int = lambda u: isinstance(u, int) and not isinstance(u, bool)  # noqa: E731
    if (is_int(value) and value >= 1) or (isinstance(value, list) and value
                                          and all(is_int(u) and u >= 0 for u in value)):
        return value
    raise ValueError("a count >= 1 (the first N units) or a non-empty list of unit ids >= 0, "
                     "e.g. 5 or [0, 7, 12]")


def check_top_n(value: int) -> int:
    if not 1 <= value <= STORED_TOP:
        raise ValueError(f"a whole number from 1 to {STORED_TOP} (concepts stored per neuron)")
    return value


def check_prompt_version(value: str, info: ValidationInfo) -> str:
    found = ((info.context or {}).get("names") or {}).get("prompt_version")
    if found is None:
        return value
    tasks = ("simplify", "summarize", "reask")
    found = set(found)
    versions = sorted({t.split(".", 1)[1] for t in found if "." in t})
    if not all(f"{task}.{value}" in found for task in tasks):
        raise ValueError(f"a prompt template version with nd_utils/prompts/"
                         f"{{{','.join(tasks)}}}.<version>.txt: one of {', '.join(versions)}")
    return value


def check_template(value: Optional[str]) -> Optional[str]:
    if value is not None and "{}" not in value:
        raise ValueError("null (the raw word) or text with {} where the concept goes, "
                         "e.g. 'a photo of {}'")
    return value


def check_prompt(value: str) -> str:
    try:
        value.format(concept="x")
        ok = "{concept}" in value
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        raise ValueError("text with {concept} where the concept goes and no other {...}, "
                         "e.g. 'One realistic image of {concept}'")
    return value


def check_image_side(value: Optional[int]) -> Optional[int]:
    if value is not None and (value < 8 or value % 8):
        raise ValueError("null (the pipeline's resolution) or a multiple of 8 pixels, e.g. 512")
    return value


def check_path(value: Any) -> Any:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError("a folder path, e.g. data or /scratch/nd-data")
    return value


def check_gpus(value: Any) -> Any:
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                           and value >= 0):
        return value
    raise ValueError("auto or a number >= 0")


def expect(expected: str, **constraints) -> Any:
    """A field whose description is the `expected` text of its error line."""
    return Field(description=expected, **constraints)


PosInt = Annotated[int, Field(ge=1)]
Text = Annotated[str, Field(min_length=1)]
Unit = Annotated[float, Field(ge=0, le=1)]
NeuronSpec = Annotated[Any, AfterValidator(_neuron_spec)]
UNION_TAGS = ("per-layer", "all-layers")  # union tags: dropped from error locations
Neurons = Annotated[
    Union[Annotated[dict[str, NeuronSpec], Tag(UNION_TAGS[0])],
          Annotated[NeuronSpec, Tag(UNION_TAGS[1])]],
    Discriminator(lambda v: UNION_TAGS[0] if isinstance(v, dict) else UNION_TAGS[1])]
Similarity = Annotated[str, one_of("similarity function", "similarity")]

