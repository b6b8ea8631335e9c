"""DINO models with official parameter names: ViTs, the projection head, the multi-crop forward.

    backbone = dino_fast.models.vit_small(patch_size=16, drop_path_rate=0.1)
    student = dino_fast.models.DINOModel(backbone, dino_fast.models.DINOHead(backbone.embed_dim, 65536))
    out = student(global_crops, local_crops)     # (ncrops * B, 65536), crop-major

Official DINO checkpoints load with ``load_state_dict(strict=True)`` (backbone keys as in the
official ``vision_transformer.py``; head keys including ``last_layer.weight_g/weight_v``).
"""

from dino_fast.models.head import DINOHead, WeightNormLinear
from dino_fast.models.multicrop import DINOModel, multicrop_forward
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
    "Attention",
    "Block",
    "DINOHead",
    "DINOModel",
    "PatchEmbed",
    "VisionTransformer",
    "WeightNormLinear",
    "multicrop_forward",
    "vit_base",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
