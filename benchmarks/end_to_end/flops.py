"""The matmul FLOPs of one image's share of a DINO training step, counted analytically, and the
device peaks MFU divides by. tests/benchmarks/test_throughput.py checks the count against torch's
FlopCounterMode."""

from __future__ import annotations

import torch

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
