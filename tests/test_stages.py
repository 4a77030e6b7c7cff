"""The one cached-stage mechanism: key and manifest from one record, upstream from Stage.upstream."""
from __future__ import annotations

import json

import pytest

from nd_utils.errors import NdUtilsError
from nd_utils.stage_cache import cached_stage, stage_output
from nd_utils.stages import get_stage, load_stages

STAGES = load_stages()
from nd_utils.store import ArtifactStore


def test_key_is_the_store_key_of_the_same_parts():
    out = stage_output("04_concepts", {"llm.name": "keywords", "layer": "fc"},
                       upstream={"03_captions": "a" * 16})
    assert out.key == ArtifactStore.key("04_concepts", STAGES["04_concepts"].version,
                                        {"llm.name": "keywords", "layer": "fc"},
                                        upstream={"03_captions": "a" * 16})
    other = stage_output("04_concepts", {"llm.name": "keywords", "layer": "fc"},
                         upstream={"03_captions": "b" * 16})
    assert other.key != out.key  # an upstream change reaches every downstream key


def test_upstream_must_be_the_declared_stages():
    with pytest.raises(NdUtilsError, match=r"declares upstream \['03_captions'\]"):
        stage_output("04_concepts", {}, upstream={})
    with pytest.raises(NdUtilsError, match="03_top_images"):
        stage_output("04_concepts", {}, upstream={"03_captions": "k", "03_top_images": "k"})
    with pytest.raises(NdUtilsError, match="declares upstream"):
        stage_output("05_concept_images", {}, upstream={"04_concepts": "k"})
    # every declared upstream is itself a stage
    for stage in STAGES.values():
        for name in stage.upstream:
            assert get_stage(name).name == name


def test_body_runs_once_and_the_manifest_is_the_key_record(tmp_path):
    store = ArtifactStore(tmp_path)
    out = stage_output("03_captions", {"captioner.name": "keywords", "layer": "fc"},
                       upstream={"03_top_images": "0123456789abcdef"})
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "captions.csv").write_text("unit,caption\n0,a dog\n")
        return {"n_captions": 1}

    art = cached_stage(store, out, build, extra={"layer": "fc"})
    again = cached_stage(store, out, build, extra={"layer": "fc"})
    assert len(calls) == 1 and again.path == art.path and art.key == out.key
    m = json.loads((art.path / "manifest.json").read_text())
    assert (m["params"], m["upstream"], m["inputs"]) == (out.params, out.upstream, out.inputs)
    assert m["stage_version"] == out.stage.version
    assert m["n_captions"] == 1 and m["layer"] == "fc"  # fields from the body and from before
    cached_stage(store, out, build, force=True)
    assert len(calls) == 2


def test_a_failing_body_publishes_nothing_and_the_next_call_builds(tmp_path):
    store = ArtifactStore(tmp_path)
    out = stage_output("05_concept_images", {"synthesis.name": "retrieve"},
                       inputs={"prompt": "a dog", "backend": "x"})

    def broken(tmp):
        (tmp / "images.csv").write_text("half")
        raise RuntimeError("synthesis crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        cached_stage(store, out, broken)
    assert not store.exists(out.stage.name, out.key)
    def build(tmp):
        (tmp / "images.csv").write_text("file\n")

    art = cached_stage(store, out, build)
    assert art.file("images.csv").read_text() == "file\n"
    other = stage_output("05_concept_images", {}, inputs={"prompt": "a cat"})
    with pytest.raises(TypeError, match="return a dict of manifest fields"):
        cached_stage(store, other, lambda tmp: 3)
    assert not store.exists(other.stage.name, other.key)
