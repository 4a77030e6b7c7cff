"""Streaming safetensors writes and running top-k (stage 01's publish, issue 21)."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nd_utils.tensor_stream import RunningTopK, SafetensorsStream


def test_streamed_file_reads_back_with_the_library(tmp_path):
    g = torch.Generator().manual_seed(0)
    a, ids = torch.randn(1001, 7, generator=g), torch.randint(0, 9, (7, 3), generator=g)
    path = tmp_path / "x.safetensors"
    with SafetensorsStream(path, {"a": (torch.float32, (1001, 7)),
                                  "ids": (torch.int64, (7, 3))}) as out:
        for i in range(0, 1001, 256):
            out.write("a", a[i:i + 256])
        out.write("ids", ids)
    back = load_file(str(path))
    assert torch.equal(back["a"], a) and torch.equal(back["ids"], ids)
    with safe_open(str(path), framework="pt") as f:  # one tensor read without the others
        assert torch.equal(f.get_slice("a")[10:12], a[10:12])
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_short_or_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="fewer bytes"):
        with SafetensorsStream(path, {"a": (torch.float32, (4, 2))}) as out:
            out.write("a", torch.ones(3, 2))
    with pytest.raises(ValueError, match="more bytes"):
        with SafetensorsStream(path, {"a": (torch.float32, (4, 2))}) as out:
            out.write("a", torch.ones(5, 2))
    with pytest.raises(ValueError, match="in order"):
        with SafetensorsStream(path, {"a": (torch.float32, (1,)), "b": (torch.float32, (1,))}) as out:
            out.write("b", torch.ones(1))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("block", [1, 7, 64, 500])
def test_running_top_k_is_independent_of_the_blocking(block):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 20, (500, 9), generator=g).float()   # many exact ties
    x[3, 2] = float("nan")
    top = RunningTopK(30)
    for i in range(0, 500, block):
        top.update(x[i:i + block])
    # reference: descending value, ties by ascending row, NaN last; one stable sort of all rows
    key = x.nan_to_num(nan=-float("inf"))
    order = torch.sort(key, dim=0, descending=True, stable=True).indices[:30]
    assert torch.equal(top.indices(), order.T)
    assert torch.equal(top.values(), x.gather(0, order).T)
    assert 3 not in top.indices()[2].tolist()
