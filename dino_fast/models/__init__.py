"""DINO models with official parameter names: ViTs, torchvision ResNets, the projection head, the
multi-crop forward.

    backbone = dino_fast.models.vit_small(patch_size=16, drop_path_rate=0.1)
    student = dino_fast.models.DINOModel(backbone, dino_fast.models.DINOHead(backbone.embed_dim, 65536))
    out = student(global_crops, local_crops)     # (ncrops * B, 65536), crop-major

Official DINO checkpoints load with ``load_state_dict(strict=True)`` (backbone keys as in the
official ``vision_transformer.py``; head keys including ``last_layer.weight_g/weight_v``).
"""

from dino_fast.models.backbones import BACKBONE_ARCHS, build_backbone, is_convnet
from dino_fast.models.head import DINOHead, WeightNormLinear
from dino_fast.models.multicrop import DINOModel, multicrop_forward
from dino_fast.models.resnet import RESNET_ARCHS, resnet
from dino_fast.models.sync_batchnorm import CpuSyncBatchNorm, convert_sync_batchnorm
from dino_fast.models.vit import (
    ARCHS,
    Attention,
    Block,
    PatchEmbed,
    VisionTransformer,
    vit_base,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = [
    "ARCHS",
    "BACKBONE_ARCHS",
    "RESNET_ARCHS",
    "Attention",
    "Block",
    "CpuSyncBatchNorm",
    "DINOHead",
    "DINOModel",
    "PatchEmbed",
    "VisionTransformer",
    "WeightNormLinear",
    "build_backbone",
    "convert_sync_batchnorm",
    "is_convnet",
    "multicrop_forward",
    "resnet",
    "vit_base",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
