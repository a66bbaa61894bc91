"""2D V-Net and the fusion module: the official structures and parameter counts, inputs, gradients, the toggle."""

from __future__ import annotations

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


def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_vnet_structure_and_official_parameter_count():
    net = VNet(3, 2)
    assert _params(net) == 3_265_986  # the official V-Net at 3 in / 2 out
    banned = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.Dropout, nn.Dropout2d)
    assert not any(isinstance(m, banned) for m in net.modules())
    convs = [[m for m in stage if isinstance(m, nn.Conv2d)] for stage in (*net.enc, *net.dec, net.last)]
    assert [len(c) for c in convs] == [1, 2, 3, 3, 3, 3, 3, 2, 1]
    assert [d[0].out_channels for d in net.downs] == [32, 64, 128, 256]
    assert all(d[0].stride == (2, 2) for d in net.downs)
    assert [u[0].out_channels for u in net.ups] == [128, 64, 32, 16]
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 3, 40, 40))


def test_vnet_is_plain_with_post_downsampling_skips():
    torch.manual_seed(0)
    net = VNet(1, 2)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        # Independent composition: plain stages, skips = first stage output and downsampled tensors.
        e0 = net.enc[0](x)
        d1 = net.downs[0](e0)
        d2 = net.downs[1](net.enc[1](d1))
        d3 = net.downs[2](net.enc[2](d2))
        d4 = net.downs[3](net.enc[3](d3))
        h = net.ups[0](net.dec[0](d4)) + d3
        h = net.ups[1](net.dec[1](h)) + d2
        h = net.ups[2](net.dec[2](h)) + d1
        h = net.ups[3](net.dec[3](h)) + e0
        torch.testing.assert_close(net(x), net.head(net.last(h)))
        for stage in (*net.enc, *net.dec, net.last):  # no residual sum: a silent stage outputs 0
            for m in stage:
                if isinstance(m, nn.Conv2d):
                    m.weight.zero_()
                    m.bias.zero_()
        assert net.dec[1](torch.rand(1, 128, 4, 4)).abs().max() == 0
        assert torch.equal(net(x), net(x))  # no dropout, even in training mode


def test_vnet_kaiming_normal_init():
    torch.manual_seed(0)
    net = VNet(3, 2)
    w = net.dec[0][0].weight  # 256 -> 256, 3x3: fan_in 2304
    assert abs(w.std().item() - (2 / w[0].numel()) ** 0.5) < 2e-3  # kaiming normal: std sqrt(2 / fan_in)
    assert w.abs().max() > 3 * (1 / w[0].numel()) ** 0.5  # not PyTorch's default uniform bound


def _branch_inputs(fusion: Fusion, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(fusion, name).register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args[0]))
        for name in ("agreement", "certainty", "logits", "head")
    ]
    fusion(a, b)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("k", [2, 4])
def test_fusion_branches_see_the_official_inputs(k: int):
    torch.manual_seed(0)
    fusion = build_model("fusion", num_classes=k)
    a = torch.randn(2, k, 16, 16) * 3
    b = torch.randn(2, k, 16, 16) * 3
    seen = _branch_inputs(fusion, a, b)
    pa, pb = a.softmax(1), b.softmax(1)
    xor = (pa > 0.5) ^ (pb > 0.5)
    assert xor.any() and (~xor).any()
    torch.testing.assert_close(seen["agreement"], 1 - xor.float())
    ent = lambda p: -(p * torch.log(p + 1e-6)).sum(1, keepdim=True)  # noqa: E731  natural log, not / log K
    torch.testing.assert_close(seen["certainty"], 1 - torch.cat([ent(pa), ent(pb)], 1))
    torch.testing.assert_close(seen["logits"], torch.cat([a, b], 1))
    assert seen["head"].shape == (2, 64, 16, 16)  # branch widths 16 + 16 + 32


def test_fusion_shapes_gradients_and_official_parameter_count():
    assert _params(Fusion(2)) == 40_548  # the official fusion module at K = 2
    for m in Fusion(3).modules():
        if isinstance(m, nn.Conv2d):
            assert m.bias is None  # every conv bias-free, each followed by BatchNorm
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
    with pytest.raises(ConfigError):
        Fusion(1)


def test_fusion_official_activation_toggle():
    a, b = torch.randn(4, 2, 16, 16), torch.randn(4, 2, 16, 16)
    official, plain = Fusion(2), Fusion(2, official_output_activation=False)
    last = plain.head[-1]
    assert isinstance(last, nn.Conv2d) and last.out_channels == 2 and last.bias is not None
    assert isinstance(official.head[-2], nn.BatchNorm2d) and official.head[-1].negative_slope == 0.2
    with torch.no_grad():
        plain.load_state_dict(official.state_dict(), strict=False)  # every conv, the last one's weight too
        plain.head[-1].bias.zero_()
        z = plain(a, b)
        expected = F.leaky_relu(F.batch_norm(z, None, None, training=True, eps=1e-5), 0.2)
        torch.testing.assert_close(official(a, b), expected, rtol=1e-4, atol=1e-5)
    assert (expected < 0).any() and not torch.allclose(expected, z)
