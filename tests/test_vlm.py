"""Tests for nd_utils.backends.vlm: ConSE on real photos, open_clip offline, decode-once adapter, errors."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from nd_utils.errors import OfflineError, UnknownNameError
from nd_utils.backends.vlm import list_vlms, load_vlm


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    return path if path.exists() else None


def _shipped_photos() -> dict[str, Path]:
    """concept -> photo shipped inside an installed package (strawberry, cat, coffee)."""
    found = {}
    foolbox = _package_file("foolbox", "data")
    if foolbox is not None:
        hits = sorted(foolbox.glob("imagenet_*_949.jpg"))  # ImageNet class 949 = strawberry
        if hits:
            found["strawberry"] = hits[0]
    for concept, name in (("cat", "chelsea.png"), ("coffee", "coffee.png")):
        path = _package_file("skimage", "data", name)
        if path is not None:
            found[concept] = path
    return found


def _batch(vlm, paths) -> torch.Tensor:
    return torch.stack([vlm.preprocess(Image.open(p).convert("RGB")) for p in paths])


def _assert_unit_rows(x: torch.Tensor) -> None:
    assert x.dtype == torch.float32
    assert torch.allclose(x.norm(dim=1), torch.ones(len(x)), atol=1e-5)


@pytest.fixture(scope="module")
def conse():
    return load_vlm("conse", device="cpu")


@pytest.fixture(scope="module")
def photos(conse):
    found = _shipped_photos()
    if not found:
        pytest.skip("no shipped photos (foolbox / scikit-image not installed)")
    return found, conse.encode_images(_batch(conse, found.values()))


def test_list_vlms_and_unknown_name():
    assert {"conse", "open_clip:ViT-B-16:openai"} <= set(list_vlms())
    with pytest.raises(UnknownNameError, match="conse") as err:
        load_vlm("cnose")
    assert "open_clip:<model>:<pretrained>" in str(err.value)
    with pytest.raises(UnknownNameError, match="open_clip:ViT-B-16:openai"):
        load_vlm("openclip:ViT-B-16")


def test_conse_rejects_bad_top_t():
    with pytest.raises(ValueError, match="top_t"):
        load_vlm("conse", top_t=0)


def test_conse_shipped_photos_score_their_concept_above_bicycle(conse, photos):
    found, images = photos
    concepts = list(found)
    texts = conse.encode_texts(concepts + ["bicycle"])
    scores = images @ texts.T                                   # [B, M] cosines
    for i, concept in enumerate(concepts):
        assert scores[i, i] > scores[i, -1] + 0.1, (concept, scores[i].tolist())
    if "strawberry" not in found:
        pytest.skip("foolbox's strawberry photo not installed; checked cat/coffee only")


def test_conse_imagenet_sample_strawberry(conse):
    from nd_utils.imagenet_sample import local_copy_dir
    hits = sorted(local_copy_dir().glob("n07745940_strawberry.JPEG"))
    if not hits:
        pytest.skip(f"the ImageNet sample's strawberry is not in {local_copy_dir()} (set "
                    f"ND_SHARED_DIR to the folder holding data/imagenet-sample-images)")
    image = conse.encode_images(_batch(conse, hits[:1]))
    s = (image @ conse.encode_texts(["strawberry", "bicycle"]).T)[0]
    assert s[0] > s[1]


def test_conse_shapes_normalisation_determinism(conse, photos):
    found, images = photos
    assert images.shape == (len(found), 384) and conse.metadata["embed_dim"] == 384
    _assert_unit_rows(images)
    texts = conse.encode_texts(["red", "striped", "dog", "bicycle", "sky"], batch_size=2)
    assert texts.shape == (5, 384)
    _assert_unit_rows(texts)
    # Same call, same bits; another batching only changes padding, so rounding differs.
    words = ["red", "striped", "dog", "bicycle", "sky"]
    assert torch.equal(texts, conse.encode_texts(words, batch_size=2))
    assert torch.allclose(texts, conse.encode_texts(words), atol=1e-5)
    again = conse.encode_images(_batch(conse, list(found.values())))
    assert torch.allclose(again, images, atol=1e-6)
    assert torch.allclose(conse.encode_texts(["cat"], template="a photo of {}"),
                          conse.encode_texts(["a photo of cat"]))
    assert conse.encode_texts([]).shape == (0, 384)
    assert conse.class_embeddings.shape == (1000, 384)


def test_conse_backend_id_names_weights(conse):
    bid = conse.backend_id
    assert bid.startswith("conse:T=10:") and "efficientnet-lite2" in bid and "all-MiniLM-L6-v2@" in bid


def test_conse_top_t_one_is_the_top_class_embedding(conse, photos):
    found, _ = photos
    x = _batch(conse, list(found.values())[:1])
    idx, w = conse.class_weights(x)
    assert idx.shape == w.shape == (1, 10)
    assert torch.allclose(w.sum(dim=1), torch.ones(1)) and bool((w[:, :-1] >= w[:, 1:]).all())
    conse.top_t = 1
    try:
        one = conse.encode_images(x)
    finally:
        conse.top_t = 10
    assert torch.allclose(one[0], conse.class_embeddings[idx[0, 0]], atol=1e-6)


def test_image_consumer_in_decode_once(conse, tmp_path):
    from nd_utils.decode_once import CacheJob, run_decode_once
    from nd_utils.probes import load_probe
    from nd_utils.store import ArtifactStore

    probe = load_probe("offline-sample").subset(6)
    consumer = conse.image_consumer()
    assert consumer is conse.image_consumer()
    assert consumer.name == "vlm:conse" and consumer.outputs == ["image_features"]
    job = CacheJob(consumer=consumer, output="image_features", stage="test", key="k",
                   version=1, params={})
    store = ArtifactStore(tmp_path)
    art = run_decode_once(probe, [job], store, batch_size=3, chunk_size=4, progress=False)
    from safetensors.torch import load_file

    values = load_file(str(art[("test", "k")].file("activations.safetensors")))["activations"]
    assert values.shape == (6, 384)
    _assert_unit_rows(values)
    direct = conse.encode_images(torch.stack([conse.preprocess(probe.load_image(i)) for i in (0, 5)]))
    assert torch.allclose(values[[0, 5]], direct, atol=1e-5)


@pytest.fixture(scope="module")
def random_clip():
    pytest.importorskip("open_clip")
    return load_vlm("open_clip:ViT-B-16:none")


def test_open_clip_random_weights_offline(random_clip):
    vlm = random_clip
    assert vlm.backend_id == "open_clip:ViT-B-16:none:random-seed0"
    photos = list(_shipped_photos().values())[:1]
    x = _batch(vlm, photos) if photos else torch.rand(1, 3, 224, 224)
    assert x.shape[1:] == (3, 224, 224)
    images = vlm.encode_images(x)
    texts = vlm.encode_texts(["cat", "bicycle", "a striped thing"], batch_size=2)
    assert images.shape == (len(x), 512) and texts.shape == (3, 512)
    _assert_unit_rows(images)
    _assert_unit_rows(texts)
    assert torch.equal(texts, vlm.encode_texts(["cat", "bicycle", "a striped thing"], batch_size=2))
    assert torch.allclose(texts, vlm.encode_texts(["cat", "bicycle", "a striped thing"]), atol=1e-5)
    out = vlm.image_consumer()(x)
    assert set(out) == {"image_features"} and torch.allclose(out["image_features"], images)


def test_open_clip_reduced_precision(random_clip):
    """vlm.dtype: the same seeded weights computing in bfloat16 (float16 is slow on CPU, the
    same code path), inputs cast to the model, outputs float32; the dtype is in backend_id."""
    half = load_vlm("open_clip:ViT-B-16:none", dtype="bfloat16")
    assert half.backend_id == random_clip.backend_id + ":bfloat16"
    assert half.model.visual.conv1.weight.dtype == torch.bfloat16
    x = torch.rand(1, 3, 224, 224)
    images, texts = half.encode_images(x), half.encode_texts(["a striped thing"])
    assert images.dtype == texts.dtype == torch.float32
    _assert_unit_rows(images)
    ref_i, ref_t = random_clip.encode_images(x), random_clip.encode_texts(["a striped thing"])
    assert (images * ref_i).sum(1).min() > 0.99 and (texts * ref_t).sum(1).min() > 0.99
    assert not torch.equal(images, ref_i)


def test_vlm_dtype_choices_and_conse_float32_only(tmp_path):
    from nd_utils.backends.configured import load_vlm_from_config
    from nd_utils.context import load_config
    from nd_utils.errors import ConfigError

    with pytest.raises(ConfigError, match="float32"):
        load_vlm("conse", dtype="float16")    # before any model is loaded
    with pytest.raises(ConfigError, match="conse"):
        load_vlm_from_config(load_config("offline", [f"data_dir={tmp_path}", "device=cpu",
                                                     "vlm.dtype=bfloat16"]))
    pytest.importorskip("open_clip")
    with pytest.raises(ConfigError, match="bfloat16"):
        load_vlm("open_clip:ViT-B-16:none", dtype="half")


def test_open_clip_pretrained_offline_names_conse(monkeypatch):
    factory = pytest.importorskip("open_clip.factory")

    def no_network(*args, **kwargs):
        raise OSError("simulated: no network")

    monkeypatch.setattr(factory, "download_pretrained", no_network)
    with pytest.raises(OfflineError, match="conse") as err:
        load_vlm("open_clip:ViT-B-16:openai")
    assert "configs/offline.yaml" in str(err.value)


def test_open_clip_unknown_tag_and_model():
    pytest.importorskip("open_clip")
    with pytest.raises(UnknownNameError, match="openai"):
        load_vlm("open_clip:ViT-B-16:opnai")
    with pytest.raises(UnknownNameError, match="ViT-B-16"):
        load_vlm("open_clip:ViT-B-61:openai")
