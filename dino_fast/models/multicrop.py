"""Every crop of a DINO step through one backbone call, and the student/teacher module.

The official ``MultiCropWrapper`` runs the backbone once per crop resolution (2 global crops at
224 px, then the local crops at 96 px) and concatenates the CLS features. Here the tokens of all
resolutions travel together as one packed ``(total_tokens, D)`` matrix:

    tokens  = [global crop 0 of B images | global crop 1 | local crop 0 | ... ]    (T, D)
              group 0: 2B sequences of 1 + (224/p)^2 tokens, group 1: LB sequences of 1 + (96/p)^2
    block:    LayerNorm, qkv, proj, MLP, residuals   on all T rows at once (large matmuls, one launch)
              attention                              per group, or one packed varlen call (CUDA)
              residual add + drop path + next LN      one Triton kernel on CUDA (kernels/add_layer_norm.py)
    last:     keys/values of every token, everything else for the S = (2 + L) * B CLS rows only
    output:   norm(CLS rows)  (S, D), crop-major like the official loop

Patch embedding and the positional embedding (interpolated per resolution) run per group.
Nothing is padded and nothing syncs with the host: the token layout is Python integers, the
sequence offsets for varlen are built on the device.

Drop path draws one per-sample keep decision per (block, residual branch) exactly like the
official per-resolution loop, in the same order (resolution group, block, branch, sample) from
one ``torch.rand`` call, so on CPU a seeded run reproduces the official loop's samples.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dino_fast.kernels import runtime

Groups = tuple[tuple[int, int], ...]
"""A packed token layout: ((num_sequences, tokens_per_sequence), ...) per resolution group."""

__all__ = [
    "DINOModel",
    "Groups",
    "add_norm",
    "cls_rows",
    "multicrop_forward",
    "packed_cls_features",
    "residual_add",
    "split_groups",
]


def split_groups(x: Tensor, groups: Groups) -> tuple[Tensor, ...]:
    """Packed ``(T, ...)`` rows cut into one chunk per group (views). A split, not slices: its
    backward is one concatenation, while each slice's backward allocates a zero tensor of all T rows."""
    if len(groups) == 1:
        return (x,)
    return x.split([count * length for count, length in groups])


def cls_rows(x: Tensor, groups: Groups) -> Tensor:
    """The first (CLS) row of every sequence of packed ``(T, D)`` tokens: ``(S, D)``."""
    rows = [
        chunk.view(count, length, x.shape[-1])[:, 0]
        for (count, length), chunk in zip(groups, split_groups(x, groups), strict=True)
    ]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def residual_add(x: Tensor, y: Tensor, scale: Tensor | None) -> Tensor:
    """``x + drop_path(y)``, the per-row keep/(1 - p) factor ``scale`` folded into one addcmul."""
    return x + y if scale is None else torch.addcmul(x, y, scale.unsqueeze(-1))


def _fusable(x: Tensor, norm: nn.Module, fused: bool | None) -> bool:
    if fused is False or torch.compiler.is_compiling():
        return False
    layer_norm_ok = (
        isinstance(norm, nn.LayerNorm)
        and norm.weight is not None
        and norm.bias is not None
        and tuple(norm.normalized_shape) == (x.shape[-1],)
        and x.dim() == 2
        and x.shape[-1] <= 8192
    )
    if fused is None:
        return layer_norm_ok and x.is_cuda and runtime.triton_installed()
    if not layer_norm_ok:
        raise ValueError(
            f"fused_norm=True needs nn.LayerNorm with weight and bias over (T, D) tokens, got {norm}"
        )
    if not (x.is_cuda or runtime.interpreting()) or not runtime.triton_installed():
        raise RuntimeError(
            "fused_norm=True needs triton and a CUDA device (or TRITON_INTERPRET=1 set before importing "
            "dino_fast on a CPU); use fused_norm=None to fuse only where it can run"
        )
    return True


def add_norm(
    x: Tensor, y: Tensor | None, scale: Tensor | None, norm: nn.Module, fused: bool | None
) -> tuple[Tensor, Tensor]:
    """``x' = x + drop_path(y)`` (``x`` itself when ``y`` is None) and ``norm(x')``, as one Triton
    kernel where :func:`_fusable`. The fused norm is written in the autocast dtype, which is
    exactly what autocast's fp32 LayerNorm followed by the next matmul's cast gives."""
    if _fusable(x, norm, fused):
        from dino_fast.kernels.add_layer_norm import add_layer_norm, layer_norm

        device_type = x.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        if y is None:
            return x, layer_norm(x, norm.weight, norm.bias, norm.eps, out_dtype)
        return add_layer_norm(x, y, scale, norm.weight, norm.bias, norm.eps, out_dtype)
    if y is not None:
        x = residual_add(x, y, scale)
    return x, norm(x)


def _drop_path_scales(
    blocks: nn.ModuleList, groups: Groups, device: torch.device, training: bool
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Per-block drop-path factors: ``(2, T)`` per token and ``(2, S)`` per sequence (CLS rows),
    or None for blocks without drop path. A factor is ``floor(keep + u) / keep``, u ~ U[0, 1)."""
    depth = len(blocks)
    probs = [blk.drop_path_prob if training else 0.0 for blk in blocks]
    active = [i for i, p in enumerate(probs) if p > 0.0]
    if not active:
        return [None] * depth, [None] * depth
    num_seqs = sum(count for count, _ in groups)
    # The official loop draws rand(n_g) per (group, block, branch); one call in that order.
    draws = torch.rand(len(active) * 2 * num_seqs, device=device, dtype=torch.float32)
    per_group, offset = [], 0
    for count, _ in groups:
        per_group.append(draws[offset : offset + len(active) * 2 * count].view(len(active), 2, count))
        offset += len(active) * 2 * count
    uniform = per_group[0] if len(per_group) == 1 else torch.cat(per_group, dim=2)
    keep = [1.0 - probs[i] for i in active]
    seq = torch.stack([(uniform[a] + keep[a]).floor_().div_(keep[a]) for a in range(len(active))])
    pieces, row = [], 0
    for count, length in groups:
        pieces.append(
            seq[:, :, row : row + count, None].expand(-1, -1, count, length).reshape(len(active), 2, -1)
        )
        row += count
    tok = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    token_scales: list[Tensor | None] = [None] * depth
    seq_scales: list[Tensor | None] = [None] * depth
    for a, i in enumerate(active):
        token_scales[i], seq_scales[i] = tok[a], seq[a]
    return token_scales, seq_scales


def packed_cls_features(backbone: nn.Module, crops: list[Tensor]) -> Tensor:
    """Normalized CLS features ``(S, D)`` of every crop tensor in ``crops`` (one tensor per
    resolution, ``(n_g, C, H_g, W_g)``), in order, through one packed pass of a dino_fast ViT."""
    tokens, layout = [], []
    for images in crops:
        t = backbone.prepare_tokens(images)
        layout.append((t.shape[0], t.shape[1]))
        tokens.append(t.reshape(-1, t.shape[-1]))
    groups: Groups = tuple(layout)
    x = tokens[0] if len(tokens) == 1 else torch.cat(tokens)
    device = x.device
    cu_seqlens = None
    if len(groups) > 1 and device.type == "cuda":
        from dino_fast.models.attention import cumulative_lengths

        cu_seqlens = cumulative_lengths(groups, device)
    blocks = backbone.blocks
    token_scales, seq_scales = _drop_path_scales(blocks, groups, device, backbone.training)
    fused = getattr(backbone, "fused_norm", False)
    x, h = add_norm(x, None, None, blocks[0].norm1, fused)
    for i in range(len(blocks) - 1):
        x, h = blocks[i].forward_packed(x, h, groups, cu_seqlens, token_scales[i], blocks[i + 1].norm1, fused)
    x_cls = blocks[-1].forward_packed_cls(x, h, groups, cu_seqlens, seq_scales[-1])
    return backbone.norm(x_cls)


def _check_crops(backbone: nn.Module, global_crops: Tensor, local_crops: Tensor | None) -> None:
    named = [("global_crops", global_crops)] + (
        [("local_crops", local_crops)] if local_crops is not None else []
    )
    for name, crops in named:
        if not isinstance(crops, Tensor):
            raise TypeError(
                f"{name} must be one (num_crops * B, C, H, W) tensor, got {type(crops).__name__}; "
                "torch.cat a list of same-size crops first"
            )
        if crops.dim() != 4:
            raise ValueError(f"{name} must be (num_crops * B, C, H, W), got shape {tuple(crops.shape)}")
        if not crops.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (normalized images), got {crops.dtype}")
        if crops.shape[0] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(crops.shape)}); pass None for no local crops")
    if local_crops is not None and (
        local_crops.device != global_crops.device or local_crops.dtype != global_crops.dtype
    ):
        raise ValueError(
            "global and local crops must share device and dtype, got "
            f"{global_crops.device}/{global_crops.dtype} and {local_crops.device}/{local_crops.dtype}"
        )
    if getattr(backbone, "supports_packed_multicrop", False):
        proj = backbone.patch_embed.proj
        for name, crops in named:
            if crops.shape[1] != proj.in_channels:
                raise ValueError(
                    f"{name} has {crops.shape[1]} channels, the backbone expects {proj.in_channels}"
                )
        if proj.weight.device != global_crops.device:
            raise ValueError(
                f"crops are on {global_crops.device} but the backbone is on {proj.weight.device}; "
                "move one of them"
            )


def multicrop_forward(backbone: nn.Module, global_crops: Tensor, local_crops: Tensor | None = None) -> Tensor:
    """CLS features ``(ncrops * B, D)`` of all crops, crop-major (global crops first, then local,
    each in the row order given) — the official ``MultiCropWrapper`` backbone output.

    ``global_crops``: ``(n_global * B, C, G, G)``; ``local_crops``: ``(n_local * B, C, g, g)`` or
    None (the teacher). A dino_fast ViT runs both resolutions in one packed pass (module doc);
    any other backbone runs once per resolution, as the official wrapper does."""
    _check_crops(backbone, global_crops, local_crops)
    crops = [global_crops] if local_crops is None else [global_crops, local_crops]
    if getattr(backbone, "supports_packed_multicrop", False):
        return packed_cls_features(backbone, crops)
    outs = []
    for images in crops:
        out = backbone(images)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class DINOModel(nn.Module):
    """Backbone + projection head, for the student and the teacher: ``forward(global_crops,
    local_crops=None) = head(multicrop_forward(backbone, global_crops, local_crops))``.

    State-dict keys are ``backbone.*`` and ``head.*``, as in the official ``MultiCropWrapper``; as
    there, the backbone's ``fc`` and ``head`` are replaced by identities."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward(self, global_crops: Tensor, local_crops: Tensor | None = None) -> Tensor:
        return self.head(multicrop_forward(self.backbone, global_crops, local_crops))
