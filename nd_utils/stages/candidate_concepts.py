"""Stage 04: candidate concepts per neuron from the captions of its D_top (DnD step 2).

Per neuron (METHODS.md section 3.2): the language model simplifies each caption, then summarises
the list of simplified captions into one 1-5 word concept, `llm.summaries` times with the list
shuffled between calls by a seeded generator. What happens to each answer depends on
`llm.guards`:

* `reference` (the released code, `DnD_models.GPT_model_single`): with a ':' the text between the
  first and the second ':' is kept; an answer with commas is asked again once with the re-ask
  template and the second answer is kept, whatever it is (an empty one is recorded as failed:
  the released code would fail on it). Simplifications are used as answered (on one line).
* `strict`: the answer's first line, without list markers, preambles or quotes, after the last
  ':'; an answer with commas, an empty one, a garbled one (no letters, over 12 words or 120
  characters) or one that repeats a line of the prompt's worked examples is asked again once; if
  that fails too it is recorded as failed, with the raw text, and dropped. A simplification that
  shares no content word with its caption (a hallucination) is replaced by the caption.

The kept answers are cleaned (`clean_candidates`) into the candidates.

Identical prompts hit the answer cache, so a caption shared by several neurons is simplified once.

Example:
    >>> lm = language_model_from_config(cfg)                          # doctest: +SKIP
    >>> concepts = generate_concepts(cfg, captions, lm)               # doctest: +SKIP
    >>> concepts.candidates[["unit", "candidate", "votes"]]           # doctest: +SKIP
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd

from ..config import Config
from ..context import run_context
from ..errors import NdUtilsError
from ..backends.configured import language_model_from_config
from ..backends.answer_cache import CachedLanguageModel
from ..backends.language_models import content_words
from ..backends.prompt_templates import load_template
from ..stage_cache import (Stage, register_stage, StageOutput, cached_stage, stage_output,
                           stage_params)
from ..store import atomic_write_text, canonical_json

# v3: the background rule adds "<c> background" beside <c> (it replaced it); llm.guards
STAGE = register_stage(Stage("04_concepts", "04_concepts.ipynb", version=3,
                            reads=("llm.name", "llm.model", "llm.temperature", "llm.max_new_tokens",
                                   "llm.summaries", "llm.prompts", "llm.guards", "seed"),
                            upstream=("03_captions",)))
MAX_WORDS, MAX_CHARS = 12, 120
BACKGROUND_WORDS = {"design", "designs", "graphic", "graphics"}
GUARDS = ("reference", "strict")


def parse_answer(raw: str) -> str:
    """The concept in a model answer: first non-empty line, text after the last ':', no quotes."""
    text = next((ln.strip() for ln in str(raw).splitlines() if ln.strip()), "")
    if ":" in text:
        text = text.rsplit(":", 1)[1]
    text = re.sub(r"^(?:[-*•]|\d+[.)])\s+", "", text.strip())  # a list marker
    # a preamble such as "The answer is ..." or "Label - ..."
    text = re.sub(r"^(?:the\s+)?(?:answer|label|concept(?:\s+label)?)(?:\s+is|\s*-)\s+", "",
                  text, flags=re.IGNORECASE)
    text = text.strip().strip("\"'`*").strip()
    return re.sub(r"\s+", " ", text).rstrip(".").strip().strip("\"'`")


def parse_answer_reference(raw: str) -> str:
    """The released code's parse: with a ':', the text between the first and second ':'.

    Only surrounding whitespace is removed (the released code keeps it).
    """
    text = str(raw)
    if ":" in text:
        text = text.split(":")[1]
    return text.strip()


def answer_problem(concept: str, copied: "set[str] | frozenset" = frozenset()) -> "str | None":
    """Why a parsed answer cannot be a concept label (None when it can).

    `copied`: lower-cased lines of the prompt's worked examples; repeating one is no answer.
    """
    if not concept:
        return "empty"
    if concept.lower() in copied:
        return "copied an example"
    if not re.search(r"[A-Za-z]", concept):
        return "no letters"
    if "," in concept:
        return "commas"
    if len(concept.split()) > MAX_WORDS or len(concept) > MAX_CHARS:
        return "too long"
    return None


def clean_concept(concept: str) -> str:
    """One candidate as published: lower-case, no trailing '.' (whitespace tidied).

    Idempotent: a cleaned candidate cleans to itself. (The released code removes one '.'.)
    """
    return re.sub(r"\s+", " ", str(concept)).strip().lower().rstrip(".").rstrip()


def clean_candidates(concepts: list[str]) -> list[str]:
    """The published cleaning of a neuron's answers (the released `describe_neurons.py`).

    Each answer is cleaned (`clean_concept`); one whose last word is design, designs, graphic or
    graphics also gets "<answer> background" (added right after it, the answer itself is kept);
    then duplicates go, first occurrence first. Empty answers are dropped (the released code
    fails on them). The released code de-duplicates through a set (an order that changes with
    Python's hash seed) and tests the last word before removing the '.', so "floral design."
    gets no background variant there; here it does, as METHODS.md orders the steps.
    """
    out = []
    for raw in concepts:
        c = clean_concept(raw)
        if not c:
            continue
        out.append(c)
        if c.split()[-1] in BACKGROUND_WORDS:
            out.append(f"{c} background")
    return list(dict.fromkeys(out))


def example_lines(template) -> frozenset:
    """Lower-cased content lines of a template's example turns (no `{field}` slots)."""
    lines = set()
    for m in template.messages(**{k: "{" + k + "}" for k in ("descriptions", "answer",
                                                             "caption")}):
        if m["role"] == "system":
            continue
        for ln in m["content"].splitlines():
            ln = parse_answer(ln).lower()
            if ln and "{" not in ln:
                lines.add(ln)
    return frozenset(lines)


@dataclass
class NeuronConcepts:
    unit: int
    simplified: list[str]
    answers: list[dict]      # one per summarise call: raw, concept, status, reasked
    candidates: list[str]


def propose_concepts(captions: list[str], lm: CachedLanguageModel, seed: int, unit: int,
                     summaries: int = 5, prompts: str = "v1",
                     guards: str = "strict") -> NeuronConcepts:
    """Simplify the captions, summarise them `summaries` times (seeded shuffles), clean.

    `guards`: `reference` or `strict` (see the module docstring).
    """
    if guards not in GUARDS:
        raise NdUtilsError(f"llm.guards must be one of {', '.join(GUARDS)}, got {guards!r}")
    strict = guards == "strict"
    parse = parse_answer if strict else parse_answer_reference
    simplify, summarize, reask = (load_template(f"{n}.{prompts}")
                                  for n in ("simplify", "summarize", "reask"))
    simplified = []
    for c in captions:
        raw = lm.ask(simplify, {"caption": c}, seed=seed)
        if not strict:  # as answered, on one line (the descriptions are a one-per-line list)
            simplified.append(" ".join(str(raw).split()))
            continue
        s = parse_answer(raw)
        # A simplification that shares no content word with its caption is a hallucination
        # (small models do this); the caption itself is then the better description.
        usable = answer_problem(s) in (None, "commas") and set(content_words(s)) & set(
            content_words(c))
        simplified.append(s if usable else c)
    copied = example_lines(summarize)

    def problem_of(concept: str) -> "str | None":
        if strict:
            return answer_problem(concept, copied)
        return "commas" if "," in concept else None

    rng = random.Random(f"{seed}:{unit}")
    answers, order = [], list(simplified)
    for t in range(int(summaries)):
        if t:
            rng.shuffle(order)
        descriptions = "\n".join(f"- {d}" for d in order)
        raw = lm.ask(summarize, {"descriptions": descriptions}, seed=seed + t)
        concept, reasked = parse(raw), False
        problem = problem_of(concept)
        if problem:
            reasked = True
            raw2 = lm.ask(reask, {"answer": raw.strip()[:200], "descriptions": descriptions},
                          seed=seed + t)
            concept, raw = parse(raw2), f"{raw}\n--- re-asked ---\n{raw2}"
            # reference: the second answer is kept, whatever it is
            problem = problem_of(concept) if strict else None
        if not strict and not clean_concept(concept):
            problem = "empty"  # nothing to keep (the released code fails on an empty answer)
        answers.append({"unit": unit, "call": t, "raw": raw, "concept": concept if not problem
                        else "", "status": "failed: " + problem if problem else "ok",
                        "reasked": reasked})
    candidates = clean_candidates([a["concept"] for a in answers if a["status"] == "ok"])
    return NeuronConcepts(unit, simplified, answers, candidates)


@dataclass
class LayerConcepts:
    layer: str
    candidates: pd.DataFrame   # layer, unit, candidate, votes
    answers: pd.DataFrame      # every summarise call, with raw text and status
    key: str
    manifest: dict

    def for_unit(self, unit: int) -> list[str]:
        return list(self.candidates[self.candidates.unit == unit].candidate)


def concepts_output(cfg: Config, layer: str, captions_key: str) -> StageOutput:
    return stage_output(STAGE, {**stage_params(cfg, STAGE), "layer": layer},
                        upstream={"03_captions": captions_key})


def concepts_key(cfg: Config, layer: str, captions_key: str) -> str:
    return concepts_output(cfg, layer, captions_key).key


def concepts_of_neuron(cfg: Config, unit_captions: "tuple[int, list[str]]",
                       lm: "CachedLanguageModel | None" = None) -> tuple[NeuronConcepts, dict]:
    """One executor unit of stage 04: `propose_concepts` for (unit, its D_top captions).

    Without `lm` (on a Ray worker) the configured model is loaded once per process. Returns
    the neuron's concepts and this unit's counters (model calls, cache hits and misses).
    """
    from ..executors import worker_model

    lm = lm or worker_model("llm", cfg, lambda: language_model_from_config(cfg))
    before = lm.stats()
    unit, caps = unit_captions
    s = run_context(cfg).settings
    res = propose_concepts(list(caps), lm, seed=int(s.seed), unit=int(unit),
                           summaries=int(s.llm.summaries), prompts=s.llm.prompts,
                           guards=s.llm.guards)
    after = lm.stats()
    counts = {k: after[k] - before[k] for k in ("model_calls", "hits", "misses")}
    return res, {**counts, "model": lm.model_id, "mode": lm.mode}


def generate_concepts(cfg: Config, layer: str, captions: pd.DataFrame, captions_key: str,
                      lm: "CachedLanguageModel | None" = None, force: bool = False,
                      progress: bool = True, executor=None) -> LayerConcepts:
    """Stage 04 for one layer: candidates of every neuron in `captions` (from stage 03).

    Each neuron is one unit of `executor` (default: the config's, `run_context`); with the
    local executor `lm` (or the configured model) answers, on Ray each worker loads its own.
    """
    ctx = run_context(cfg)

    def build(tmp: Path) -> dict:
        nonlocal lm
        ex = executor or ctx.executor
        if lm is None and ex.name == "local":
            lm = language_model_from_config(cfg)
        rows, answers, simplified = [], [], {}
        units = [int(u) for u in sorted(captions.unit.unique())]
        work = [(u, list(captions[captions.unit == u].sort_values("rank").caption))
                for u in units]
        done = ex.map(partial(concepts_of_neuron, cfg), work, desc=f"{layer}: concepts",
                      progress=progress, local_kwargs={"lm": lm})
        for unit, (res, _) in zip(units, done):
            votes = [clean_concept(a["concept"]) for a in res.answers if a["status"] == "ok"]
            rows += [{"layer": layer, "unit": unit, "candidate": c, "votes": votes.count(c)}
                     for c in res.candidates]
            answers += [{"layer": layer, **a} for a in res.answers]
            simplified[unit] = res.simplified
        cand = pd.DataFrame(rows, columns=["layer", "unit", "candidate", "votes"])
        atomic_write_text(tmp / "candidates.csv", cand.to_csv(index=False))
        atomic_write_text(tmp / "answers.jsonl", "".join(
            json.dumps(a, ensure_ascii=False) + "\n" for a in answers))
        atomic_write_text(tmp / "simplified.json", canonical_json(simplified))
        counts = {k: sum(c[k] for _, c in done) for k in ("model_calls", "hits", "misses")}
        total = counts["hits"] + counts["misses"]
        first = done[0][1] if done else {"model": lm.model_id if lm else None,
                                         "mode": ctx.settings.llm.mode}
        return {"model": first["model"], "mode": first["mode"], "n_neurons": len(units),
                "executor": ex.describe(),
                "llm": {**counts, "hit_rate": round(counts["hits"] / total, 4) if total else None}}

    art = cached_stage(ctx.store, concepts_output(cfg, layer, captions_key),
                       build, force=force)
    cand = pd.read_csv(art.file("candidates.csv"), keep_default_na=False)
    ans = pd.read_json(art.file("answers.jsonl"), lines=True, dtype={"raw": str, "concept": str})
    return LayerConcepts(layer, cand, ans, art.key, art.manifest)


def write_concept_tables(results: "str | Path", concepts: "dict[str, LayerConcepts]"
                         ) -> dict[str, Path]:
    """`04_concepts_<layer>.csv` (layer, unit, candidate, votes) for every layer."""
    out = {}
    for layer, lc in concepts.items():
        out[layer] = atomic_write_text(Path(results) / f"04_concepts_{layer}.csv",
                                       lc.candidates.to_csv(index=False))
    return out


def asks_language_model(cfg, stages: set) -> "str | None":
    """Stage 04 always asks `llm.*`: it proposes the candidate concepts (the runner's preflight)."""
    return "04 proposes the candidate concepts"
