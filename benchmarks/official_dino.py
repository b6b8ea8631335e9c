"""The official DINO training step, re-implemented from the algorithm as the throughput baseline.

The models are rebuilt here from the algorithm (facebookresearch/dino: vision_transformer.py) with
the official parameter names and initialization, so that one state dict loads into every variant
benchmarks/throughput.py times and into dino_fast's own models; the loss, the parameter groups, the
clipping and the last-layer freeze are the official ones from dino_fast.official.training. What
makes the official step cost what it costs is kept on purpose:

- an explicit-attention ViT (``q @ k^T``, softmax, ``@ v``; the attention matrix is materialized),
  drop path on the student, the bicubic positional-embedding interpolation for local crops
  recomputed on every forward;
- ``MultiCropWrapper``: crops arrive as a list, are grouped by resolution (``unique_consecutive``
  of their sizes, ``cumsum`` of the counts), concatenated per group, run through the backbone once
  per resolution, and the CLS features are concatenated before one head call;
- ``DINOHead`` with hook-based weight norm on the last layer (``nn.utils.weight_norm``:
  ``weight_g``/``weight_v``);
- the official loss formulation: a Python loop over (teacher view, student view) pairs, each with
  its own ``log_softmax``; softmax and log-softmax run in fp32 because autocast promotes them;
- fp16 autocast + ``GradScaler``, gradients unscaled before clipping;
- per-parameter gradient clipping with two host syncs per parameter (``norm.item()`` and the
  Python comparison of the coefficient), ``cancel_gradients_last_layer``;
- ``torch.optim.AdamW`` with its default (foreach on CUDA) implementation and the official
  parameter groups (no weight decay on biases and 1-d parameters);
- the per-parameter EMA loop under ``no_grad``;
- ``loss.item()`` + ``math.isfinite`` every step, and the logging block's
  ``torch.cuda.synchronize()`` + ``loss.item()``.

Two things of the official run are left out because a single process has no use for them: DDP
around the student (a world of one all-reduces nothing; its bucket copies cost well under 1% of a
ViT-S step) and the ``dist.all_reduce`` of the teacher's batch center (the identity for one rank).

``StepOptions`` switches the individual costs off, one by one, which is how benchmarks/throughput.py
builds its "tuned" variants from the same code: SDPA attention, bf16 autocast without a scaler,
fused AdamW, the official per-parameter clipping without host syncs (dino_fast's
``clip_gradients_``), a foreach EMA, and ``torch.compile`` of both backbones.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_fast.official.training import (
    DINOLoss,
    cancel_gradients_last_layer,
    clip_gradients,
    get_params_groups,
    trunc_normal_,
)
from dino_fast.train import clip_gradients_

# ----------------------------------------------------------------------------------------------
# Vision Transformer (official module structure and parameter names)
# ----------------------------------------------------------------------------------------------


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Stochastic depth per sample: a whole residual branch is dropped for a sample with
    probability ``drop_prob`` and the survivors are rescaled by ``1 / keep_prob``."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    mask = keep_prob + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
    mask.floor_()
    return x.div(keep_prob) * mask


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention. ``attn_impl="explicit"`` is the official computation (the
    ``(B, heads, N, N)`` score matrix is materialized, softmax runs under autocast's fp32
    promotion, then ``@ v``); ``"sdpa"`` is the tuned one (fused kernel, same math)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_impl: str = "explicit") -> None:
        super().__init__()
        if attn_impl not in ("explicit", "sdpa"):
            raise ValueError(f"attn_impl must be 'explicit' or 'sdpa', got {attn_impl!r}")
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.attn_impl == "sdpa":
            attn = None
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x)), attn


class Block(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float, attn_impl: str
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_impl=attn_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.attn(self.norm1(x))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        attn_impl: str = "explicit",
    ) -> None:
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(0.0)
        # Stochastic depth grows linearly with depth, from 0 at the first block.
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate, attn_impl) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear_and_norm)

    def interpolate_pos_encoding(self, x: Tensor, w: int, h: int) -> Tensor:
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        # The official code adds 0.1 to the target grid and passes a scale factor (not a size)
        # so that floating-point error cannot round the output grid down; the interpolation
        # weights follow from that scale factor, so it is reproduced exactly.
        w0 = w // self.patch_embed.patch_size + 0.1
        h0 = h // self.patch_embed.patch_size + 0.1
        side = math.sqrt(N)
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / side, h0 / side),
            mode="bicubic",
        )
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        B, _, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        return self.pos_drop(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.zeros_(m.bias)
        nn.init.ones_(m.weight)


ARCHS = {
    # name: (embed_dim, depth, num_heads); all with mlp_ratio 4 and qkv bias, as the official vits.
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


def vit(arch: str, **kwargs: object) -> VisionTransformer:
    """``vit("vit_small", patch_size=16, drop_path_rate=0.1)``: the official vit_* constructors."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    dim, depth, heads = ARCHS[arch]
    return VisionTransformer(embed_dim=dim, depth=depth, num_heads=heads, **kwargs)


# ----------------------------------------------------------------------------------------------
# Head and multi-crop wrapper
# ----------------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """3-layer MLP -> L2-normalized bottleneck -> weight-normalized linear layer to K outputs.
    With ``norm_last_layer`` (the official default) the weight norm's ``g`` is frozen at 1."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear_and_norm)
        with warnings.catch_warnings():
            # The official head uses the hook-based weight norm (names weight_g / weight_v,
            # weight recomputed by a forward pre-hook); its deprecation warning is noise here.
            warnings.simplefilter("ignore", FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Runs a list of crops through the backbone once per run of equal resolutions, then the
    head once on all CLS features (crop-major rows, as the loss expects)."""

    def __init__(self, backbone: VisionTransformer, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Sequence[Tensor]) -> Tensor:
        # Group boundaries come from a CPU tensor of sizes, as in the official code: no device sync.
        idx_crops = torch.cumsum(
            torch.unique_consecutive(torch.tensor([inp.shape[-1] for inp in x]), return_counts=True)[1], 0
        )
        start_idx, output = 0, torch.empty(0).to(x[0].device)
        for end_idx in idx_crops:
            out = self.backbone(torch.cat(x[start_idx:end_idx]))
            output = torch.cat((output, out))
            start_idx = end_idx
        return self.head(output)


# ----------------------------------------------------------------------------------------------
# The training step
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What both networks are: the same for every variant of a benchmark run."""

    arch: str = "vit_small"
    patch_size: int = 16
    # main_dino.py never passes img_size: the positional embedding is always built for 224 px and
    # interpolated for every other crop size (global crops included, when they are not 224).
    img_size: int = 224
    out_dim: int = 65536
    drop_path_rate: float = 0.1
    norm_last_layer: bool = True


@dataclass(frozen=True)
class StepOptions:
    """Which implementation of each part of the step runs. The defaults are the official ones."""

    attn_impl: str = "explicit"  # "explicit" | "sdpa"
    amp_dtype: torch.dtype | None = torch.float16  # None: fp32
    grad_scaler: bool = True  # official: a GradScaler whenever fp16 autocast is on
    optimizer_impl: str = "default"  # "default" (foreach on CUDA) | "fused"
    clip_impl: str = "per_param_sync"  # "per_param_sync" | "foreach"
    ema_impl: str = "loop"  # "loop" | "foreach"
    compile_backbones: bool = False
    logging_sync: bool = True  # the official logging block: cuda.synchronize() + loss.item()


OFFICIAL = StepOptions()
OFFICIAL_FP32 = StepOptions(amp_dtype=None, grad_scaler=False)
TUNED = StepOptions(
    attn_impl="sdpa",
    amp_dtype=torch.bfloat16,
    grad_scaler=False,
    optimizer_impl="fused",
    clip_impl="foreach",
    ema_impl="foreach",
)


@dataclass(frozen=True)
class LossSpec:
    """DINOLoss's teacher temperature schedule, per epoch (main_dino.py's defaults)."""

    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    epochs: int = 100


@dataclass(frozen=True)
class Hyper:
    """Schedule values of one iteration (the official loop reads them from its schedules)."""

    lr: float
    weight_decay: float
    momentum: float
    epoch: int = 1  # >= freeze_last_layer: the steady state, in which the last layer trains
    clip_grad: float = 3.0
    freeze_last_layer: int = 1


def build_student_teacher(
    spec: ModelSpec, attn_impl: str = "explicit"
) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Freshly initialized student (with drop path) and teacher (without), on the CPU; the
    teacher starts from the student's weights, as in the official code."""
    student_backbone = vit(
        spec.arch,
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        drop_path_rate=spec.drop_path_rate,
        attn_impl=attn_impl,
    )
    teacher_backbone = vit(spec.arch, img_size=spec.img_size, patch_size=spec.patch_size, attn_impl=attn_impl)
    dim = student_backbone.embed_dim
    student = MultiCropWrapper(
        student_backbone, DINOHead(dim, spec.out_dim, norm_last_layer=spec.norm_last_layer)
    )
    teacher = MultiCropWrapper(teacher_backbone, DINOHead(dim, spec.out_dim))
    teacher.load_state_dict(student.state_dict())
    return student, teacher


class TrainStep:
    """One DINO iteration as the official ``train_one_epoch`` body runs it (``OFFICIAL``), or
    with some of its parts replaced (``StepOptions``). Both networks start from ``state_dict``
    (official student names: ``backbone.*``, ``head.*``)."""

    def __init__(
        self,
        spec: ModelSpec,
        options: StepOptions,
        state_dict: dict[str, Tensor],
        device: torch.device,
        ncrops: int,
        dtype: torch.dtype = torch.float32,
        loss: LossSpec = LossSpec(),
    ) -> None:
        """``dtype`` is that of the weights (fp32, as official; fp64 lets tests compare variants
        without Adam amplifying rounding noise in near-zero gradients)."""
        if options.grad_scaler and options.amp_dtype != torch.float16:
            raise ValueError("a GradScaler only makes sense with fp16 autocast (amp_dtype=torch.float16)")
        if options.optimizer_impl not in ("default", "fused"):
            raise ValueError(f"optimizer_impl must be 'default' or 'fused', got {options.optimizer_impl!r}")
        if options.clip_impl not in ("per_param_sync", "foreach"):
            raise ValueError(f"clip_impl must be 'per_param_sync' or 'foreach', got {options.clip_impl!r}")
        if options.ema_impl not in ("loop", "foreach"):
            raise ValueError(f"ema_impl must be 'loop' or 'foreach', got {options.ema_impl!r}")
        self.options = options
        self.device = device
        student, teacher = build_student_teacher(spec, options.attn_impl)
        student.load_state_dict(state_dict)
        teacher.load_state_dict(state_dict)
        self.student = student.to(device, dtype)
        self.teacher = teacher.to(device, dtype)
        for p in self.teacher.parameters():
            p.requires_grad = False  # no backpropagation through the teacher (no no_grad either)
        if options.compile_backbones:
            # dynamic=False: one static graph per crop resolution instead of a dynamic-shape
            # recompile when the second resolution arrives.
            self.student.backbone.compile(dynamic=False)
            self.teacher.backbone.compile(dynamic=False)
        self.dino_loss = DINOLoss(
            spec.out_dim,
            ncrops,
            loss.warmup_teacher_temp,
            loss.teacher_temp,
            loss.warmup_teacher_temp_epochs,
            loss.epochs,
        ).to(device, dtype)
        groups = get_params_groups(self.student)
        # lr and weight decay are overwritten every step from the schedules, as in the official loop.
        if options.optimizer_impl == "fused":
            self.optimizer = torch.optim.AdamW(groups, lr=0.0, fused=True)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=0.0)
        self.scaler = torch.amp.GradScaler(device.type) if options.grad_scaler else None
        self._student_params = list(self.student.parameters())
        self._teacher_params = list(self.teacher.parameters())
        # Detached views share storage with the parameters, so they stay current across steps.
        self._student_detached = [p.detach() for p in self._student_params]

    def step(self, crops: Sequence[Tensor], hp: Hyper) -> float:
        """One iteration on ``crops`` (2 global crops first, then the local ones, each ``(B, 3, H, W)``);
        returns the loss as a Python float."""
        opts = self.options
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = hp.lr
            if i == 0:  # only the first group is regularized
                group["weight_decay"] = hp.weight_decay
        with torch.autocast(self.device.type, dtype=opts.amp_dtype, enabled=opts.amp_dtype is not None):
            teacher_output = self.teacher(crops[:2])  # only the 2 global views pass through the teacher
            student_output = self.student(crops)
            loss = self.dino_loss(student_output, teacher_output, hp.epoch)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value}; the official loop stops training here")

        self.optimizer.zero_grad()
        if self.scaler is None:
            loss.backward()
            self._clip(hp.clip_grad)
            cancel_gradients_last_layer(hp.epoch, self.student, hp.freeze_last_layer)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            self._clip(hp.clip_grad)
            cancel_gradients_last_layer(hp.epoch, self.student, hp.freeze_last_layer)
            self.scaler.step(self.optimizer)
            self.scaler.update()

        with torch.no_grad():
            m = hp.momentum
            if opts.ema_impl == "loop":
                for param_q, param_k in zip(self._student_params, self._teacher_params, strict=True):
                    param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
            else:
                torch._foreach_lerp_(self._teacher_params, self._student_detached, 1 - m)

        if opts.logging_sync:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return loss.item()
        return loss_value

    def _clip(self, clip: float) -> None:
        if not clip:
            return
        if self.options.clip_impl == "per_param_sync":
            clip_gradients(self.student, clip)
        else:
            clip_gradients_(self.student.parameters(), clip)


def official_state_dict(spec: ModelSpec, seed: int = 0) -> dict[str, Tensor]:
    """The shared initial weights: an officially initialized student's state dict (CPU, fp32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student, _ = build_student_teacher(spec)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


__all__ = [
    "OFFICIAL",
    "OFFICIAL_FP32",
    "TUNED",
    "DINOHead",
    "DINOLoss",
    "Hyper",
    "LossSpec",
    "ModelSpec",
    "MultiCropWrapper",
    "StepOptions",
    "TrainStep",
    "VisionTransformer",
    "build_student_teacher",
    "clip_gradients",
    "get_params_groups",
    "official_state_dict",
    "vit",
]
