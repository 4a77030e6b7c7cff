"""The cached-stage mechanism: a stage's record (notebook, version, the config fields it reads,
its upstream), its result tables, and the one way an output is keyed, built and published.

A stage's output key is `hash(stage name, version, the fields it reads, content inputs, upstream
keys)`: changing a field a stage reads (`Stage.reads`) changes its key and every downstream key;
changing any other field changes nothing. A stage that reads a backend's name (`<section>.name`)
also reads that section's extra keys, a registered backend's own settings (`stage_params`), only
when present. Bump `version` whenever a stage's output format or numerics change, so that older
cache folders are recomputed rather than reused.

Every stage output goes through one mechanism: `stage_output` gathers what decides it (params,
the keys of the stages in `Stage.upstream`, content inputs) into a `StageOutput`, whose key and
manifest both come from that one record; `cached_stage` opens it when it exists and otherwise
runs the body once, under the key's lock, and publishes what it wrote.

Example:
    >>> captions = Stage("03_captions", "03_captions.ipynb", version=1,
    ...                  reads=("captioner.name",), upstream=("03_top_images",))
    >>> out = stage_output(captions, {"captioner.name": "keywords", "layer": "fc"},
    ...                    upstream={"03_top_images": "0123abcd0123abcd"})
    >>> len(out.key)
    16
    >>> art = cached_stage(store, out, lambda tmp: write_captions(tmp))   # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .config_schema import Schema
from .errors import NdUtilsError
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


# every stage's record, registered by its module in nd_utils/stages/ when imported
STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    """Add a stage's record (its module calls this at import); the record is returned."""
    STAGES[stage.name] = stage
    return stage


def stage_params(cfg, stage: Stage) -> dict:
    """The config fields that decide `stage`'s outputs: `cfg.select(stage.reads)`, then, for
    each section whose `name` it reads (a backend family's: `target`, `vlm`, `llm`, `synthesis`,
    `captioner`), that section's extra keys as `{"<section>.<key>": value}`.

    The extra keys are a backend's own settings (see `nd_utils.backends.families`): they decide
    what it computes, so they join the key, and only when present (a config without any keeps its keys).
    """
    params = cfg.select(stage.reads)
    for read in stage.reads:
        section, _, leaf = read.partition(".")
        if leaf == "name":
            params.update({f"{section}.{k}": v for k, v in _extra_keys(cfg, section).items()})
    return params


def _extra_keys(cfg, section: str) -> dict:
    """The keys of `section` that its schema does not list, for a section that allows them (read
    from the config as written, so that computing a key never needs the whole config valid)."""
    field = Schema.model_fields.get(section)
    model = field.annotation if field is not None else None
    if not (isinstance(model, type) and model.model_config.get("extra") == "allow"):
        return {}
    data = cfg.get(section)
    if not isinstance(data, Mapping):
        return {}
    return {k: v for k, v in data.items() if k not in model.model_fields}


@dataclass(frozen=True)
class Table:
    """A result table a stage writes into a run's `results/`.

    `kind`: the name readers ask for; `file`: its file name, `{}` standing for the layer in a
    per-layer table (a table with one file per run is named by its kind: `file` left empty);
    `columns`: those the readers rely on; `notebooks`: the notebook(s) that write it, as the run
    reader's errors name them.
    """

    kind: str
    file: str = ""
    columns: tuple[str, ...] = ()
    notebooks: str = ""

    def __post_init__(self):
        if not self.file:
            object.__setattr__(self, "file", self.kind)

    @property
    def per_layer(self) -> bool:
        return "{}" in self.file

    def path(self, results: "str | Path", layer: "str | None" = None) -> Path:
        return Path(results) / (self.file.format(layer) if self.per_layer else self.file)


def _lookup(name: str) -> Stage:
    if name in STAGES:
        return STAGES[name]
    raise NdUtilsError(f"no stage named {name!r} is registered (registered: "
                       f"{', '.join(sorted(STAGES)) or 'none'}): stage modules register theirs "
                       f"when imported; nd_utils.stages.load_stages() imports them all")


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
    stage = stage if isinstance(stage, Stage) else _lookup(stage)
    upstream = dict(upstream or {})
    if set(upstream) != set(stage.upstream):
        raise NdUtilsError(f"stage {stage.name} declares upstream {sorted(stage.upstream)} but "
                           f"its key was given {sorted(upstream)}: update Stage.upstream in "
                           f"nd_utils/stages/ or the caller")
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
