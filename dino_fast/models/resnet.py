"""torchvision ResNets as DINO backbones: the official ``train_dino`` convnet branch.

The official code builds ``torchvision_models.__dict__[arch]()`` and the multi-crop wrapper
replaces its ``fc`` by an identity, so the backbone returns the global-average-pooled features
(2048-d for ResNet-50). The state-dict keys stay torchvision's, which is what the official
evaluation scripts and the released RN50 checkpoints use.
"""

from __future__ import annotations

from torch import nn

from dino_fast.optional import require

# The ResNet family of torchvision.models: the convnets the official --arch accepts by name that
# dino_fast trains, evaluates and benchmarks.
RESNET_ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)


def resnet(arch: str) -> nn.Module:
    """A freshly initialized torchvision ``arch`` with ``fc`` replaced by an identity.

    Built whole first, as the official code does, so the same seed draws the same weights; the
    pooled feature size is kept as ``embed_dim``, the attribute DINO heads are sized from."""
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown ResNet {arch!r}: choose one of {', '.join(RESNET_ARCHS)}")
    torchvision = require("torchvision", f"--arch {arch}")
    model = getattr(torchvision.models, arch)()
    model.embed_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model
