"""Describe-and-Dissect building blocks: crops, answer parsing, concept generation, scoring."""
import json

import numpy as np
import pytest
import torch
import torchvision.transforms as T

from nd_utils.attention_crops import (box_iou, crop_boxes, normalise_map, spatial_maps,
                                      square_transform)
from nd_utils.stages.candidate_concepts import (answer_problem, clean_candidates, clean_concept,
                                         parse_answer, propose_concepts)
from nd_utils.errors import NdUtilsError
from nd_utils.jsonl_cache import JsonlCache
from nd_utils.backends.answer_cache import CachedLanguageModel, ReplayMissError
from nd_utils.backends.language_models import KeywordsLM, most_frequent_phrase
from nd_utils.backends.prompt_templates import load_template
from nd_utils.scoring import candidate_ranks, rank_by, score_candidates


# ------------------------------------------------------------------ attention crops
def blob_map(size=28, blobs=((4, 4, 6), (18, 16, 4))):
    m = torch.zeros(size, size)
    for y, x, r in blobs:
        m[y:y + r, x:x + r] = 1.0
    return m


def test_crop_boxes_largest_first_in_image_pixels():
    boxes = crop_boxes(blob_map(), size=280)
    assert len(boxes) == 2
    (a, b) = boxes
    area = lambda bx: (bx[2] - bx[0]) * (bx[3] - bx[1])  # noqa: E731
    assert area(a) > area(b)
    # the big blob covers map cells 4..10 -> pixels 40..100 at 10x (bilinear softens the edge)
    assert abs(a[0] - 40) <= 6 and abs(a[2] - 100) <= 6 and abs(a[1] - 40) <= 6


def test_crop_boxes_respect_iou_and_count_limits():
    many = tuple((y, x, 3) for y in (2, 10, 18) for x in (2, 10, 18))
    assert len(crop_boxes(blob_map(blobs=many), size=280, max_per_image=4)) == 4
    # a region covering nearly the whole image is dropped (IoU with the image >= 0.8)
    whole = torch.ones(20, 20)
    whole[0, 0] = 0
    assert crop_boxes(whole, size=200) == []
    # overlapping boxes above the IoU limit are skipped
    kept = crop_boxes(blob_map(blobs=((2, 2, 12), (16, 16, 8))), size=280, iou_max=0.5)
    assert all(box_iou(a, b) <= 0.5 for i, a in enumerate(kept) for b in kept[i + 1:])


def test_maps_are_normalised_not_overflowed():
    # raw activations far above 255 would wrap around as uint8 (the reference's bug)
    m = blob_map() * 900 + 300
    assert torch.allclose(normalise_map(m), blob_map())
    assert crop_boxes(m, size=280) == crop_boxes(blob_map(), size=280)
    assert normalise_map(torch.full((5, 5), 3.0)) is None
    assert crop_boxes(torch.full((5, 5), 3.0)) == []


def test_spatial_maps_from_conv_tokens_and_vectors():
    assert spatial_maps(torch.zeros(2, 8, 7, 7)).shape == (2, 8, 7, 7)
    assert spatial_maps(torch.zeros(2, 8)) is None
    tokens = torch.arange(2 * 50 * 4, dtype=torch.float32).reshape(2, 50, 4)
    maps = spatial_maps(tokens)  # CLS + 7x7 patches -> patches only
    assert maps.shape == (2, 4, 7, 7)
    assert torch.equal(maps[0, :, 0, 0], tokens[0, 1])  # first patch, not the CLS token
    with pytest.raises(NdUtilsError, match="square patch grid"):
        spatial_maps(torch.zeros(1, 7, 4))


def test_square_transform_drops_the_centre_crop():
    pre = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    from PIL import Image
    im = Image.new("RGB", (375, 375))
    assert square_transform(pre)(im).shape == (3, 224, 224)
    kinds = [type(t) for t in square_transform(pre).transforms]
    assert T.CenterCrop not in kinds


# ------------------------------------------------------------------ answers and candidates
@pytest.mark.parametrize("raw, concept", [
    ("Label: red-themed scenes.", "red-themed scenes"),
    ('"striped textiles"', "striped textiles"),
    ("\n\n  dogs on grass\nbecause the images show dogs", "dogs on grass"),
    ("The concept is: **bird feathers**", "bird feathers"),
    ("- golden retriever on grass\n- golden retriever", "golden retriever on grass"),
    ("1. striped fur", "striped fur"),
    ('the answer is "a bartender\'s specialty', "a bartender's specialty"),
    ("The concept label is bird nests.", "bird nests"),
])
def test_parse_answer(raw, concept):
    assert parse_answer(raw) == concept


def test_answer_problems_and_cleaning():
    assert answer_problem("") == "empty"
    assert answer_problem("!!! ???") == "no letters"
    assert answer_problem("dogs, cats") == "commas"
    assert answer_problem("x" * 200) == "too long"
    assert answer_problem(" ".join(["word"] * 13)) == "too long"
    assert answer_problem("red-themed scenes") is None
    from nd_utils.stages.candidate_concepts import example_lines
    copied = example_lines(load_template("summarize.v1"))
    assert answer_problem("Red-themed scenes", copied) == "copied an example"
    assert answer_problem("a red barn in a field", copied) == "copied an example"
    assert answer_problem("red barns", copied) is None
    assert clean_concept("Floral Design.") == "floral design"
    assert clean_candidates(["Vector  Graphics"]) == ["vector graphics",
                                                      "vector graphics background"]
    assert clean_candidates(["Dogs.", "dogs", "", "Cats"]) == ["dogs", "cats"]


class ScriptedLM:
    """A backend answering from a list, recording every prompt it saw."""

    structured = False

    def __init__(self, answers, model_id="scripted"):
        self.answers, self.prompts, self.model_id = list(answers), [], model_id

    def complete(self, prompt, *, temperature, seed):
        self.prompts.append(prompt)
        if self.answers:
            return self.answers.pop(0)
        if "Shorten the image description" in prompt:  # simplify: echo the caption
            return prompt.rsplit("[user]\n", 1)[1].strip()
        return "plain label"


CAPTIONS = [f"a photo of a {w}" for w in ["red car", "red dress", "red apple"]]


def test_commas_are_reasked_once_and_failures_recorded(tmp_path):
    # 3 simplify answers, then: call 0 commas -> re-ask ok; call 1 empty -> re-ask empty -> failed
    answers = ["red car", "red dress", "red apple",
               "red things, cars", "red objects",
               "", "   ",
               "Label: Red Scenes."]
    lm = CachedLanguageModel(ScriptedLM(answers), tmp_path / "c.jsonl")
    res = propose_concepts(CAPTIONS, lm, seed=0, unit=3, summaries=3)
    status = [a["status"] for a in res.answers]
    assert status == ["ok", "failed: empty", "ok"]
    assert res.answers[0]["reasked"] and res.answers[1]["reasked"] and not res.answers[2]["reasked"]
    assert "re-asked" in res.answers[1]["raw"]  # the raw text is kept
    assert res.candidates == ["red objects", "red scenes"]


def test_shuffles_are_seeded_and_answers_cached(tmp_path):
    cache = tmp_path / "c.jsonl"
    first = ScriptedLM([])
    propose_concepts(CAPTIONS * 3, CachedLanguageModel(first, cache), seed=7, unit=0)
    again = ScriptedLM([])
    lm = CachedLanguageModel(again, cache)
    propose_concepts(CAPTIONS * 3, lm, seed=7, unit=0)
    assert again.prompts == [] and lm.calls == 0 and lm.cache.hits > 0  # all from the cache
    other = ScriptedLM([])
    propose_concepts(CAPTIONS * 3, CachedLanguageModel(other, tmp_path / "d.jsonl"), seed=8,
                     unit=0)
    summaries = [p for p in first.prompts if "State one coherent" in p]
    assert len(set(summaries)) > 1  # the list is shuffled between calls
    assert summaries != [p for p in other.prompts if "State one coherent" in p]  # seed matters


def test_templates_are_chats_with_example_turns():
    tpl = load_template("summarize.v1")
    msgs = tpl.messages(descriptions="- a dog\n- a puppy")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant",
                                         "user"]
    assert msgs[2]["content"] == "multicolored textiles"
    assert msgs[4]["content"] == "red-themed scenes"
    assert msgs[-1]["content"] == "- a dog\n- a puppy"
    assert "1-5 words" in msgs[0]["content"]
    assert tpl.fill(descriptions="x") != tpl.fill(descriptions="y")


def test_replay_answers_from_cache_and_fails_on_miss(tmp_path):
    cache = tmp_path / "c.jsonl"
    tpl = load_template("simplify.v1")
    live = CachedLanguageModel(ScriptedLM(["red car"]), cache)
    assert live.ask(tpl, {"caption": "a red car"}, seed=0) == "red car"
    replay = CachedLanguageModel(ScriptedLM(["never used"]), cache, mode="replay")
    assert replay.ask(tpl, {"caption": "a red car"}, seed=0) == "red car"
    with pytest.raises(ReplayMissError, match="llm.mode: live"):
        replay.ask(tpl, {"caption": "a blue car"}, seed=0)
    with pytest.raises(ReplayMissError):  # the seed is part of the key
        replay.ask(tpl, {"caption": "a red car"}, seed=1)
    record = json.loads(cache.read_text().splitlines()[0])
    assert set(record["request"]) == {"model", "template", "template_sha256", "prompt",
                                      "temperature", "seed"}


def test_jsonl_cache_survives_a_torn_line(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = JsonlCache(path)
    cache.put("k1", {"a": 1}, "one")
    with open(path, "a") as fh:
        fh.write('{"key": "k2", "answ')  # a crash mid-write
    with pytest.warns(UserWarning, match="unreadable"):
        reread = JsonlCache(path)
        assert reread.get("k1")["answer"] == "one" and reread.get("k2") is None
    reread.put("k3", {"a": 3}, "three")
    assert JsonlCache(path).get("k3")["answer"] == "three"


def test_jsonl_cache_forgets_answers_whose_file_was_deleted(tmp_path):
    """A long-lived process (a Ray worker) must not answer from memory after the store was
    cleared: the file is the truth."""
    path = tmp_path / "c.jsonl"
    cache = JsonlCache(path)
    cache.put("k1", {"a": 1}, "one")
    assert cache.get("k1")["answer"] == "one"
    path.unlink()
    assert cache.get("k1") is None and "k1" not in cache
    cache.put("k2", {"a": 2}, "two")
    assert [json.loads(ln)["key"] for ln in path.read_text().splitlines()] == ["k2"]


def test_keywords_backend_finds_the_common_phrase():
    assert most_frequent_phrase(["a red sports car", "red sports car racing", "a bus"]) == \
        "red sports car"
    lm = KeywordsLM()
    assert lm.complete("", temperature=0, seed=0, task="simplify.v1",
                       fields={"caption": "a photo of a tabby cat"}) == "tabby cat"


# ------------------------------------------------------------------ scoring
ACTS = {"a": np.array([5.0, 1.0]), "b": np.array([4.0, 3.0])}


def test_ranks_and_rank_based_scores_by_hand():
    H = candidate_ranks(ACTS)  # global order: a5 b4 b3 a1
    assert H["a"].tolist() == [0, 3] and H["b"].tolist() == [1, 2]
    t = score_candidates(ACTS, beta=5).set_index("candidate")
    assert t.loc["a", "mean"] == 1.5 and t.loc["b", "mean"] == 1.5
    assert t.loc["a", "topk_sq_mean"] == 4.5 and t.loc["b", "topk_sq_mean"] == 2.5
    assert score_candidates(ACTS, beta=1).set_index("candidate").topk_sq_mean.tolist() == [0, 1]


def test_image_products_and_topk_compare_by_hand():
    e = torch.eye(3)
    dtop = e[[0]]                                    # D_top embedding = e0
    feats = {"a": torch.stack([e[0], e[1]]), "b": torch.stack([e[2], e[2]])}
    t = score_candidates(ACTS, beta=5, zeta=1, dtop_features=dtop, image_features=feats)
    t = t.set_index("candidate")
    # zeta=1: only a's best image (e0) is in the global top-1; b has none -> -1
    assert t.loc["a", "image_products"] == pytest.approx(1.0)
    assert t.loc["b", "image_products"] == -1.0
    # topk-sq-mean order: b (2.5) then a (4.5) -> R_b = 2, R_a = 1
    assert t.loc["a", "topk_compare"] == pytest.approx(1.0)
    assert t.loc["b", "topk_compare"] == pytest.approx(-2.0)


@pytest.mark.parametrize("scoring, best", [("mean", "a"), ("topk-sq-mean", "b"),
                                           ("image-products", "a"), ("topk-compare", "a")])
def test_every_scoring_is_selectable(scoring, best):
    e = torch.eye(3)
    feats = {"a": torch.stack([e[0], e[1]]), "b": torch.stack([e[2], e[2]])}
    t = score_candidates(ACTS, zeta=1, dtop_features=e[[0]], image_features=feats)
    ranked = rank_by(t, scoring)
    assert ranked.candidate.iloc[0] == best and ranked["rank"].tolist() == [1, 2]
    with pytest.raises(NdUtilsError, match="topk-compare"):
        rank_by(t, "topk_compare_typo")
