"""Every backbone ``--arch`` names, built by one function: dino_fast ViTs and torchvision ResNets."""

from __future__ import annotations

from torch import nn

from dino_fast.models.resnet import RESNET_ARCHS, resnet
from dino_fast.models.vit import ARCHS as VIT_ARCHS

BACKBONE_ARCHS = (*VIT_ARCHS, *RESNET_ARCHS)


def is_convnet(arch: str) -> bool:
    """Whether ``arch`` is a convnet (batch norms, no patches, no attention maps)."""
    return arch in RESNET_ARCHS


def build_backbone(
    arch: str, *, patch_size: int = 16, drop_path_rate: float = 0.0, attn_backend: str = "auto"
) -> nn.Module:
    """A freshly initialized ``arch`` with its pooled feature size as ``embed_dim``.

    ``patch_size``, ``drop_path_rate`` and ``attn_backend`` shape ViTs only; the official code
    ignores them for convnets too."""
    if arch in VIT_ARCHS:
        return VIT_ARCHS[arch](
            patch_size=patch_size, drop_path_rate=drop_path_rate, attn_backend=attn_backend
        )
    if arch in RESNET_ARCHS:
        return resnet(arch)
    raise ValueError(f"unknown --arch {arch!r}: choose one of {', '.join(BACKBONE_ARCHS)}")
