"""Student and teacher networks of a run, built as the official ``train_dino`` builds them."""

from __future__ import annotations

from torch import nn

from dino_fast import models
from dino_fast.train.config import TrainConfig


def build_backbone(config: TrainConfig, *, drop_path_rate: float) -> nn.Module:
    """A freshly initialized ``config.arch``: the official ``vits.__dict__[arch](...)`` or
    ``torchvision_models.__dict__[arch]()`` call."""
    return models.build_backbone(
        config.arch,
        patch_size=config.patch_size,
        drop_path_rate=drop_path_rate,
        attn_backend=config.attn_backend,
    )


def build_head(config: TrainConfig, embed_dim: int, *, norm_last_layer: bool) -> nn.Module:
    """A freshly initialized DINOHead on ``embed_dim`` features (the official ``DINOHead(...)``)."""
    return models.DINOHead(
        embed_dim, config.out_dim, use_bn=config.use_bn_in_head, norm_last_layer=norm_last_layer
    )


def build_dino_model(config: TrainConfig, *, drop_path_rate: float) -> nn.Module:
    """One backbone + head (to load a checkpoint into, say); a run builds two with
    :func:`build_student_teacher`."""
    backbone = build_backbone(config, drop_path_rate=drop_path_rate)
    return models.DINOModel(
        backbone, build_head(config, backbone.embed_dim, norm_last_layer=config.norm_last_layer)
    )


def build_student_teacher(config: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """Student and teacher drawn in ``train_dino``'s order (both backbones, then both heads), so that
    after ``torch.manual_seed(seed)`` the weights are the official ones bitwise. The teacher has no
    drop path and still holds its own initialization: load the student's weights into it."""
    student_backbone = build_backbone(config, drop_path_rate=config.drop_path_rate)
    teacher_backbone = build_backbone(config, drop_path_rate=0.0)
    embed_dim = student_backbone.embed_dim
    student = models.DINOModel(
        student_backbone, build_head(config, embed_dim, norm_last_layer=config.norm_last_layer)
    )
    # The official teacher head keeps DINOHead's default norm_last_layer (it has no gradients anyway).
    teacher = models.DINOModel(teacher_backbone, build_head(config, embed_dim, norm_last_layer=True))
    return student, teacher


def has_batchnorms(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
