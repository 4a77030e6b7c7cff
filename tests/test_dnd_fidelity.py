"""DnD against the released code (Trustworthy-ML-Lab/Describe-and-Dissect): candidate cleaning,
re-asking under `llm.guards`, and the diffusers dtype and seeding (issue 10, points 2, 3, 6)."""
import warnings

import pandas as pd
import pytest
import torch

import nd_utils as nd
from nd_utils.stages.candidate_concepts import (STAGE, clean_candidates, clean_concept, concepts_key,
                                         generate_concepts, parse_answer_reference,
                                         propose_concepts)
from nd_utils.errors import NdUtilsError
from nd_utils.backends.answer_cache import CachedLanguageModel
from nd_utils.backends.synthesizers import DiffusersSynthesizer


# ------------------------------------------------------------------ point 2: cleaning
def released_cleaning(answers):
    """The released describe_neurons.py cleaning, restated: lower-case every answer; per answer
    drop one trailing '.' and, when the *uncleaned* answer's last word is a design word, append
    "<answer> background" to the list; then a set."""
    words = [a.lower() for a in answers]
    for i, w in enumerate(list(words)):
        if w[-1] == ".":
            words[i] = w[:-1]
        if w.split()[-1] in {"design", "designs", "graphic", "graphics"}:
            words.append(w + " background")
    return set(words)


def test_background_variant_is_added_beside_the_answer_not_instead():
    assert clean_candidates(["Floral Design", "Dogs"]) == [
        "floral design", "floral design background", "dogs"]
    assert clean_candidates(["Vector  Graphics."]) == ["vector graphics",
                                                       "vector graphics background"]
    # de-duplication comes last: a variant the model also proposed is kept once, in place
    assert clean_candidates(["web design", "Web design background", "WEB DESIGN."]) == [
        "web design", "web design background"]
    # only the last word counts, and only the four words of the released list
    assert clean_candidates(["design of cars", "graphical art", "logo designs"]) == [
        "design of cars", "graphical art", "logo designs", "logo designs background"]
    assert clean_concept("Floral Design.") == "floral design"  # the variant is the list's job


@pytest.mark.parametrize("answers", [
    ["Floral design", "striped textiles", "floral design", "Red graphics"],
    ["Dogs.", "dogs", "Cats", "cat graphic", "Cat Graphic"],
    ["web designs", "web designs background", "sky"],
])
def test_cleaning_matches_the_released_rule(answers):
    assert set(clean_candidates(answers)) == released_cleaning(answers)
    assert len(clean_candidates(answers)) == len(released_cleaning(answers))


def test_cleaning_removes_the_period_and_drops_empty_answers():
    assert clean_candidates(["Dots..", "", "   ", "Sky."]) == ["dots", "sky"]
    assert all(clean_concept(c) == c for c in clean_candidates(["A  b.", "X Design."]))
    # deliberate difference: the released code tests the last word before removing the '.',
    # so it never adds the variant to "floral design."; METHODS.md orders the steps the other way
    assert released_cleaning(["floral design."]) == {"floral design"}
    assert clean_candidates(["floral design."]) == ["floral design", "floral design background"]


# ------------------------------------------------------------------ point 3: re-asking
# answers from a list, then echoes simplify captions (shared with the DnD method tests)
from test_dnd_methods import ScriptedLM  # noqa: E402


CAPTIONS = ["a photo of a red car", "a photo of a red dress", "a photo of a red apple"]
SIMPLE = ["red car", "red dress", "red apple"]


def reask_prompts(lm):
    return [p for p in lm.prompts if "That is not one concept label" in p]


def run(guards, summaries, tmp_path, name="c.jsonl"):
    backend = ScriptedLM(SIMPLE + summaries)
    res = propose_concepts(CAPTIONS, CachedLanguageModel(backend, tmp_path / name), seed=0,
                           unit=1, summaries=3, guards=guards)
    return res, backend


def test_reference_reasks_only_commas_and_keeps_the_second_answer(tmp_path):
    answers = ["red-themed scenes",              # an example's answer: kept
               "red cars, red dresses",          # commas: asked again ...
               "red clothes, red vehicles",      # ... and the second answer is kept as it is
               "Label: red objects: mostly"]     # text between the first and second ':'
    res, lm = run("reference", answers, tmp_path)
    assert [a["status"] for a in res.answers] == ["ok", "ok", "ok"]
    assert [a["reasked"] for a in res.answers] == [False, True, False]
    assert [a["concept"] for a in res.answers] == ["red-themed scenes",
                                                   "red clothes, red vehicles", "red objects"]
    assert len(reask_prompts(lm)) == 1 and len(lm.prompts) == 3 + 3 + 1
    assert res.candidates == ["red-themed scenes", "red clothes, red vehicles", "red objects"]


def test_strict_guards_reject_what_reference_keeps(tmp_path):
    answers = ["red-themed scenes", "red-themed scenes",   # copies an example twice: failed
               "red cars, red dresses", "",                # commas, then empty: failed
               "Label: red objects: mostly"]               # after the last ':'
    res, lm = run("strict", answers, tmp_path)
    assert [a["status"] for a in res.answers] == ["failed: copied an example", "failed: empty",
                                                  "ok"]
    assert res.candidates == ["mostly"]
    assert len(reask_prompts(lm)) == 2


def test_reference_keeps_odd_answers_and_records_empty_ones(tmp_path):
    res, lm = run("reference", ["..", "!!! ???", "x, y", ""], tmp_path)
    assert [a["concept"] for a in res.answers] == ["", "!!! ???", ""]
    # nothing to keep in an empty answer (the released code would fail on it), the re-ask's too
    assert [a["status"] for a in res.answers] == ["failed: empty", "ok", "failed: empty"]
    assert res.candidates == ["!!! ???"]
    assert len(reask_prompts(lm)) == 1  # only the comma answer; "" is not asked again


def test_reference_uses_simplifications_as_answered(tmp_path):
    backend = ScriptedLM(["bananas", "Label: red dress", "red apple"])
    res = propose_concepts(CAPTIONS, CachedLanguageModel(backend, tmp_path / "r.jsonl"), seed=0,
                           unit=1, summaries=1, guards="reference")
    assert res.simplified == ["bananas", "Label: red dress", "red apple"]
    strict = propose_concepts(CAPTIONS, CachedLanguageModel(backend, tmp_path / "r.jsonl"),
                              seed=0, unit=1, summaries=1, guards="strict")
    # strict: a hallucinated simplification falls back to its caption; the preamble goes
    assert strict.simplified == ["a photo of a red car", "red dress", "red apple"]
    with pytest.raises(NdUtilsError, match="llm.guards"):
        propose_concepts(CAPTIONS, CachedLanguageModel(backend, tmp_path / "r.jsonl"), seed=0,
                         unit=1, guards="loose")


def test_parse_answer_reference():
    assert parse_answer_reference("Label: red: themed") == "red"
    assert parse_answer_reference("  striped fur \n") == "striped fur"
    assert parse_answer_reference("no colon") == "no colon"


def test_guards_are_configured_and_part_of_the_stage_key(tmp_path):
    assert nd.load_config("paper")["llm.guards"] == "reference"
    assert nd.load_config("offline")["llm.guards"] in ("reference", "strict")
    assert "llm.guards" in STAGE.reads
    cfg = nd.load_config("offline", [f"data_dir={tmp_path}"])
    keys = {g: concepts_key(cfg.with_overrides({"llm.guards": g}), "fc", "captions-key")
            for g in ("reference", "strict")}
    assert keys["reference"] != keys["strict"]
    with pytest.raises(nd.ConfigError, match="llm.guards"):
        nd.load_config("offline", ["llm.guards=loose"])


def test_stage_04_passes_the_configured_guards(tmp_path):
    captions = pd.DataFrame({"unit": [4] * 3, "rank": [0, 1, 2], "caption": CAPTIONS})
    out = {}
    for guards in ("reference", "strict"):
        cfg = nd.load_config("offline", [f"data_dir={tmp_path / guards}", "llm.summaries=1",
                                         f"llm.guards={guards}"])
        lm = CachedLanguageModel(ScriptedLM(SIMPLE + ["red-themed scenes", "red vehicles"]),
                                 tmp_path / guards / "llm.jsonl")
        out[guards] = generate_concepts(cfg, "fc", captions, "captions-key", lm=lm,
                                        progress=False)
    assert out["reference"].for_unit(4) == ["red-themed scenes"]
    assert out["strict"].for_unit(4) == ["red vehicles"]  # the copy was asked again
    assert out["reference"].manifest["params"]["llm.guards"] == "reference"


# ------------------------------------------------------------------ point 6: diffusers
@pytest.fixture
def from_pretrained_calls(monkeypatch):
    import diffusers

    calls = []
    real = diffusers.DiffusionPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(spy))
    return calls


def test_dtype_reaches_from_pretrained_as_torch_dtype(tiny_sd_dir, from_pretrained_calls):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        synth = DiffusersSynthesizer(str(tiny_sd_dir), dtype=torch.float16)
        assert from_pretrained_calls == []  # construction loads nothing ...
        synth.pipe                          # ... the first use does
    # torch_dtype: the name diffusers 0.30 (our minimum) to 0.39 honour; 0.40+ accept it too
    assert from_pretrained_calls == [{"torch_dtype": torch.float16}]
    assert synth.pipe.unet.dtype == synth.pipe.text_encoder.dtype == torch.float16
    assert synth.pipe.vae.dtype == torch.float16
    assert not [w for w in seen if "torch_dtype" in str(w.message)]
    cpu = DiffusersSynthesizer(str(tiny_sd_dir))  # fp32 unless on CUDA
    cpu.pipe
    assert from_pretrained_calls[-1] == {"torch_dtype": torch.float32}
    assert cpu.pipe.unet.dtype == torch.float32 and "cpu-seeds" in cpu.backend_id


def test_dtype_is_enforced_when_a_release_ignores_the_argument(tiny_sd_dir, monkeypatch):
    import diffusers

    real = diffusers.DiffusionPipeline.from_pretrained.__func__

    def ignoring(cls, model, **kwargs):  # what 0.30-0.39 did with `dtype=`
        return real(cls, model)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(ignoring))
    synth = DiffusersSynthesizer(str(tiny_sd_dir), dtype=torch.float16)
    assert synth.pipe.unet.dtype == synth.pipe.text_encoder.dtype == torch.float16


def test_one_cpu_generator_per_image_whatever_the_device(tiny_sd_dir):
    synth = DiffusersSynthesizer(str(tiny_sd_dir), steps=2, height=64, width=64, batch_size=2)
    real = synth.pipe
    seen = []

    def recording(**kw):
        seen.append(kw["generator"])
        return real(**kw)

    synth.pipe = recording
    synth.device = torch.device("cuda")  # as on a GPU: the noise must still come from the CPU
    out = synth.generate("One realistic image of a dog", [5, 6, 7])
    assert [len(g) for g in seen] == [2, 1]
    gens = [g for batch in seen for g in batch]
    assert all(isinstance(g, torch.Generator) and g.device.type == "cpu" for g in gens)
    assert [g.initial_seed() for g in gens] == [5, 6, 7]
    assert len({id(g) for g in gens}) == 3
    assert [info["seed"] for _, _, info in out] == [5, 6, 7]


def test_stage_keys_name_the_diffusers_backend_without_loading_it(tiny_sd_dir, tmp_path,
                                                                  monkeypatch):
    """Stages 06 and 08 only look cached concept images up: the configured synthesizer names
    its backend (the same id, so the same keys, as a loaded one) and never builds a pipeline."""
    import diffusers

    from nd_utils.backends.synthesizers import diffusers_backend_id
    from nd_utils.stages.synthesis import concept_image_key, concept_images, load_synthesizer_from_config

    cfg = nd.load_config("offline", [
        f"data_dir={tmp_path}", "device=cpu", "synthesis.name=diffusers",
        f"synthesis.model={tiny_sd_dir}", "synthesis.steps=2", "synthesis.height=64",
        "synthesis.width=64", "synthesis.images_per_concept=1"])
    loaded = load_synthesizer_from_config(cfg)
    loaded.pipe  # loads the pipeline
    made, _ = concept_images(cfg, ["a dog"], loaded, progress=False)  # stage 05

    def no_loading(*args, **kwargs):
        raise AssertionError("a diffusers pipeline was loaded to compute a key")

    for cls in (diffusers.DiffusionPipeline, diffusers.StableDiffusionPipeline):
        monkeypatch.setattr(cls, "from_pretrained", no_loading)
    synth = load_synthesizer_from_config(cfg)
    # the id of today's DiffusersSynthesizer on CPU, byte for byte
    assert synth.backend_id == loaded.backend_id == (
        f"diffusers:{tiny_sd_dir}:dpm-multistep:torch.float32:cpu-seeds")
    assert diffusers_backend_id(str(tiny_sd_dir), "dpm-multistep", device="cpu") == \
        synth.backend_id
    assert concept_image_key(cfg, "a dog", synth.backend_id) == made["a dog"].key
    found, stats = concept_images(cfg, ["a dog"], synth, progress=False)   # stage 06 / 08
    assert found["a dog"].key == made["a dog"].key and stats["reused"] == 1
    assert synth._pipe is None
