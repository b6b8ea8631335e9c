"""ViT suite: student forward+backward and teacher forward, official per-resolution loop vs dino_fast.

    python benchmarks/kernels.py --device cuda --suites vit          # in the per-op driver
    python benchmarks/bench_vit.py --device cuda --full --compile --json out.json

Implementations, all on the same weights:

- ``official-loop/explicit``: the official computation — one backbone call per crop resolution,
  each block as in the official ``vision_transformer.py`` (explicit attention that materializes
  the weights, official drop-path formula). It is dino_fast's own ViT run through
  ``forward_unpacked`` with ``attn_backend="explicit"``, which the tests check equals the
  official code; no separate copy of the architecture lives here.
- ``official-loop/sdpa``: the same loop with SDPA attention ("SDPA alone" of the anchors).
- ``dino_fast/multicrop``: ``DINOModel`` = one packed pass over every crop
  (:func:`dino_fast.models.multicrop_forward`), attention backend ``auto``.
- ``dino_fast/multicrop-per-group`` (CUDA only): the same with attention pinned to flash per
  resolution group instead of one packed varlen call.
- ``dino_fast/multicrop-unfused-norm`` (CUDA only): the same without the fused residual-add +
  LayerNorm kernel (plain addcmul + layer_norm under autocast).
- ``+compile`` rows (``--compile``): ``torch.compile`` of the official SDPA loop and of dino_fast.

The student is the whole DINO student (backbone with drop path 0.1 in train mode + DINOHead,
K=65536 at full size); the teacher is backbone + head in eval mode under ``no_grad`` on the
global crops only. ``full``: ViT-S/16, 2x224 + 10x96 crops, B=64 and 128, bf16 autocast.
Otherwise a small ViT on small crops in fp32, for a CPU.
"""

from __future__ import annotations

if not __package__:  # `python benchmarks/bench_vit.py`: rerun as `python -m benchmarks.bench_vit`
    from as_module import rerun_as_module

    rerun_as_module(__file__)

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from benchmarks.timing import environment, measure, write_json
from dino_fast.models import DINOHead, DINOModel, VisionTransformer, attention, vit_small


@dataclass(frozen=True)
class Setup:
    name: str
    build_backbone: Callable[[float], VisionTransformer]
    out_dim: int
    hidden_dim: int
    bottleneck_dim: int
    global_size: int
    local_size: int
    n_local: int
    batches: tuple[int, ...]
    amp_dtype: torch.dtype | None
    warmup: int
    iters: int


def full_setup() -> Setup:
    return Setup(
        name="vit_small/16",
        build_backbone=lambda dpr: vit_small(patch_size=16, drop_path_rate=dpr),
        out_dim=65536,
        hidden_dim=2048,
        bottleneck_dim=256,
        global_size=224,
        local_size=96,
        n_local=10,
        batches=(64, 128),
        amp_dtype=torch.bfloat16,
        warmup=3,
        iters=10,
    )


def small_setup() -> Setup:
    def build(dpr: float) -> VisionTransformer:
        return VisionTransformer(
            patch_size=16, embed_dim=96, depth=4, num_heads=3, qkv_bias=True, drop_path_rate=dpr
        )

    return Setup(
        name="vit(96d,4blk)/16",
        build_backbone=build,
        out_dim=1024,
        hidden_dim=256,
        bottleneck_dim=64,
        global_size=64,
        local_size=32,
        n_local=6,
        batches=(4,),
        amp_dtype=None,
        warmup=2,
        iters=5,
    )


def official_loop(model: DINOModel, global_crops: Tensor, local_crops: Tensor | None = None) -> Tensor:
    """The official MultiCropWrapper: one official-computation backbone call per resolution."""
    crops = [global_crops] if local_crops is None else [global_crops, local_crops]
    return model.head(torch.cat([model.backbone.forward_unpacked(c) for c in crops]))


def packed(model: DINOModel, global_crops: Tensor, local_crops: Tensor | None = None) -> Tensor:
    return model(global_crops, local_crops)


def build_model(setup: Setup, device: torch.device, *, drop_path_rate: float, backend: str) -> DINOModel:
    backbone = setup.build_backbone(drop_path_rate)
    backbone.set_attn_backend(backend)
    head = DINOHead(
        backbone.embed_dim, setup.out_dim, hidden_dim=setup.hidden_dim, bottleneck_dim=setup.bottleneck_dim
    )
    return DINOModel(backbone, head).to(device)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _student_step(
    model: DINOModel,
    forward: Callable[..., Tensor],
    g: Tensor,
    loc: Tensor,
    device: torch.device,
    amp: torch.dtype | None,
) -> Callable[[], None]:
    grad: list[Tensor] = []

    def step() -> None:
        model.zero_grad(set_to_none=True)  # as the training step does: gradients allocated anew
        with _autocast(device, amp):
            out = forward(model, g, loc)
        if not grad:
            grad.append(torch.randn_like(out))
        out.backward(grad[0])

    return step


def _teacher_step(
    model: DINOModel, forward: Callable[..., Tensor], g: Tensor, device: torch.device, amp: torch.dtype | None
) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad(), _autocast(device, amp):
            forward(model, g)

    return step


@dataclass(frozen=True)
class Impl:
    name: str
    attn_backend: str
    forward: Callable[..., Tensor]
    compiled: bool = False
    fused_norm: bool | None = None  # the packed path's add+LayerNorm kernel (None: on CUDA)


def _impls(device: torch.device, compile_: bool) -> list[Impl]:
    impls = [
        Impl("official-loop/explicit", "explicit", official_loop),
        Impl("official-loop/sdpa", "sdpa", official_loop),
        Impl("dino_fast/multicrop", "auto", packed),
    ]
    if device.type == "cuda":  # what each piece buys: no varlen, no fused add+LayerNorm
        impls.append(Impl("dino_fast/multicrop-per-group", "sdpa:flash", packed))
        impls.append(Impl("dino_fast/multicrop-unfused-norm", "auto", packed, fused_norm=False))
    if compile_:
        impls += [
            Impl("official-loop/sdpa+compile", "sdpa", official_loop, compiled=True),
            Impl("dino_fast/multicrop+compile", "auto", packed, compiled=True),
        ]
    return impls


def run(device: torch.device, *, full: bool, compile_: bool = False) -> list[dict[str, Any]]:
    """Rows ``{impl, shape, median_ms, peak_extra_mib, ...}`` for the student and the teacher."""
    device = torch.device(device)
    setup = full_setup() if full else small_setup()
    amp = setup.amp_dtype if device.type == "cuda" else None
    compute_dtype = amp or torch.float32
    probes = attention.prepare(device, compute_dtype)
    torch.manual_seed(0)
    student = build_model(setup, device, drop_path_rate=0.1, backend="auto").train()
    teacher = build_model(setup, device, drop_path_rate=0.0, backend="auto").eval()
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    rows: list[dict[str, Any]] = []
    for batch in setup.batches:
        gen = torch.Generator(device=device).manual_seed(batch)
        g = torch.randn(2 * batch, 3, setup.global_size, setup.global_size, device=device, generator=gen)
        loc = torch.randn(
            setup.n_local * batch, 3, setup.local_size, setup.local_size, device=device, generator=gen
        )
        shape = f"{setup.name} B={batch} 2x{setup.global_size}+{setup.n_local}x{setup.local_size}"
        for impl in _impls(device, compile_):
            for role, model in (("student fwd+bwd", student), ("teacher fwd", teacher)):
                model.backbone.set_attn_backend(impl.attn_backend)
                model.backbone.fused_norm = impl.fused_norm
                fwd = torch.compile(impl.forward, dynamic=False) if impl.compiled else impl.forward
                if role.startswith("student"):
                    step = _student_step(model, fwd, g, loc, device, amp)
                else:
                    step = _teacher_step(model, fwd, g, device, amp)
                try:
                    result = measure(step, device=device, warmup=setup.warmup, iters=setup.iters)
                except torch.OutOfMemoryError as err:
                    rows.append({"impl": f"{impl.name} [{role}]", "shape": shape, "error": f"OOM: {err}"})
                    continue
                finally:
                    student.zero_grad(set_to_none=True)
                rows.append(
                    {
                        "impl": f"{impl.name} [{role}]",
                        "shape": shape,
                        "role": role,
                        "batch": batch,
                        "attn_backend": impl.attn_backend,
                        "fused_norm": impl.fused_norm,
                        "dtype": str(compute_dtype).removeprefix("torch."),
                        "images_per_s": batch * 1e3 / result["median_ms"],
                        **result,
                    }
                )
        _add_ratios(rows, shape)
    for row in rows:
        row["attention_probes"] = probes
    return rows


def _add_ratios(rows: list[dict[str, Any]], shape: str) -> None:
    """Speedup of every row over the official explicit loop of the same role, in this run."""
    base = {
        r["role"]: r["median_ms"]
        for r in rows
        if r.get("shape") == shape and r.get("impl", "").startswith("official-loop/explicit")
    }
    for r in rows:
        if r.get("shape") == shape and "role" in r and r["role"] in base:
            r["speedup_vs_explicit"] = base[r["role"]] / r["median_ms"]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--full",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ViT-S/16 anchor shapes (default on CUDA)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="add torch.compile rows (minutes of compiling)"
    )
    parser.add_argument("--json", default=None, help="write rows and the environment here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    full = device.type == "cuda" if args.full is None else args.full
    rows = run(device, full=full, compile_=args.compile)
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<48} {r['shape']:<36} FAILED: {r['error']}")
            continue
        mem = f"{r['peak_extra_mib']:9.0f} MiB" if r["peak_extra_mib"] is not None else ""
        speedup = f"x{r['speedup_vs_explicit']:.2f}"
        print(f"{r['impl']:<48} {r['shape']:<36} {r['median_ms']:9.2f} ms {speedup:>6} {mem}")
    write_json(args.json, {"environment": environment(device), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
