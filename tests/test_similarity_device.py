"""Where the similarities run (issue 20): device policy, chunks from free memory, OOM halving and
CPU fallback, lazily computed P, pinned DataLoader batches. CUDA branches are tested by logic
(torch.cuda.is_available / mem_get_info monkeypatched); nothing here needs a GPU."""
import warnings

import pytest
import torch

from nd_utils import decode_once, machine, similarity_formulas
from nd_utils.stages import clip_dissect
from nd_utils.machine import config_device, fit_chunk, pins_memory
from nd_utils.cosines import Cosines, factorized
from nd_utils.errors import NdUtilsError
from nd_utils.similarity import get_similarity, list_similarities, similarity_on_device
from nd_utils.similarity_blocks import neuron_chunk
from test_clip_dissect import wired  # noqa: F401  (the stage-02 fixture)

GiB = 2**30


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA 'present' with `free[0]` bytes free; no CUDA call reaches the driver."""
    free = [80 * GiB]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 141 * GiB))
    return free


def test_device_policy_follows_config_and_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config_device({"device": "auto"}).type == "cpu"
    assert config_device({}).type == "cpu"
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        config_device({"device": "cuda"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config_device({"device": "auto"}).type == "cuda"
    assert config_device({"device": "cuda"}).type == "cuda"
    assert config_device({"device": "cpu"}).type == "cpu"


def test_chunk_from_free_memory_is_bounded_and_fits(fake_cuda):
    item, fixed = 3 * 2**20, GiB
    for free in (64 * GiB, 8 * GiB, 3 * GiB, GiB // 2):
        fake_cuda[0] = free
        c = fit_chunk(item, device="cuda", hi=2048, fixed_bytes=fixed)
        assert 1 <= c <= 2048
        if c > 1:  # 1 is the floor even when nothing fits; OOM handling takes over then
            assert fixed + c * item <= 0.5 * free
            assert fixed + (c + 1) * item > 0.5 * free or c == 2048
    fake_cuda[0] = 64 * GiB
    assert fit_chunk(item, device="cuda", hi=2048, fixed_bytes=fixed) == 2048
    assert fit_chunk(item, device="cpu", hi=77) == 77  # no figure on the CPU: the whole range
    # the paper's shape: every neuron at once on a big GPU, fewer on a small one, never 0
    paper = dict(n_images=113_000, n_concepts=20_000, n_neurons=2048)
    assert neuron_chunk("soft_wpmi", **paper, device="cpu") is None  # CPU keeps its defaults
    fake_cuda[0] = 80 * GiB
    assert neuron_chunk("soft_wpmi", **paper, device="cuda") == 2048
    fake_cuda[0] = 4 * GiB
    small = neuron_chunk("soft_wpmi", **paper, device="cuda")
    assert 1 <= small < 2048
    fake_cuda[0] = 24 * GiB
    rr = neuron_chunk("rank_reorder", **paper, device="cuda")
    assert 1 <= rr < neuron_chunk("rank_reorder", **paper, device="cuda", top_fraction=0.01)


def test_oom_halves_the_chunk_then_falls_back_to_cpu(fake_cuda):
    calls = []

    def fake(P, A, *, device, chunk_size, layer=None):
        calls.append((torch.device(device).type, chunk_size))
        if torch.device(device).type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return torch.zeros(A.shape[1], P.shape[1])

    P, A = torch.rand(10, 3), torch.rand(10, 8)
    with pytest.warns(UserWarning, match="out of CUDA memory.*CPU"):
        out = similarity_on_device(fake, P, A, device="cuda", layer="fc")
    assert out.shape == (8, 3)
    assert calls == [("cuda", 8), ("cuda", 4), ("cuda", 2), ("cuda", 1), ("cpu", None)]

    calls.clear()

    def fits_at_2(P, A, *, device, chunk_size):
        calls.append(chunk_size)
        if chunk_size > 2:
            raise torch.cuda.OutOfMemoryError("fake")
        return torch.ones(A.shape[1], P.shape[1])

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning when a smaller chunk fits
        assert similarity_on_device(fits_at_2, P, A, device="cuda", chunk_size=6).sum() == 24
    assert calls == [6, 3, 1]


def test_first_cuda_chunk_comes_from_free_memory(fake_cuda):
    seen = []

    def soft_wpmi(P, A, *, device, chunk_size, top_k=100):
        seen.append(chunk_size)
        return torch.zeros(A.shape[1], P.shape[1])

    fake_cuda[0] = 2 * GiB
    P = Cosines(torch.rand(3000, 4), torch.rand(700, 4))
    similarity_on_device(soft_wpmi, P, torch.rand(3000, 50), device="cuda", top_k=100)
    assert seen == [neuron_chunk("soft_wpmi", 3000, 700, 50, "cuda", top_k=100)]
    assert 1 <= seen[0] <= 50


@pytest.mark.parametrize("name", list_similarities())
def test_lazy_cosines_give_the_dense_results_bit_for_bit(name):
    # shapes with tails: 16 + 3 rows of the normaliser, a last cosine slice 6 wide, U < N
    g = torch.Generator().manual_seed(0)
    for n, m, k in ((403, 1030, 21), (1001, 301, 3)):
        img = torch.nn.functional.normalize(torch.randn(n, 32, generator=g), dim=1)
        txt = torch.nn.functional.normalize(torch.randn(m, 32, generator=g), dim=1)
        A = torch.randn(n, k, generator=g)
        f = get_similarity(name)
        assert torch.equal(f(Cosines(img, txt), A), f(img @ txt.T, A))
        assert torch.equal(similarity_on_device(name, Cosines(img, txt), A, device="cpu"),
                           f(img @ txt.T, A))


@pytest.mark.parametrize("name", list_similarities())
def test_cosine_blocks_by_chunks_of_the_long_factor_are_bit_identical(name, monkeypatch):
    # chunks of 100: 403 rows end in a 3-row tail, 1030 concepts in a 30-column one (both join
    # their neighbour); the products are still the dense P's entries, bit for bit
    monkeypatch.setattr(Cosines, "_CHUNK", 100)
    img, txt, A = _unit_factors(5, 403, 1030, 7, d=32)
    P = Cosines(img, txt)
    dense = img @ txt.T
    assert torch.equal(P.columns(0, 64), dense[:, :64])
    assert torch.equal(P.rows(0, 64), dense[:64])
    f = get_similarity(name)
    assert torch.equal(f(P, A), f(dense, A))


def test_factorized_p_is_the_lazy_cosines():
    img, txt = torch.rand(50, 8), torch.rand(40, 8)
    P = factorized(img, txt)
    assert isinstance(P, Cosines) and P.shape == (50, 40)
    assert torch.equal(P.dense(), img @ txt.T)
    with pytest.raises(NdUtilsError, match="one D"):
        factorized(img, torch.rand(40, 7))
    bad = txt.clone()
    bad[7, 0] = float("nan")
    with pytest.raises(NdUtilsError, match=r"concept\(s\) \[7\]"):
        similarity_formulas.wpmi(Cosines(img, bad), torch.rand(50, 3))


def test_pin_memory_only_for_cuda(monkeypatch):
    seen = []

    class SpyLoader:
        def __init__(self, dataset, **kwargs):
            seen.append(kwargs)

        def __iter__(self):
            return iter(())

    monkeypatch.setattr(decode_once, "DataLoader", SpyLoader)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not pins_memory("cuda")  # no CUDA here: pinning would only warn
    decode_once.compute_chunk(None, [], {}, 0, 0, 0, batch_size=4, num_workers=0, device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    decode_once.compute_chunk(None, [], {}, 0, 0, 0, batch_size=4, num_workers=0,
                              device=torch.device("cuda"))
    assert [kw["pin_memory"] for kw in seen] == [False, True]
    assert decode_once.loader_kwargs("cpu", batch_size=4, num_workers=2) == {
        "batch_size": 4, "num_workers": 2, "shuffle": False, "pin_memory": False}
    assert machine.pins_memory("cuda:1")


def test_stage_02_passes_the_configured_device(wired, monkeypatch):  # noqa: F811
    cfg, probe, _, target = wired
    real, seen = similarity_on_device, []

    def spy(fn, P, A, *, device, **kw):
        seen.append((fn.__name__, torch.device(device).type, type(P).__name__, kw.get("layer")))
        return real(fn, P, A, device="cpu", **kw)

    monkeypatch.setattr(clip_dissect, "similarity_on_device", spy)
    table = clip_dissect.dissect_layer(cfg, "act", probe=probe, target=target)
    assert seen == [("soft_wpmi", "cpu", "Cosines", "act")]   # P by its factors, never whole
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    auto = cfg.with_overrides({"device": "auto"})
    again = clip_dissect.dissect_layer(auto, "act", probe=probe, target=target, force=True)
    assert seen[1] == ("soft_wpmi", "cuda", "Cosines", "act")  # P blocks computed on the device
    assert list(again.description) == list(table.description)


class _LargestOutput:
    """Records the largest tensor any aten op produces while active (a TorchDispatchMode)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        record = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        record.largest = max(record.largest, t.numel())
                return out

        self.largest, self.mode = 0, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def _unit_factors(seed: int, n: int, m: int, k: int, d: int = 16):
    """Seeded unit image features [n, d], text features [m, d] and activations [n, k]."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    return img, txt, torch.randn(n, k, generator=g)


@pytest.mark.parametrize("name", list_similarities())
def test_factorized_p_is_computed_in_blocks_never_whole(name):
    # N x M = 2.4 M entries; the blocks read are at most N x 1024 (cosines' slices) or 64 x M
    n, m, k = 400, 6000, 6
    img, txt, A = _unit_factors(0, n, m, k)
    with _LargestOutput() as seen:
        sim = get_similarity(name)(factorized(img, txt), A)
    assert sim.shape == (k, m)
    assert seen.largest <= n * m // 4, (name, seen.largest)
    with _LargestOutput() as dense:  # the check sees a whole P where one is formed
        get_similarity(name)(img @ txt.T, A)
    assert dense.largest >= n * m


def test_rank_reorder_scores_do_not_depend_on_its_block_width(monkeypatch):
    img, txt, A = _unit_factors(3, 300, 150, 5)
    wide = similarity_formulas.rank_reorder(factorized(img, txt), A)
    monkeypatch.setattr(similarity_formulas, "RANK_BLOCK_ELEMENTS", 300 * 8)   # 8 concepts per block
    assert similarity_formulas._rank_block_width(300) == 8
    narrow = similarity_formulas.rank_reorder(factorized(img, txt), A)
    # embedding_bag's mean over 8 columns rounds a few sums differently from 64: ~1e-6 relative
    assert torch.allclose(narrow, wide, rtol=1e-5, atol=0)
    assert torch.equal(narrow.argmax(1), wide.argmax(1))
    assert torch.equal(similarity_formulas.rank_reorder(img @ txt.T, A), narrow)   # dense = factorized


def test_cubed_in_parts_of_neurons_agrees_with_one_part(monkeypatch):
    img, txt, A = _unit_factors(4, 500, 300, 40)
    whole = similarity_formulas.cos_similarity_cubed(factorized(img, txt), A)
    monkeypatch.setattr(similarity_formulas, "_TRANSFORMED_A_BYTES", 4 * 500 * 16)   # 3 parts
    parts = similarity_formulas.cos_similarity_cubed(factorized(img, txt), A)
    assert torch.allclose(parts, whole, rtol=0, atol=1e-6)   # GEMMs of 14 vs 40 rows round apart
    assert torch.equal(similarity_formulas.cos_similarity_cubed(img @ txt.T, A), parts)


class _FreshAllocations:
    """Counts tensors of at least `numel` entries that aten ops allocate (outputs whose storage
    is none of the inputs', so neither `out=` results, in-place results nor views)."""

    def __init__(self, numel: int):
        from torch.utils._python_dispatch import TorchDispatchMode

        record = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                given = {t.untyped_storage().data_ptr() for t in
                         torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if (isinstance(t, torch.Tensor) and t.numel() >= numel
                            and t.untyped_storage().data_ptr() not in given):
                        record.count += 1
                return out

        self.count, self.mode = 0, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("name", ["wpmi", "soft_wpmi"])
def test_pmi_reuses_its_block_buffers_instead_of_allocating_each(name):
    # ~280 used rows: 5 normaliser items of [64, M] and 4 concept blocks of [U + 1, 256], then a
    # narrower one; each buffer is allocated once per thread, so the count does not grow with
    # the items (it was 20 when every item allocated its own). top_k = 10 and K = 30 keep the
    # other temporaries (embedding_bag's outputs, A.T) under the counted size.
    n, m, k = 2000, 1100, 30
    img, txt, A = _unit_factors(3, n, m, k)
    f = get_similarity(name)
    with _FreshAllocations(numel=64 * m) as big:
        sim = f(factorized(img, txt), A, num_workers=1, top_k=10)
    assert torch.equal(sim, f(img @ txt.T, A, top_k=10))
    assert big.count == 3, big.count    # a*P and its softmax (normaliser), the table (blocks)
