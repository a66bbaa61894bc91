"""2D V-Net and the fusion module: shapes, gradients, structure, the official-activation toggle."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from knowsam.errors import ConfigError
from knowsam.models import build_model
from knowsam.models.fusion import Fusion
from knowsam.models.vnet import VNet


@pytest.mark.parametrize(("in_ch", "k", "size"), [(1, 2, 32), (3, 4, 64)])
def test_vnet_shapes_and_gradients(in_ch: int, k: int, size: int):
    torch.manual_seed(0)
    net = build_model("vnet", in_channels=in_ch, num_classes=k)
    out = net(torch.rand(2, in_ch, size, size))
    assert out.shape == (2, k, size, size)
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_vnet_structure():
    net = VNet(1, 2)
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.InstanceNorm2d)
    assert not any(isinstance(m, norms) for m in net.modules())
    assert [d[0].out_channels for d in net.downs] == [32, 64, 128, 256]
    assert all(d[0].stride == (2, 2) for d in net.downs)
    assert [u[0].out_channels for u in net.ups] == [128, 64, 32, 16]
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 1, 40, 40))


def test_residual_stage_adds_its_input():
    stage = VNet(1, 2).enc[2]  # 3 convs at 64 channels
    x = torch.rand(1, 64, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(stage(x), F.relu(stage.body(x) + x))
        for m in stage.body:
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                m.bias.zero_()
        torch.testing.assert_close(stage(x), x)  # identity when the body is silent (x >= 0)


def test_vnet_dropout_option():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    net = VNet(1, 2)
    with torch.no_grad():
        assert not torch.equal(net(x), net(x))  # active in training
        net.eval()
        assert torch.equal(net(x), net(x))
        plain = VNet(1, 2, dropout=0.0)
        assert torch.equal(plain(x), plain(x))


def _features(fusion: Fusion, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    seen = {}
    hook = fusion.net[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    fusion(a, b)
    hook.remove()
    return seen["x"]


def test_fusion_shapes_gradients_and_features():
    torch.manual_seed(0)
    k = 3
    fusion = build_model("fusion", num_classes=k)
    a = torch.randn(2, k, 16, 16, requires_grad=True)
    b = torch.randn(2, k, 16, 16, requires_grad=True)
    out = fusion(a, b)
    assert out.shape == (2, k, 16, 16)
    out.square().mean().backward()
    for name, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert a.grad is not None and a.grad.abs().sum() > 0  # fused loss reaches the sub-networks

    with torch.no_grad():
        a[:, :, :, :8] = 0.0  # uniform prediction on the left half: entropy 1
        feats = _features(fusion, a, b)
    assert feats.shape == (2, 4 * k + 3, 16, 16)
    torch.testing.assert_close(feats[:, :k], a)
    torch.testing.assert_close(feats[:, 3 * k : 4 * k], b.softmax(1))
    xor = (a.argmax(1) != b.argmax(1)).float()
    torch.testing.assert_close(feats[:, 4 * k], xor)
    ent_a = feats[:, 4 * k + 1]
    torch.testing.assert_close(ent_a[:, :, :8], torch.ones(2, 16, 8))
    p = a[:, :, :, 8:].softmax(1)
    torch.testing.assert_close(ent_a[:, :, 8:], -(p * p.log()).sum(1) / math.log(k))


def test_fusion_official_activation_toggle():
    a, b = torch.randn(4, 2, 16, 16), torch.randn(4, 2, 16, 16)
    torch.manual_seed(0)
    official = Fusion(2)
    torch.manual_seed(0)
    plain = Fusion(2, official_output_activation=False)
    assert isinstance(plain.net[-1], nn.Conv2d) and plain.net[-1].out_channels == 2
    assert isinstance(official.net[-2], nn.BatchNorm2d) and official.net[-1].negative_slope == 0.2
    with torch.no_grad():
        z = plain(a, b)  # same seed, same convs: the plain head's logits
        expected = F.leaky_relu(F.batch_norm(z, None, None, training=True, eps=1e-5), 0.2)
        torch.testing.assert_close(official(a, b), expected, rtol=1e-4, atol=1e-5)
    assert (expected < 0).any() and not torch.allclose(expected, z)
    with pytest.raises(ConfigError):
        Fusion(1)
