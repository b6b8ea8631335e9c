"""Vision Transformer with the official DINO architecture, parameter names and API.

Official checkpoints load with ``load_state_dict(strict=True)``: the keys are ``cls_token``,
``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``
and ``norm.*``, with ``head`` an ``nn.Identity`` (no keys) as in the official backbone.

What differs from the official code is how the tokens flow, not what is computed:

- ``forward(x)`` (and :func:`dino_fast.models.multicrop_forward` for several resolutions) runs
  the tokens packed as one ``(total_tokens, D)`` matrix: LayerNorm, qkv, proj and the MLP see
  every token of every resolution in one matmul; attention runs per resolution group (or in one
  packed varlen call on CUDA). The last block computes only what the CLS output depends on:
  keys/values for every token, but queries, proj, MLP and the final norm for the CLS rows only
  (LayerNorm is per token and the output is ``norm(x)[:, 0]``, so the patch rows of the last
  block never reach it). On CUDA each residual add (with its drop-path factor) and the LayerNorm
  after it run as one Triton kernel that writes the fp32 residual and the bf16 normed tokens
  (``fused_norm``).
- Attention is pluggable (:mod:`dino_fast.models.attention`); ``get_last_selfattention`` always uses
  the explicit backend because it returns the weights.
- Per-block methods ``Block.forward(x)`` on ``(B, N, D)`` keep the official computation step by
  step, and ``VisionTransformer.forward_unpacked`` chains them: the per-resolution reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_fast.models.attention import (
    attention,
    attention_with_weights,
    check_backend,
    resolve_backend,
    varlen_attention,
    varlen_unavailable_reason,
)
from dino_fast.models.init import init_weights, trunc_normal_
from dino_fast.models.multicrop import (
    Groups,
    add_norm,
    cls_rows,
    multicrop_forward,
    residual_add,
    split_groups,
)

__all__ = [
    "ARCHS",
    "Attention",
    "Block",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "VisionTransformer",
    "drop_path",
    "vit_base",
    "vit_large",
    "vit_small",
    "vit_tiny",
]


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Stochastic depth per sample (the official formula): keep each sample's residual branch with
    probability ``1 - drop_prob`` and rescale kept ones by ``1 / (1 - drop_prob)``."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention with the official parameters (``qkv``: one ``(3D, D)`` matmul
    whose output columns are ``[q heads | k heads | v heads]``; ``proj``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = check_backend(backend)

    def _dropout_p(self) -> float:
        return self.attn_drop.p if self.training else 0.0

    def _use_varlen(self, groups: Groups, cu_seqlens: Tensor | None, ref: Tensor, backend: str) -> bool:
        # One packed call beats one call per resolution, and it reads its output straight into the
        # packed token matrix (no concatenation, no second stored copy); flash varlen has no dropout.
        return (
            cu_seqlens is not None
            and len(groups) > 1
            and backend == "sdpa"
            and self._dropout_p() == 0.0
            and varlen_unavailable_reason(ref.device, ref.dtype, self.head_dim) is None
        )

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Official signature on ``(B, N, D)`` tokens; ``(out, weights)`` when ``return_attention``."""
        B, N, C = x.shape
        q, k, v = (
            t.transpose(1, 2) for t in self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        )
        if return_attention:
            out, weights = attention_with_weights(q, k, v, scale=self.scale, dropout_p=self._dropout_p())
        else:
            out = attention(q, k, v, self.backend, scale=self.scale, dropout_p=self._dropout_p())
        y = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
        return (y, weights) if return_attention else y

    def forward_packed(self, h: Tensor, groups: Groups, cu_seqlens: Tensor | None) -> Tensor:
        """Attention + proj over packed ``(T, D)`` tokens made of ``groups`` of equal-length sequences."""
        T, C = h.shape
        heads, head_dim = self.num_heads, self.head_dim
        qkv = self.qkv(h)
        backend = resolve_backend(self.backend, qkv.device, qkv.dtype)
        if self._use_varlen(groups, cu_seqlens, qkv, backend):
            q, k, v = qkv.view(T, 3, heads, head_dim).unbind(1)
            longest = max(length for _, length in groups)
            out = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, longest, longest, scale=self.scale)
            return self.proj_drop(self.proj(out.reshape(T, C)))
        outs = []
        for (count, length), rows in zip(groups, split_groups(qkv, groups), strict=True):
            q, k, v = (t.transpose(1, 2) for t in rows.view(count, length, 3, heads, head_dim).unbind(2))
            out = attention(q, k, v, backend, scale=self.scale, dropout_p=self._dropout_p())
            # proj per group: its input is the attention output, which attention's backward keeps
            # anyway; projecting a concatenation would keep a second copy of every token.
            outs.append(self.proj(out.transpose(1, 2).reshape(count * length, C)))
        return self.proj_drop(outs[0] if len(outs) == 1 else torch.cat(outs))

    def forward_packed_cls(self, h: Tensor, groups: Groups, cu_seqlens: Tensor | None) -> Tensor:
        """Attention + proj for the CLS query of each sequence only: ``(S, D)`` for ``S`` sequences."""
        T, C = h.shape
        heads, head_dim = self.num_heads, self.head_dim
        # split, not slicing: the backward of a split is one concatenation, while every slice's
        # backward allocates a zero tensor of the whole input.
        w_q, w_kv = self.qkv.weight.split([C, 2 * C])
        b_q, b_kv = (None, None) if self.qkv.bias is None else self.qkv.bias.split([C, 2 * C])
        kv = F.linear(h, w_kv, b_kv)
        q = F.linear(cls_rows(h, groups), w_q, b_q)
        backend = resolve_backend(self.backend, kv.device, kv.dtype)
        if self._use_varlen(groups, cu_seqlens, kv, backend):
            k, v = kv.view(T, 2, heads, head_dim).unbind(1)
            num_seqs = q.shape[0]
            cu_q = torch.arange(num_seqs + 1, device=q.device, dtype=torch.int32)
            longest = max(length for _, length in groups)
            out = varlen_attention(
                q.view(num_seqs, heads, head_dim), k, v, cu_q, cu_seqlens, 1, longest, scale=self.scale
            )
            return self.proj_drop(self.proj(out.reshape(num_seqs, C)))
        outs = []
        q_groups = q.split([count for count, _ in groups])
        for (count, length), rows, q_g in zip(groups, split_groups(kv, groups), q_groups, strict=True):
            k, v = (t.transpose(1, 2) for t in rows.view(count, length, 2, heads, head_dim).unbind(2))
            q_g = q_g.view(count, 1, heads, head_dim).transpose(1, 2)
            out = attention(q_g, k, v, backend, scale=self.scale, dropout_p=self._dropout_p())
            outs.append(out.transpose(1, 2).reshape(count, C))
        return self.proj_drop(self.proj(outs[0] if len(outs) == 1 else torch.cat(outs)))


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop, backend=attn_backend)
        self.drop_path_prob = float(drop_path)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor:
        """Official block on ``(B, N, D)``; the attention weights instead when ``return_attention``."""
        if return_attention:
            return self.attn(self.norm1(x), return_attention=True)[1]
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_packed(
        self,
        x: Tensor,
        h: Tensor,
        groups: Groups,
        cu_seqlens: Tensor | None,
        drop_scale: Tensor | None,
        next_norm: nn.Module,
        fused: bool,
    ) -> tuple[Tensor, Tensor]:
        """The block on packed ``(T, D)`` tokens ``x`` given ``h = norm1(x)``; returns the new
        residual stream and ``next_norm`` of it (the next block's norm1), each residual add fused
        with the LayerNorm that follows it when ``fused``. ``drop_scale`` ``(2, T)``: per-token
        drop-path factors of the two residual branches, or None without drop path."""
        y = self.attn.forward_packed(h, groups, cu_seqlens)
        x, h = add_norm(x, y, None if drop_scale is None else drop_scale[0], self.norm2, fused)
        return add_norm(x, self.mlp(h), None if drop_scale is None else drop_scale[1], next_norm, fused)

    def forward_packed_cls(
        self, x: Tensor, h: Tensor, groups: Groups, cu_seqlens: Tensor | None, drop_scale: Tensor | None
    ) -> Tensor:
        """The block's CLS rows ``(S, D)`` only, given ``h = norm1(x)``; ``drop_scale`` ``(2, S)``."""
        y = self.attn.forward_packed_cls(h, groups, cu_seqlens)
        x_cls = residual_add(cls_rows(x, groups), y, None if drop_scale is None else drop_scale[0])
        return residual_add(x_cls, self.mlp(self.norm2(x_cls)), None if drop_scale is None else drop_scale[1])


class PatchEmbed(nn.Module):
    """Image to patch embedding: a ``patch_size``-strided convolution, tokens ``(B, h*w, D)``."""

    def __init__(
        self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) * (img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """The official DINO ViT (``vision_transformer.py``), plus ``attn_backend`` and a packed forward."""

    supports_packed_multicrop = True

    def __init__(
        self,
        img_size: list[int] | tuple[int, ...] = (224,),
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        attn_backend: str = "auto",
        fused_norm: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"VisionTransformer got unexpected keyword arguments {sorted(kwargs)}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.num_features = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.drop_path_rate = drop_path_rate
        # Packed forward: residual add + LayerNorm as one Triton kernel (kernels/add_layer_norm.py).
        # None: on CUDA, outside torch.compile (inductor fuses them itself); True: also on CPU
        # under the Triton interpreter (tests); False: never.
        self.fused_norm = fused_norm
        self.patch_embed = PatchEmbed(
            img_size=img_size[0], patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        # Stochastic depth decay rule, on the CPU so that the model builds under a meta-device context.
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                    attn_backend=attn_backend,
                )
                for i in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # The official order of draws: every module's default init above, then these re-inits.
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)

    @property
    def attn_backend(self) -> str:
        return self.blocks[0].attn.backend

    def set_attn_backend(self, backend: str) -> None:
        """Switch every block's attention backend (a name from dino_fast.models.attention.BACKENDS)."""
        check_backend(backend)
        for blk in self.blocks:
            blk.attn.backend = backend

    def interpolate_pos_encoding(self, x: Tensor, w: int, h: int) -> Tensor:
        """Positional embedding for tokens ``x`` of an image with spatial dims ``(w, h)`` = (dim 2,
        dim 3) — the official naming. Bicubic resampling of the 224-px grid with the official
        ``+0.1`` offset and ``scale_factor`` call, so outputs match the official code."""
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size
        h0 = h // self.patch_embed.patch_size
        # The official code adds 0.1 so that floor(size * scale_factor) lands on w0, h0 despite
        # floating-point error (facebookresearch/dino#8); the scale factor, not the output size,
        # also sets where the bicubic samples fall, so it must be passed the same way.
        w0, h0 = w0 + 0.1, h0 + 0.1
        side = int(math.sqrt(N))
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
            mode="bicubic",
        )
        if int(w0) != patch_pos_embed.shape[-2] or int(h0) != patch_pos_embed.shape[-1]:
            raise RuntimeError(
                f"positional embedding interpolated to {tuple(patch_pos_embed.shape[-2:])}, expected "
                f"{(int(w0), int(h0))} for a {w}x{h} input"
            )
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """``(B, 1 + h*w, D)`` tokens: [CLS] + patch embeddings, plus positional embedding."""
        B, _, w, h = x.shape
        if w < self.patch_size or h < self.patch_size:
            raise ValueError(f"images of {w}x{h} px are smaller than one {self.patch_size}-px patch")
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        return self.pos_drop(x)

    def forward(self, x: Tensor) -> Tensor:
        """CLS features ``(B, D)`` of images ``x`` ``(B, C, H, W)`` (packed path, see module doc)."""
        return self.head(multicrop_forward(self, x))

    def forward_unpacked(self, x: Tensor) -> Tensor:
        """The official forward, block by block on ``(B, N, D)``; the same result as ``forward``."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """The last block's attention weights ``(B, heads, N, N)`` (explicit attention)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_layers(self, x: Tensor, n: int = 1) -> list[Tensor]:
        """Normalized ``(B, N, D)`` tokens of the last ``n`` blocks, earliest first."""
        x = self.prepare_tokens(x)
        output = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                output.append(self.norm(x))
        return output


def _vit(patch_size: int, embed_dim: int, depth: int, num_heads: int, **kwargs: Any) -> VisionTransformer:
    return VisionTransformer(
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        **kwargs,
    )


def vit_tiny(
    patch_size: int = 16, drop_path_rate: float = 0.0, attn_backend: str = "auto", **kwargs: Any
) -> VisionTransformer:
    """ViT-Ti: 192-d, 12 blocks, 3 heads (5.5M parameters)."""
    return _vit(patch_size, 192, 12, 3, drop_path_rate=drop_path_rate, attn_backend=attn_backend, **kwargs)


def vit_small(
    patch_size: int = 16, drop_path_rate: float = 0.0, attn_backend: str = "auto", **kwargs: Any
) -> VisionTransformer:
    """ViT-S: 384-d, 12 blocks, 6 heads (21M parameters); DINO's main model."""
    return _vit(patch_size, 384, 12, 6, drop_path_rate=drop_path_rate, attn_backend=attn_backend, **kwargs)


def vit_base(
    patch_size: int = 16, drop_path_rate: float = 0.0, attn_backend: str = "auto", **kwargs: Any
) -> VisionTransformer:
    """ViT-B: 768-d, 12 blocks, 12 heads (85M parameters)."""
    return _vit(patch_size, 768, 12, 12, drop_path_rate=drop_path_rate, attn_backend=attn_backend, **kwargs)


def vit_large(
    patch_size: int = 16, drop_path_rate: float = 0.0, attn_backend: str = "auto", **kwargs: Any
) -> VisionTransformer:
    """ViT-L: 1024-d, 24 blocks, 16 heads (303M parameters); not in the official DINO file, same
    construction as the other sizes (as in the DINO follow-ups iBOT/DINOv2)."""
    return _vit(patch_size, 1024, 24, 16, drop_path_rate=drop_path_rate, attn_backend=attn_backend, **kwargs)


ARCHS: dict[str, Callable[..., VisionTransformer]] = {
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_large": vit_large,
}
