"""``knowsam-bench describe``: a method's networks and their parameter counts, before any run.

The method is built exactly as training builds it (same classes, same method params), for a
dataset's classes and channels, the params' image size and ``sam.arch``. SAM's weights are never
loaded (random init, as ``sam.checkpoint: none``): counts do not depend on them, and a check
needs no download. SAM teachers are listed by part; the parts add up to the total.
"""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn as nn

from knowsam.config import Params

SAM_PARTS = ("prompt_heads", "adapters", "image_encoder", "prompt_encoder", "mask_decoder")


def _count(params: list[nn.Parameter]) -> dict[str, int]:
    unique = {id(p): p for p in params}.values()  # a parameter shared by two modules counts once
    return {"params": sum(p.numel() for p in unique), "trainable": sum(p.numel() for p in unique if p.requires_grad)}


def _sam_part(name: str) -> str:
    """Which listed part of a SAM teacher a parameter name belongs to (adapters out of encoder and decoder)."""
    if name.startswith("prompt_heads."):
        return "prompt_heads"
    if ".attn_adapter." in name or ".mlp_adapter." in name:
        return "adapters"
    return name.split(".", 1)[0]


def module_counts(nets: dict[str, nn.Module]) -> dict[str, dict[str, int]]:
    """``{name: {"params", "trainable"}}`` per network; a SAM teacher as ``<name>.<part>`` per part."""
    from knowsam.models.sam_teacher import SamTeacher

    out: dict[str, dict[str, int]] = {}
    for net_name, net in nets.items():
        if isinstance(net, SamTeacher):
            parts: dict[str, list[nn.Parameter]] = {part: [] for part in SAM_PARTS}
            for name, p in net.named_parameters():
                parts[_sam_part(name)].append(p)
            out.update({f"{net_name}.{part}": _count(ps) for part, ps in parts.items()})
        else:
            out[net_name] = _count(list(net.parameters()))
    return out


def describe(params: Params, method: str, dataset: str, sam_arch: str | None = None) -> dict:
    """The description of ``method`` at ``dataset``: context, per-module and total counts."""
    from knowsam.data.sources import get_dataset
    from knowsam.methods import MethodContext, get_method
    from knowsam.methods.registry import method_params

    spec = get_dataset(dataset)
    sam = dataclasses.replace(params.sam, checkpoint="none", arch=sam_arch or params.sam.arch)
    cls = get_method(method)
    ctx = MethodContext(
        in_channels=spec.in_channels,
        num_classes=spec.num_classes,
        image_size=params.data.image_size,
        iterations=params.train.iterations,
        train=params.train,
        sam=sam,
        device=torch.device("cpu"),
        training=False,
    )
    built = cls(ctx, method_params(method, params.method_params.get(method, {})))
    modules = module_counts(built.nets)
    total = _count([p for net in built.nets.values() for p in net.parameters()])
    return {
        "method": method,
        "dataset": dataset,
        "num_classes": spec.num_classes,
        "in_channels": spec.in_channels,
        "image_size": params.data.image_size,
        "sam_arch": sam.arch,
        "modules": modules,
        "total": total,
    }


def render(info: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(info)
    rows = [*info["modules"].items(), ("total", info["total"])]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"{info['method']} at {info['dataset']}: {info['num_classes']} classes, {info['in_channels']} channels, "
        f"{info['image_size']} px, sam.arch {info['sam_arch']} (SAM weights not loaded: counts only)",
        f"{'module':<{width}}  {'params':>13}  {'trainable':>13}",
    ]
    lines += [f"{name:<{width}}  {c['params']:>13,}  {c['trainable']:>13,}" for name, c in rows]
    return "\n".join(lines)
