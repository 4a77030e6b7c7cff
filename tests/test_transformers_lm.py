"""The offline transformers language model: converted-once weights, prompt-prefix reuse and
thread handling change the speed of DnD's 04 stage, never its answers."""
import pytest
import torch

from nd_utils.backends import language_models as lmod
from nd_utils.backends.language_models import SMOLLM2, SMOLLM2_FILE, TransformersLM
from nd_utils.backends.prompt_templates import load_template

try:
    lmod.smollm2_path()
except Exception as exc:  # noqa: BLE001 - any reason the file is absent
    pytest.skip(f"SmolLM2 GGUF not installed ({exc})", allow_module_level=True)


@pytest.fixture(scope="module")
def lm():
    return TransformersLM(SMOLLM2)


def _jobs():
    simp, summ = load_template("simplify.v1"), load_template("summarize.v1")
    caps = ["a photo of a goose standing in the grass", "a photo of a cannon on a wall",
            "a photo of a strawberry, or possibly a raspberry"]
    return ([simp.messages(caption=c) for c in caps]
            + [summ.messages(descriptions="\n".join(f"- {c}" for c in caps))])


def test_converted_weights_equal_the_gguf_ones(lm):
    from transformers import AutoModelForCausalLM

    src = lmod.smollm2_path()
    gguf = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_FILE,
                                                dtype=torch.float32).eval()
    ref, got = gguf.state_dict(), lm.model.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    # the id names the file's content, so answers replay on another machine or checkout
    assert lm.model_id.split(":")[2] == lmod.sha256_file(src / SMOLLM2_FILE)[:12]


def test_prefix_reuse_gives_the_same_answers(lm, monkeypatch):
    jobs = _jobs()
    with_prefix = [lm.complete("", temperature=t, seed=i, messages=m)
                   for i, m in enumerate(jobs) for t in (0.0, 0.3)]
    assert len(lm._prefixes) == 2                      # one per template, computed once
    monkeypatch.setattr(lm, "_prefix_cache", lambda head, ids: None)
    plain = [lm.complete("", temperature=t, seed=i, messages=m)
             for i, m in enumerate(jobs) for t in (0.0, 0.3)]
    assert with_prefix == plain and all(a.strip() for a in plain)


def test_threads_are_restored(lm):
    before = torch.get_num_threads()
    lm.complete("", temperature=0.0, seed=0, messages=_jobs()[0])
    assert torch.get_num_threads() == before
