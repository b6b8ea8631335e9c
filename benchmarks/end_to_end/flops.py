"""The matmul FLOPs of one image's share of a DINO training step, and the device peaks MFU divides
by. A ViT's are counted analytically; a ResNet's convolutions by torch's FlopCounterMode over one
forward on the meta device (no memory, no compute). tests/benchmarks/test_throughput.py checks
both counts against FlopCounterMode over a real step."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dino_fast.models import is_convnet, resnet
from dino_fast.official import vision_transformer

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, from the vendors' data sheets.
# Matched in order against torch.cuda.get_device_name(); more specific names first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("H800", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("B200", 2250.0),
)


def vit_forward_flops(embed_dim: int, depth: int, hidden: int, patch_size: int, img_size: int) -> dict:
    """Matmul FLOPs (2 per multiply-add) of one image's forward through the backbone at one crop
    size; ``hidden`` is the MLP width."""
    n_patches = (img_size // patch_size) ** 2
    tokens = n_patches + 1
    # per token and block: qkv (D -> 3D), proj (D -> D), fc1 (D -> H), fc2 (H -> D)
    linear = depth * tokens * 2 * embed_dim * (3 * embed_dim + embed_dim + 2 * hidden)
    # per block: q @ k^T and attn @ v, each N x N x D multiply-adds summed over the heads
    attention = depth * 2 * (2 * tokens * tokens * embed_dim)
    patch_embed = 2 * n_patches * (3 * patch_size * patch_size) * embed_dim
    return {"blocks": linear + attention, "attention": attention, "patch_embed": patch_embed}


def head_forward_flops(
    in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3
) -> int:
    """DINOHead per feature row: the MLP and the weight-normalized last layer."""
    macs = in_dim * hidden_dim + (nlayers - 2) * hidden_dim * hidden_dim + hidden_dim * bottleneck_dim
    return 2 * (macs + bottleneck_dim * out_dim)


def backbone_dims(arch: str, patch_size: int) -> tuple[int, int, int]:
    """(embed_dim, depth, MLP width) of the official ``arch``, read from a model built on the meta
    device (no memory, no initialization cost)."""
    with torch.device("meta"):
        backbone = getattr(vision_transformer, arch)(patch_size=patch_size)
    return backbone.embed_dim, len(backbone.blocks), backbone.blocks[0].mlp.fc1.out_features


def convnet_forward_flops(backbone: nn.Module, img_size: int) -> dict[str, int]:
    """Convolution FLOPs of one image's forward through a torchvision ResNet ``backbone`` without
    its ``fc``, built on the meta device (``backbone``), and those of its first convolution (``stem``)."""
    with FlopCounterMode(display=False) as counter:
        backbone(torch.empty(1, 3, img_size, img_size, device="meta"))
    stem = counter.get_flop_counts().get(f"{type(backbone).__name__}.conv1", {})
    return {"backbone": counter.get_total_flops(), "stem": sum(stem.values())}


def convnet_step_flops(
    arch: str, global_size: int, local_size: int, local_crops_number: int, out_dim: int, n_global: int
) -> dict[str, int]:
    """``step_flops`` of a ResNet: backward = 2 x forward except the stem convolution, whose input
    (the image) needs no gradient (1 x)."""
    with torch.device("meta"):
        # eval: a batch norm in training refuses one image of a 1 x 1 map (a local crop of 16-32 px).
        backbone = resnet(arch).eval()
    g = convnet_forward_flops(backbone, global_size)
    loc = convnet_forward_flops(backbone, local_size)
    head = head_forward_flops(backbone.embed_dim, out_dim)
    student_fwd = {k: n_global * g[k] + local_crops_number * loc[k] for k in g}
    out = {
        "student_backbone": 3 * student_fwd["backbone"] - student_fwd["stem"],
        "student_head": 3 * (n_global + local_crops_number) * head,
        "teacher_backbone": n_global * g["backbone"],
        "teacher_head": n_global * head,
    }
    out["total"] = sum(out.values())
    return out


def step_flops(
    arch: str,
    patch_size: int,
    global_size: int,
    local_size: int,
    local_crops_number: int,
    out_dim: int,
    n_global: int = 2,
) -> dict[str, int]:
    """Matmul FLOPs per image of one training step. Student: forward + backward over all crops,
    backward = 2 x forward (input and weight gradients) except the patch embedding, whose input
    (the image) needs no gradient (1 x). Teacher: forward over the global crops only."""
    if is_convnet(arch):
        return convnet_step_flops(arch, global_size, local_size, local_crops_number, out_dim, n_global)
    dim, depth, hidden = backbone_dims(arch, patch_size)
    g = vit_forward_flops(dim, depth, hidden, patch_size, global_size)
    loc = vit_forward_flops(dim, depth, hidden, patch_size, local_size)
    head = head_forward_flops(dim, out_dim)
    student_fwd_blocks = n_global * g["blocks"] + local_crops_number * loc["blocks"]
    student_fwd_patch = n_global * g["patch_embed"] + local_crops_number * loc["patch_embed"]
    out = {
        "student_blocks": 3 * student_fwd_blocks,
        "student_patch_embed": 2 * student_fwd_patch,
        "student_head": 3 * (n_global + local_crops_number) * head,
        "teacher_blocks": n_global * g["blocks"],
        "teacher_patch_embed": n_global * g["patch_embed"],
        "teacher_head": n_global * head,
        "attention_matmuls": 3 * (n_global * g["attention"] + local_crops_number * loc["attention"])
        + n_global * g["attention"],
    }
    out["blocks_only"] = out["student_blocks"] + out["teacher_blocks"]
    out["total"] = sum(v for k, v in out.items() if k.startswith(("student_", "teacher_")))
    return out


def device_peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The peak MFU divides by, and where it comes from."""
    if override is not None:
        return override, "--peak_tflops"
    if device.type != "cuda":
        return None, "no tensor-core peak for a CPU: MFU not reported (pass --peak_tflops to get one)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops, f"dense bf16 data-sheet peak for {key}"
    return None, f"unknown device {name!r}: pass --peak_tflops for MFU"
