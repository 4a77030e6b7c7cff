"""Forward-hook tracing: pooling per output rank, no hook left behind."""
import numpy as np
import pytest
import torch
from torch import nn

import nd_utils as nd
from nd_utils.errors import UnknownNameError
from nd_utils.hooks import TraceLayers, apply_pooling, count_hooks


class Tokens(nn.Module):
    """[B, C, H, W] -> [B, 1 + H*W, C] with a CLS token, like a ViT."""

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        cls = t.mean(1, keepdim=True) * 10
        return torch.cat([cls, t], 1)


def make_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Tokens(),
                         nn.Flatten(), nn.LazyLinear(5))


def test_pool_shapes_and_values():
    conv = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(apply_pooling(conv, "avg"), conv.mean((2, 3)))
    assert torch.equal(apply_pooling(conv, "max"), conv.amax((2, 3)))
    tok = torch.randn(2, 7, 5)
    assert torch.equal(apply_pooling(tok, "cls"), tok[:, 0])
    assert torch.allclose(apply_pooling(tok, "avg"), tok.mean(1))
    assert torch.equal(apply_pooling(tok, "max"), tok.amax(1))
    vec = torch.randn(2, 9, dtype=torch.float64)
    out = apply_pooling(vec, "avg")
    assert out.shape == (2, 9) and out.dtype == torch.float32
    assert apply_pooling((tok, "attn"), "cls").shape == (2, 5)  # tuple outputs: first tensor


@pytest.mark.parametrize("rank,bad", [(4, "cls"), (3, "spatial"), (4, "mean")])
def test_pool_rejects_pooling_for_rank(rank, bad):
    x = torch.randn(*([2, 3, 4, 4][:rank]))
    with pytest.raises(nd.NdUtilsError, match="use one of"):
        apply_pooling(x, bad, "layerX")


def test_trace_records_conv_token_vector_layers():
    net = make_net()
    x = torch.randn(2, 3, 6, 6)
    net(x)  # materialise the lazy layer
    with TraceLayers(net, ["1", "2", "4"], pooling={"1": "max", "2": "cls", "4": "avg"},
                     keep_maps=["1"]) as tr:
        y = net(x)
    assert tr["1"].shape == (2, 4) and tr.maps["1"].shape == (2, 4, 6, 6)
    assert torch.allclose(tr["1"], tr.maps["1"].amax((2, 3)))
    assert tr["2"].shape == (2, 4)
    assert torch.allclose(tr["4"], y)
    assert count_hooks(net) == 0


def test_no_hook_left_after_exception():
    net = make_net()
    net(torch.randn(1, 3, 6, 6))
    with pytest.raises(RuntimeError):
        with TraceLayers(net, ["0", "4"]) as tr:
            assert count_hooks(net) == 2
            net(torch.randn(1, 5, 6, 6))  # wrong channel count: the forward raises
    assert count_hooks(net) == 0
    # a pooling error raised inside the hook also leaves nothing behind
    with pytest.raises(nd.NdUtilsError):
        with TraceLayers(net, ["0"], pooling="cls"):
            net(torch.randn(1, 3, 6, 6))
    assert count_hooks(net) == 0


def test_unknown_layer_lists_closest():
    net = nn.Sequential()
    net.add_module("layer4", nn.Identity())
    net.add_module("layer3", nn.Identity())
    with pytest.raises(UnknownNameError) as err:
        TraceLayers(net, ["layr4"])
    assert "layer4" in str(err.value)


def test_module_called_twice_warns():
    act = nn.ReLU()
    net = nn.Sequential(act, nn.Identity(), act)
    with TraceLayers(net, ["0"]) as tr:
        net(torch.randn(2, 3))
        with pytest.warns(UserWarning, match="ran 2 times"):
            tr.check_calls()


def _tiny_target():
    from torchvision import transforms as T

    from nd_utils.backends.target_network import from_module

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.LazyLinear(5))
    net(torch.zeros(1, 3, 16, 16))  # materialise the lazy layer
    return from_module(net.eval(), T.Compose([T.Resize((16, 16)), T.ToTensor()]), name="tiny")


def test_trace_images_equals_one_traced_forward_per_batch(tmp_path):
    from PIL import Image

    from nd_utils.hooks import trace_images

    target = _tiny_target()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
              for _ in range(7)]
    paths = []
    for i, im in enumerate(images[:3]):
        im.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    seen = []
    out = trace_images(target, ["1", "3"], paths + images[3:], pooling="max", keep_maps=["1"],
                       batch_size=3, each_batch=lambda pil: seen.append(len(pil)))
    x = torch.stack([target.preprocess(im) for im in images])
    with TraceLayers(target.model, ["1", "3"], pooling="max", keep_maps=["1"]) as trace:
        target.model(x)
    assert torch.allclose(out.pooled["1"], trace["1"]) and out.pooled["3"].shape == (7, 5)
    assert torch.allclose(out.pooled["3"], trace["3"], atol=1e-6)
    assert out.maps["1"].shape == (7, 4, 14, 14), out.maps["1"].shape
    assert torch.allclose(out.maps["1"], trace.maps["1"], atol=1e-6)
    assert seen == [3, 3, 1]  # each batch's decoded images, files read once
    assert count_hooks(target.model) == 0
    empty = trace_images(target, ["3"], [])
    assert empty.pooled["3"].shape == (0, 0)


def test_trace_images_removes_hooks_when_a_batch_fails():
    from nd_utils.hooks import trace_images

    target = _tiny_target()
    with pytest.raises(FileNotFoundError):
        trace_images(target, ["1"], ["/nonexistent/image.png"])
    assert count_hooks(target.model) == 0
