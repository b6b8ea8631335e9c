"""End-to-end DINO training throughput: dino_fast against the official way of training, in one run.

    python benchmarks/throughput.py --device cuda --preset anchor --json results/throughput_b128.json
    python benchmarks/throughput.py --device cuda --preset anchor --batch_size_per_gpu 64 \\
        --json results/throughput_b64.json
    python benchmarks/throughput.py --device cuda --preset anchor --data dali --data_path DIR --json ...
    python benchmarks/throughput.py --device cpu --preset tiny --json /tmp/throughput_tiny.json

Presets: ``anchor`` is DESIGN.md's measurement (ViT-S/16, 2x224 + 10x96 crops, K=65536, B=128;
``--batch_size_per_gpu 64`` gives the B=64 anchor), ``tiny`` a full-depth ViT-tiny on 32/16-px
crops with K=256 and B=4 that exercises every code path on a CPU. Data: by default one synthetic
batch already on the device is reused (no loading cost); ``--data dali|torchvision --data_path
DIR`` makes every timed step take the next batch of dino_fast's pipeline, so a step waits when
loading does not keep up and the im/s then shows whether it does.

Every variant times the same work per step as the official ``train_one_epoch`` body: teacher
forward on the 2 global crops, student forward and backward on all crops, DINO loss, gradient
clipping, AdamW and the teacher EMA. All variants share the architecture, batch, crops, K, the
input batch and the initial weights (one official-named state dict loaded into each).

Variants:

- ``official``: benchmarks/official_dino.py, the official step re-implemented (explicit attention,
  per-resolution backbone loop, fp16 autocast + GradScaler, per-parameter clipping with two host
  syncs per parameter, foreach AdamW, per-parameter EMA loop, ``loss.item()`` every step and the
  logging block's ``cuda.synchronize()``, cudnn.benchmark on). On CPU it runs in fp32: the
  official code enables autocast only with a GPU GradScaler.
- ``tuned``: the same step with SDPA attention, bf16 autocast (no scaler), fused AdamW, clipping
  with the official per-parameter rule computed by foreach ops without host syncs, foreach EMA.
- ``tuned+compile``: ``tuned`` with both backbones under ``torch.compile`` (one static graph per
  crop resolution).
- ``dino_fast``: ``dino_fast.train.Trainer.step`` with its default settings (bf16, one multi-crop
  backbone call, fused DINO loss and EMA kernels, the official per-parameter clipping computed
  on the device: a sync-free step).
- ``dino_fast+compile``: the same with ``compile=True``; ``dino_fast+cudagraphs``: compiled with
  ``mode="reduce-overhead"`` (CUDA graphs); ``dino_fast+fp16`` (not in the default list): the
  official precision (fp16 + GradScaler) in dino_fast's step.

Before anything is timed, each variant runs two steps with drop path off on the same batch from
the same weights, and its losses must match an fp32 run of the official step within the
tolerance of its precision (the first loss checks the forward, the second the whole update;
after an update skipped by a calibrating GradScaler only the first is comparable); a variant
that does not match is reported as failed and not timed. Timing: a fresh build with drop path
0.1, steps at the iterations of epoch 1 (past freeze_last_layer: the head's last layer trains, as
in the steady state), warm-up steps excluded (compilation happens there), then the median of
``--steps`` steps (CUDA events on a GPU). Peak memory is the
steady-state peak of the timed steps (``max_memory_allocated``, weights, optimizer state and the
shared input batch included), with the previous variant freed and the peak reset in between.
The JSON is rewritten after every variant (``"complete": false`` until the end), so a run cut off
by a time limit still leaves the variants it measured. Exit status 1 when any variant failed.

Reading MFU: the script counts the matmul FLOPs of one image's share of a step analytically
(student forward + backward over all crops, teacher forward over the global crops: every
linear layer, the attention matmuls, the patch embedding and the DINO head) and prints the
breakdown (a test checks it against torch's FlopCounterMode). For the anchor it is 123.4 GFLOP:
120.6 in the transformer blocks (DESIGN.md's "~121 GFLOP" counts these alone), 1.1 in the patch
embedding and 1.7 in the head. MFU = FLOPs per image x images/s / the device's dense bf16/fp16
tensor-core peak (``--peak_tflops`` overrides the built-in table). Every variant does the same
useful FLOPs, so MFU ratios equal throughput ratios; MFU says how far from the compute floor a
variant is.
(dino_fast's packed forward skips the last block's dead work on non-CLS tokens, about 7% of the
count; it is still credited with the full official count, as "model FLOPs" are.)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import math
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Run as `python benchmarks/throughput.py` from a checkout: dino_fast need not be installed.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(1, _REPO_ROOT)

from official_dino import (  # noqa: E402
    ARCHS,
    OFFICIAL,
    OFFICIAL_FP32,
    TUNED,
    Hyper,
    LossSpec,
    ModelSpec,
    StepOptions,
    TrainStep,
)
from official_dino import official_state_dict as make_official_state_dict  # noqa: E402
from timing import environment, measure, write_json  # noqa: E402

from dino_fast.train import TrainConfig  # noqa: E402
from dino_fast.train.schedules import build_schedules  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # DESIGN.md's anchor: ViT-S/16, 2 x 224 + 10 x 96 crops, K = 65536, 128 images per step
    # (run it again with --batch_size_per_gpu 64 for the B=64 anchor).
    "anchor": {
        "arch": "vit_small",
        "patch_size": 16,
        "batch_size_per_gpu": 128,
        "local_crops_number": 10,
        "out_dim": 65536,
        "global_crops_size": 224,
        "local_crops_size": 96,
        "steps": 20,
        "warmup": 5,
    },
    # Every code path at CPU-test size: a full-depth ViT-tiny on 2 x 2 and 1 x 1 patch grids.
    "tiny": {
        "arch": "vit_tiny",
        "patch_size": 16,
        "batch_size_per_gpu": 4,
        "local_crops_number": 2,
        "out_dim": 256,
        "global_crops_size": 32,
        "local_crops_size": 16,
        "steps": 3,
        "warmup": 1,
    },
}

# Schedules need an epoch length; synthetic data has none. Steps are timed in epoch 1, past the
# official freeze_last_layer epoch, so the head's last layer trains as in the steady state.
STEPS_PER_EPOCH = 1000

# Relative loss tolerance of the equal-loss check, by the precision a variant computes in. fp32
# differs from the reference only by summation order; fp16 keeps 11 mantissa bits, bf16 8.
CHECK_RTOL = {"fp32": 1e-4, "fp16": 1e-3, "bf16": 5e-3}

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="anchor: ViT-S/16, 2x224+10x96, K=65536, B=128; tiny: seconds on a CPU "
        "(default: anchor on cuda, tiny on cpu)",
    )
    p.add_argument("--arch", choices=sorted(ARCHS), default=None)
    p.add_argument("--patch_size", type=int, default=None)
    p.add_argument("--batch_size_per_gpu", type=int, default=None, help="images per step")
    p.add_argument("--local_crops_number", type=int, default=None)
    p.add_argument("--global_crops_size", type=int, default=None)
    p.add_argument("--local_crops_size", type=int, default=None)
    p.add_argument("--out_dim", type=int, default=None, help="DINO head output size K")
    p.add_argument("--steps", type=int, default=None, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (compilation happens here)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"which to run, in order (default: {' '.join(DEFAULT_VARIANTS)}; "
        f"also available: {' '.join(sorted(set(VARIANTS) - set(DEFAULT_VARIANTS)))})",
    )
    p.add_argument(
        "--data",
        choices=("synthetic", "dali", "torchvision"),
        default="synthetic",
        help="synthetic: one batch already on the device, reused (no loading cost); dali / "
        "torchvision: every timed step takes the next batch of dino_fast's pipeline over --data_path, "
        "so a step waits when loading does not keep up",
    )
    p.add_argument("--data_path", default=None, help="ImageFolder root (class folders of images)")
    p.add_argument("--num_workers", type=int, default=8, help="DALI CPU threads / torchvision loader workers")
    p.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="the device's dense bf16 peak for MFU (default: from the device name)",
    )
    p.add_argument("--seed", type=int, default=0, help="initial weights and the synthetic batch")
    p.add_argument("--json", default=None, help="also write every result and the environment here")
    args = p.parse_args(argv)

    if args.preset is None:
        args.preset = "anchor" if args.device == "cuda" else "tiny"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.variants is None:
        args.variants = list(DEFAULT_VARIANTS)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if len(set(args.variants)) != len(args.variants):
        p.error(f"--variants lists a variant twice: {args.variants}")
    for name in (
        "batch_size_per_gpu",
        "patch_size",
        "out_dim",
        "steps",
        "global_crops_size",
        "local_crops_size",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.local_crops_number < 0 or args.warmup < 0:
        p.error("--local_crops_number and --warmup must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch sees no CUDA device; run --device cpu --preset tiny here")
    if args.data != "synthetic":
        if not args.data_path:
            p.error(f"--data {args.data} needs --data_path DIR (an ImageFolder root: class folders of JPEGs)")
        if not Path(args.data_path).is_dir():
            p.error(f"--data_path {args.data_path!r} is not a directory")
    elif args.data_path:
        p.error("--data_path is only used with --data dali or --data torchvision")
    if args.num_workers < 0:
        p.error(f"--num_workers must be >= 0 (got {args.num_workers})")
    return args


# ----------------------------------------------------------------------------------------------
# FLOP count
# ----------------------------------------------------------------------------------------------


def vit_forward_flops(embed_dim: int, depth: int, mlp_ratio: float, patch_size: int, img_size: int) -> dict:
    """Matmul FLOPs (2 per multiply-add) of one image's forward through the backbone at one crop size."""
    n_patches = (img_size // patch_size) ** 2
    tokens = n_patches + 1
    hidden = int(embed_dim * mlp_ratio)
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
    dim, depth, _ = ARCHS[arch]
    g = vit_forward_flops(dim, depth, 4.0, patch_size, global_size)
    loc = vit_forward_flops(dim, depth, 4.0, patch_size, local_size)
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
    if override is not None:
        return override, "--peak_tflops"
    if device.type != "cuda":
        return None, "no tensor-core peak for a CPU: MFU not reported (pass --peak_tflops to get one)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops, f"dense bf16 data-sheet peak for {key}"
    return None, f"unknown device {name!r}: pass --peak_tflops for MFU"


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Crops:
    """A multi-crop batch, crop-major as dino_fast's MultiCropBatch (the fields Trainer.step reads)."""

    global_crops: torch.Tensor
    local_crops: torch.Tensor | None


def synthetic_batch(args: argparse.Namespace, device: torch.device) -> Crops:
    """Normalized-image-like fp32 crops (what the official loader delivers), made once and reused."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    b, g, s = args.batch_size_per_gpu, args.global_crops_size, args.local_crops_size
    global_crops = torch.randn(2 * b, 3, g, g, generator=gen)
    local_crops = (
        torch.randn(args.local_crops_number * b, 3, s, s, generator=gen) if args.local_crops_number else None
    )
    return Crops(global_crops.to(device), None if local_crops is None else local_crops.to(device))


def crop_list(batch: Any, batch_size: int) -> list[torch.Tensor]:
    """The official loader's ``images`` list: one ``(B, 3, S, S)`` view per crop, no copies."""
    views = list(batch.global_crops.split(batch_size))
    if batch.local_crops is not None:
        views += list(batch.local_crops.split(batch_size))
    return views


def loader_batches(
    config: TrainConfig, kind: str, device: torch.device, data_path: str, num_workers: int
) -> Iterator[Any]:
    """dino_fast's ``kind`` multi-crop pipeline over ``data_path`` as training builds it, epoch
    after epoch (crops in the compute dtype of dino_fast's default precision)."""
    from dino_fast.distributed import DistInfo
    from dino_fast.train import build_loader

    config = dataclasses.replace(config, data=kind, data_path=data_path, num_workers=num_workers)
    config.validate()
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    loader = build_loader(config, info, Path(data_path))
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        produced = 0
        for batch in loader:
            produced += 1
            yield batch
        if produced == 0:
            raise RuntimeError(
                f"{data_path} yields no full batch of {config.batch_size_per_gpu} images; "
                "use a larger folder or a smaller --batch_size_per_gpu"
            )


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    options: StepOptions | None = None  # the official-step family (benchmarks/official_dino.py)
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields of a dino_fast variant

    @property
    def is_dino_fast(self) -> bool:
        return self.options is None

    @property
    def compiles(self) -> bool:
        return bool(self.overrides.get("compile")) or (
            self.options is not None and self.options.compile_backbones
        )


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "official", "official DINO step: fp16+GradScaler, explicit attention, per-param loops", OFFICIAL
        ),
        Variant("tuned", "official step + SDPA, bf16, fused AdamW, foreach clip/EMA", TUNED),
        Variant(
            "tuned+compile",
            "tuned + torch.compile of both backbones",
            dataclasses.replace(TUNED, compile_backbones=True),
        ),
        Variant("dino_fast", "dino_fast Trainer.step, default settings"),
        Variant("dino_fast+compile", "dino_fast Trainer.step, compile=True", overrides={"compile": True}),
        Variant(
            "dino_fast+cudagraphs",
            "dino_fast Trainer.step, compile mode reduce-overhead (CUDA graphs)",
            overrides={"compile": True, "compile_mode": "reduce-overhead"},
        ),
        Variant(
            "dino_fast+fp16", "dino_fast Trainer.step, fp16 + GradScaler", overrides={"precision": "fp16"}
        ),
    )
}
DEFAULT_VARIANTS = (
    "official",
    "tuned",
    "tuned+compile",
    "dino_fast",
    "dino_fast+compile",
    "dino_fast+cudagraphs",
)


@dataclass
class Context:
    """What every variant shares: the configuration, the initial weights, the schedules."""

    args: argparse.Namespace
    device: torch.device
    config: TrainConfig
    state_dict: dict[str, torch.Tensor]
    first_iteration: int

    def __post_init__(self) -> None:
        self._schedules = build_schedules(self.config, STEPS_PER_EPOCH, world_size=1)

    def hyper(self, iteration: int) -> Hyper:
        s = self._schedules.at(iteration)
        return Hyper(
            lr=s.lr,
            weight_decay=s.weight_decay,
            momentum=s.momentum,
            epoch=s.epoch,
            clip_grad=self.config.clip_grad,
            freeze_last_layer=self.config.freeze_last_layer,
        )

    def loss_spec(self) -> LossSpec:
        c = self.config
        return LossSpec(c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs, c.epochs)

    def model_spec(self, drop_path_rate: float) -> ModelSpec:
        c = self.config
        return ModelSpec(
            arch=c.arch,
            patch_size=c.patch_size,
            out_dim=c.out_dim,
            drop_path_rate=drop_path_rate,
            norm_last_layer=c.norm_last_layer,
        )


def bench_config(args: argparse.Namespace) -> TrainConfig:
    """The run's settings as a dino_fast TrainConfig: the official defaults (vit_small_imagenet
    preset) with this benchmark's shapes."""
    config = TrainConfig.from_preset(
        "vit_small_imagenet",
        arch=args.arch,
        patch_size=args.patch_size,
        batch_size_per_gpu=args.batch_size_per_gpu,
        local_crops_number=args.local_crops_number,
        global_crops_size=args.global_crops_size,
        local_crops_size=args.local_crops_size,
        out_dim=args.out_dim,
        data="synthetic",
        synthetic_size=STEPS_PER_EPOCH * args.batch_size_per_gpu,
        seed=args.seed,
        device=args.device,
    )
    config.validate()
    return config


def official_options(variant: Variant, device: torch.device) -> StepOptions:
    assert variant.options is not None
    if device.type != "cuda" and variant.options.amp_dtype == torch.float16:
        # The official code turns autocast on only with a (CUDA) GradScaler; on a CPU it trains in fp32.
        return dataclasses.replace(variant.options, amp_dtype=None, grad_scaler=False)
    return variant.options


def precision_of(variant: Variant, ctx: Context) -> str:
    if variant.is_dino_fast:
        return dataclasses.replace(ctx.config, **variant.overrides).resolved_precision()
    dtype = official_options(variant, ctx.device).amp_dtype
    return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


class OfficialFamilyRunner:
    """A variant built on benchmarks/official_dino.TrainStep."""

    def __init__(self, variant: Variant, ctx: Context, drop_path_rate: float) -> None:
        self.ctx = ctx
        self.options = official_options(variant, ctx.device)
        self.train_step = TrainStep(
            ctx.model_spec(drop_path_rate),
            self.options,
            ctx.state_dict,
            ctx.device,
            ctx.config.ncrops,
            loss=ctx.loss_spec(),
        )

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return self.train_step.scaler

    def prepare(self, batch: Any) -> list[torch.Tensor]:
        views = crop_list(batch, self.ctx.config.batch_size_per_gpu)
        if self.options.amp_dtype is None and views[0].dtype != torch.float32:
            views = [v.float() for v in views]  # without autocast the weights are fp32
        return views

    def step(self, prepared: list[torch.Tensor], iteration: int) -> float:
        # main_dino.py sets cudnn.benchmark = True for its whole run (it picks the patch-embedding
        # convolution's algorithm); scoped here so that dino_fast runs with its own setting.
        saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            return self.train_step.step(prepared, self.ctx.hyper(iteration))
        finally:
            torch.backends.cudnn.benchmark = saved


class DinoFastRunner:
    """A variant that runs ``dino_fast.train.Trainer.step`` as training does."""

    def __init__(self, variant: Variant, ctx: Context, drop_path_rate: float) -> None:
        from dino_fast.data import MultiCropBatch
        from dino_fast.train import DATA_DTYPES, Trainer

        self._batch_type = MultiCropBatch
        config = dataclasses.replace(ctx.config, drop_path_rate=drop_path_rate, **variant.overrides)
        config.validate()
        self.trainer = Trainer(config, ctx.device, steps_per_epoch=STEPS_PER_EPOCH)
        # Official names on both sides, so the shared weights load strictly.
        self.trainer.student.load_state_dict(ctx.state_dict)
        self.trainer.teacher.load_state_dict(ctx.state_dict)
        self.input_dtype = DATA_DTYPES[config.resolved_precision()]

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return self.trainer.scaler

    def prepare(self, batch: Any) -> Any:
        # dino_fast's loaders deliver crops in the compute dtype; the synthetic batch is fp32.
        local = batch.local_crops
        return self._batch_type(
            global_crops=batch.global_crops.to(self.input_dtype),
            local_crops=None if local is None else local.to(self.input_dtype),
        )

    def step(self, prepared: Any, iteration: int) -> torch.Tensor:
        return self.trainer.step(prepared, iteration)


def build_runner(
    variant: Variant, ctx: Context, drop_path_rate: float
) -> OfficialFamilyRunner | DinoFastRunner:
    if variant.is_dino_fast:
        return DinoFastRunner(variant, ctx, drop_path_rate)
    return OfficialFamilyRunner(variant, ctx, drop_path_rate)


# ----------------------------------------------------------------------------------------------
# Equal-loss check
# ----------------------------------------------------------------------------------------------

CHECK_STEPS = 2  # the first loss checks the forward; the second also the update (clip, AdamW, EMA, center)


@contextmanager
def exact_fp32() -> Iterator[None]:
    """No TF32 in matmuls and convolutions while the fp32 reference runs."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_losses(runner: Any, batch: Crops, ctx: Context) -> tuple[list[float], bool]:
    """The runner's losses over ``CHECK_STEPS`` steps on ``batch``, and whether a GradScaler
    skipped the first update (inf/nan fp16 gradients while its scale calibrates: the official
    run does the same in its first iterations, so the later losses cannot match then)."""
    prepared = runner.prepare(batch)
    scaler = runner.grad_scaler
    scale_before = None if scaler is None else scaler.get_scale()
    losses = [float(runner.step(prepared, ctx.first_iteration))]
    skipped = scaler is not None and scaler.get_scale() < scale_before
    losses += [float(runner.step(prepared, ctx.first_iteration + i)) for i in range(1, CHECK_STEPS)]
    return losses, skipped


def reference_losses(ctx: Context, batch: Crops) -> list[float]:
    """The official step in fp32 without drop path: what every variant's losses must match.
    Attention runs through SDPA, equal to the explicit form in exact arithmetic (tested), so that
    the fp32 reference does not hold fp32 N x N attention matrices for every block at B=128."""
    reference = Variant(
        "reference", "official step in fp32", dataclasses.replace(OFFICIAL_FP32, attn_impl="sdpa")
    )
    with exact_fp32():
        runner = OfficialFamilyRunner(reference, ctx, drop_path_rate=0.0)
        losses, _ = check_losses(runner, batch, ctx)
    del runner
    release_memory(ctx.device, compiled=False)
    return losses


def compare(
    losses: list[float], reference: list[float], precision: str, skipped_update: bool
) -> dict[str, Any]:
    rtol = CHECK_RTOL[precision]
    # After a skipped update only the first loss (the forward from the shared weights) is comparable.
    compared = 1 if skipped_update else len(losses)
    rel = [abs(a - b) / abs(b) for a, b in zip(losses[:compared], reference[:compared], strict=True)]
    finite = all(math.isfinite(v) for v in losses)
    return {
        "losses": losses,
        "reference": reference,
        "compared_steps": compared,
        "grad_scaler_skipped_first_update": skipped_update,
        "max_rel_diff": max(rel) if finite else None,
        "rtol": rtol,
        "precision": precision,
        "passed": finite and max(rel) <= rtol,
    }


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def release_memory(device: torch.device, compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()  # compiled graphs (and CUDA-graph pools) hold their own memory
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def check_variant(
    variant: Variant, ctx: Context, batch: Crops, reference: list[float], precision: str
) -> dict:
    """Build the variant without drop path, run the check steps, compare with the reference."""
    runner = build_runner(variant, ctx, drop_path_rate=0.0)
    losses, skipped = check_losses(runner, batch, ctx)
    return compare(losses, reference, precision, skipped)


def time_variant(
    variant: Variant, ctx: Context, batch: Crops, timing_batches: Callable[[], Iterator[Any]] | None
) -> dict[str, Any]:
    """Build the variant as it trains (drop path on), then warm up and time it."""
    runner = build_runner(variant, ctx, drop_path_rate=ctx.config.drop_path_rate)
    iterations = itertools.count(ctx.first_iteration)
    if timing_batches is None:
        prepared = runner.prepare(batch)
        fn = lambda: runner.step(prepared, next(iterations))
    else:
        source = timing_batches()
        fn = lambda: runner.step(runner.prepare(next(source)), next(iterations))
    stats = measure(fn, device=ctx.device, warmup=ctx.args.warmup, iters=ctx.args.steps)
    if ctx.device.type == "cuda":
        # measure() resets the peak after the warm-up: this is the steady state of the timed steps.
        stats["peak_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    return stats


def run_variant(
    variant: Variant,
    ctx: Context,
    batch: Crops,
    reference: list[float],
    timing_batches: Callable[[], Iterator[Any]] | None,
    flops_per_image: int,
    peak_tflops: float | None,
) -> dict[str, Any]:
    result: dict[str, Any] = {"name": variant.name, "description": variant.description}
    try:
        result["precision"] = precision_of(variant, ctx)
        started = time.perf_counter()
        check = result["check"] = check_variant(variant, ctx, batch, reference, result["precision"])
        result["check_s"] = time.perf_counter() - started
        release_memory(ctx.device, variant.compiles)
        if not check["passed"]:
            raise AssertionError(
                f"loss mismatch: {check['losses']} vs fp32 official {check['reference']} "
                f"(max relative difference {check['max_rel_diff']} over the first {check['compared_steps']} "
                f"step(s), tolerance {check['rtol']} for {check['precision']})"
            )
        started = time.perf_counter()
        stats = time_variant(variant, ctx, batch, timing_batches)
        result["build_warmup_and_timing_s"] = time.perf_counter() - started
        ips = ctx.args.batch_size_per_gpu / (stats["median_ms"] / 1e3)
        result.update(
            status="ok",
            ms_per_step=stats["median_ms"],
            p10_ms=stats["p10_ms"],
            p90_ms=stats["p90_ms"],
            steps=stats["iters"],
            images_per_s=ips,
            mfu=None if peak_tflops is None else flops_per_image * ips / (peak_tflops * 1e12),
            peak_gib=stats.get("peak_gib"),
        )
    except Exception as err:  # a failed variant is a result to report, never a reason to stop
        traceback.print_exc()
        result.update(status="failed", error=f"{type(err).__name__}: {err}")
    finally:
        release_memory(ctx.device, variant.compiles)
    return result


def _check_text(check: dict[str, Any] | None) -> str:
    if check is None:
        return "-"
    if check["max_rel_diff"] is None:
        return "FAIL (non-finite loss)"
    verdict = "pass" if check["passed"] else "FAIL"
    return f"{verdict} ({check['max_rel_diff']:.1e} vs rtol {check['rtol']:.0e})"


def format_table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'variant':<22} {'prec':<5} {'im/s':>9} {'ms/step':>9} {'vs official':>11} "
        f"{'peak GiB':>9} {'MFU':>6}  check (max rel. loss diff)"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        check_txt = _check_text(r.get("check"))
        if r["status"] != "ok":
            lines.append(f"{r['name']:<22} {r.get('precision', '-'):<5} FAILED: {r['error']}  [{check_txt}]")
            continue
        ratio = f"{r['ratio_vs_official']:.2f}x" if r.get("ratio_vs_official") else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(
            f"{r['name']:<22} {r['precision']:<5} {r['images_per_s']:9.1f} {r['ms_per_step']:9.2f} "
            f"{ratio:>11} {peak:>9} {mfu:>6}  {check_txt}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    config = bench_config(args)
    ctx = Context(
        args=args,
        device=device,
        config=config,
        state_dict=make_official_state_dict(
            ModelSpec(
                arch=config.arch,
                patch_size=config.patch_size,
                out_dim=config.out_dim,
                norm_last_layer=config.norm_last_layer,
            ),
            seed=args.seed,
        ),
        first_iteration=config.freeze_last_layer * STEPS_PER_EPOCH,
    )
    env = environment(device)
    flops = step_flops(
        config.arch,
        config.patch_size,
        config.global_crops_size,
        config.local_crops_size,
        config.local_crops_number,
        config.out_dim,
    )
    peak_tflops, peak_source = device_peak_tflops(device, args.peak_tflops)
    shape = (
        f"{config.arch}/{config.patch_size}, 2x{config.global_crops_size}+{config.local_crops_number}x"
        f"{config.local_crops_size}, K={config.out_dim}, B={config.batch_size_per_gpu}"
    )
    print(
        f"throughput: {shape} on {env['device']} (torch {env['torch']}, triton {env['triton']}), "
        f"data={args.data}, {args.warmup} warm-up + {args.steps} timed steps",
        flush=True,
    )
    print(
        "matmul GFLOP per image: "
        + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in flops.items() if k != "total")
        + f"; total {flops['total'] / 1e9:.2f}"
    )
    print(f"MFU peak: {peak_tflops} TFLOP/s ({peak_source})", flush=True)

    batch = synthetic_batch(args, device)
    reference = reference_losses(ctx, batch)
    print(f"fp32 official reference losses (drop path off): {reference}", flush=True)
    timing_batches = None
    if args.data != "synthetic":
        timing_batches = lambda: loader_batches(config, args.data, device, args.data_path, args.num_workers)

    results: list[dict[str, Any]] = []
    payload = {
        "benchmark": "throughput",
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "environment": env,
        "config": {
            "preset": args.preset,
            "arch": config.arch,
            "patch_size": config.patch_size,
            "batch_size_per_gpu": config.batch_size_per_gpu,
            "global_crops": [2, config.global_crops_size],
            "local_crops": [config.local_crops_number, config.local_crops_size],
            "out_dim": config.out_dim,
            "drop_path_rate": config.drop_path_rate,
            "data": args.data,
            "data_path": args.data_path,
            "warmup": args.warmup,
            "steps": args.steps,
            "seed": args.seed,
            "first_iteration": ctx.first_iteration,
            "hyper_at_first_iteration": dataclasses.asdict(ctx.hyper(ctx.first_iteration)),
        },
        "flops_per_image": flops,
        "peak_tflops": peak_tflops,
        "peak_tflops_source": peak_source,
        "check": {"reference_losses": reference, "steps": CHECK_STEPS, "rtol": CHECK_RTOL},
        "variants": results,
        "variants_requested": list(args.variants),
        "complete": False,
    }
    for name in args.variants:
        result = run_variant(
            VARIANTS[name], ctx, batch, reference, timing_batches, flops["total"], peak_tflops
        )
        results.append(result)
        status = (
            f"{result['images_per_s']:.1f} im/s" if result["status"] == "ok" else f"FAILED: {result['error']}"
        )
        print(f"  {name}: {status}", flush=True)
        _add_ratios(results)
        # Written after every variant: a run cut short (a time limit) still leaves what it measured.
        write_json(args.json, payload)
    print(format_table(results), flush=True)
    payload["complete"] = True
    payload["all_ok"] = all(r["status"] == "ok" for r in results)
    write_json(args.json, payload)
    return payload


def _add_ratios(results: list[dict[str, Any]]) -> None:
    official = next((r for r in results if r["name"] == "official" and r["status"] == "ok"), None)
    for r in results:
        if r["status"] == "ok" and official is not None:
            r["ratio_vs_official"] = r["images_per_s"] / official["images_per_s"]


if __name__ == "__main__":
    sys.exit(0 if main()["all_ok"] else 1)
