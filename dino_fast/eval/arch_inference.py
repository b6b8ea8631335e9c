"""Which ``--arch`` a checkpoint holds: its stored ``args``, else the shapes of its weights.

A ViT is recognized by its embedding width, patch size and depth. A torchvision ResNet is
recognized exactly: its tensor names and shapes (basic or bottleneck blocks, blocks per stage,
group width) must equal those of one of ``RESNET_ARCHS``, each built on the meta device (no
memory, no initialization) to compare with, so the table cannot drift from torchvision's.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Mapping
from typing import Any

import torch

from dino_fast.models import ARCHS as VIT_ARCHS
from dino_fast.models import RESNET_ARCHS, resnet

_EMBED_DIM_TO_VIT = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large"}
# The batch-norm step counters: absent from weights saved before torch 0.4.1 (torch fills them in
# on loading), and never used by an evaluation, so a file without them is the same network.
OPTIONAL_BUFFER_SUFFIX = "num_batches_tracked"


def _vit_shape(state: Mapping[str, torch.Tensor]) -> tuple[int, int, int] | None:
    """``(embed_dim, patch_size, depth)`` of the ViT a backbone state dict was saved from."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return None
    depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    return proj.shape[0], proj.shape[-1], depth


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith(OPTIONAL_BUFFER_SUFFIX)}


@functools.cache
def _resnet_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return _shapes(resnet(arch).state_dict())


def resnet_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """The name in ``RESNET_ARCHS`` whose backbone (fc = identity) has exactly ``state``'s tensors."""
    if "layer1.0.conv1.weight" not in state:
        return None
    shapes = _shapes(state)
    return next((arch for arch in RESNET_ARCHS if _resnet_shapes(arch) == shapes), None)


def _resnet_structure(state: Mapping[str, torch.Tensor]) -> str | None:
    """'bottleneck blocks, (3, 4, 6, 3) per stage, groups x width 32x4d' of a ResNet state dict."""
    conv2 = state.get("layer1.0.conv2.weight")
    if conv2 is None or conv2.ndim != 4:
        return None
    stages = tuple(
        len({m.group(1) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))}) for i in range(1, 5)
    )
    if "layer1.0.conv3.weight" not in state:
        return f"basic blocks, {stages} per stage"
    # torchvision's naming: the first stage's 3x3 convolution is `groups` groups of `width` channels.
    groups, width = conv2.shape[0] // conv2.shape[1], conv2.shape[1]
    return f"bottleneck blocks, {stages} per stage, groups x width {groups}x{width}d"


def arch_from_weights(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``arch`` (and a ViT's ``patch_size``) read off a backbone state dict; empty when unrecognized."""
    shape = _vit_shape(state)
    if shape is not None and shape[0] in _EMBED_DIM_TO_VIT:
        return {"arch": _EMBED_DIM_TO_VIT[shape[0]], "patch_size": shape[1]}
    arch = resnet_arch(state)
    return {"arch": arch} if arch is not None else {}


def stored_model_flags(checkpoint: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``arch`` (and a ViT's ``patch_size``) the checkpoint was trained with: from its stored
    ``args`` (a dino_fast dict or an official ``argparse.Namespace``), else from the weights."""
    args = checkpoint.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    if isinstance(args, Mapping):
        arch = args.get("arch")
        if arch in RESNET_ARCHS:
            return {"arch": arch}
        if arch in VIT_ARCHS and isinstance(args.get("patch_size"), int):
            return {"arch": arch, "patch_size": args["patch_size"]}
    return arch_from_weights(state)


def describe_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """What a backbone state dict was saved from and the flags that build it (for error messages)."""
    shape = _vit_shape(state)
    if shape is not None:
        dim, patch, depth = shape
        arch = _EMBED_DIM_TO_VIT.get(dim)
        guess = f" -> --arch {arch} --patch_size {patch}" if arch else ""
        return f"It was saved from a ViT with embed_dim={dim}, patch_size={patch}, depth={depth}{guess}"
    structure = _resnet_structure(state)
    if structure is not None:
        arch = resnet_arch(state)
        if arch is not None:
            return f"It was saved from a {arch} ({structure}) -> --arch {arch}"
        return f"It was saved from a ResNet with {structure}, which is none of {', '.join(RESNET_ARCHS)}"
    return (
        "It looks like neither a ViT backbone (no patch_embed.proj.weight) nor a torchvision ResNet "
        "(no layer1.0.conv2.weight)"
    )
