"""Teacher EMA benchmark: the official per-parameter loop, torch._foreach_lerp_, one flat lerp_, and
every available dino_fast backend, on the same parameter lists in the same run.

    python benchmarks/kernels.py --suites ema --device cuda          # ViT-S/16 + DINO head, 44.0M params
    python benchmarks/kernels.py --suites ema --device cpu           # small set, seconds
    python benchmarks/kernels.py --suites ema --device cpu --full    # the anchor set on CPU

``run(device, *, full)`` returns one row per implementation: impl, shape, median_ms (p10/p90),
peak_extra_mib (CUDA), gbps (bytes that must move: read teacher + student, write teacher) and
vs_foreach, the speed ratio to torch._foreach_lerp_ measured in the same run.

dino_fast rows: "list" calls ``ema_update_`` on the parameter lists every step (what a codebase
that keeps its own lists gets, Python checks of every pair included); "flat kernel" runs the op on
the two flat tensors of the "flat lerp_" row; "TeacherEMA flat" packs teacher and student
(flat=True, pack_student=True: one streaming kernel, plus update()'s own checks); "TeacherEMA flat
teacher" packs only the teacher (multi-tensor kernel over the student's own tensors). Triton is
timed on CUDA only: on a CPU it would run under its interpreter. Every timed call is synchronized,
so host-side overhead counts in these numbers (a training step that does not sync hides it).
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks.timing import measure
from dino_fast.official import vision_transformer as official
from dino_fast.official.training import update_teacher as official_ema
from dino_fast.ops.backends import available_backends
from dino_fast.ops.ema import TeacherEMA, ema_update_

MOMENTUM = 0.996  # the start of DINO's cosine momentum schedule


def vit_dino_shapes(
    *,
    dim: int = 384,
    depth: int = 12,
    img_size: int = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    mlp_ratio: int = 4,
    out_dim: int = 65536,
    hidden_dim: int = 2048,
    bottleneck_dim: int = 256,
) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of the official DINO ViT (qkv_bias=True) + DINOHead, in
    registration order, read from the official model built on the meta device. Defaults: ViT-S/16,
    K = 65536: 158 tensors, 44,017,792 parameters."""
    with torch.device("meta"):
        backbone = official.VisionTransformer(
            img_size=[img_size],
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=dim,
            depth=depth,
            num_heads=1,  # the shapes do not depend on it
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
        )
        head = official.DINOHead(dim, out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim)
        model = official.MultiCropWrapper(backbone, head)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


FULL_CONFIG: dict[str, int] = {}  # the defaults: ViT-S/16 + DINO head
SMALL_CONFIG = {
    "dim": 96,
    "depth": 4,
    "img_size": 64,
    "out_dim": 4096,
    "hidden_dim": 512,
    "bottleneck_dim": 64,
}


class ParameterSet(nn.Module):
    """A module that only holds parameters of the given names and shapes (dots become '__')."""

    def __init__(
        self, shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, device: torch.device, seed: int
    ):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        for name, shape in shapes:
            value = torch.randn(shape, generator=generator, dtype=torch.float32).to(
                device=device, dtype=dtype
            )
            self.register_parameter(name.replace(".", "__"), nn.Parameter(value, requires_grad=False))


def _bytes_moved(teachers: list[Tensor], students: list[Tensor]) -> int:
    return sum(
        t.numel() * (2 * t.element_size() + s.element_size()) for t, s in zip(teachers, students, strict=True)
    )


def run(
    device: torch.device,
    *,
    full: bool,
    warmup: int = 5,
    iters: int = 30,
    rounds: int | None = None,
    config: dict[str, int] | None = None,
) -> list[dict]:
    """Rows for every implementation. ``rounds`` (default: 1 on CUDA, 3 on CPU) splits the timed
    iterations into round-robin passes over all implementations and reports the median of the
    per-pass medians: on a shared CPU the load drifts, and ratios only mean something when the
    implementations compared were timed in the same stretch of time."""
    config = dict(FULL_CONFIG if full else SMALL_CONFIG) if config is None else config
    rounds = (1 if device.type == "cuda" else 3) if rounds is None else rounds
    shapes = vit_dino_shapes(**config)
    dtype = torch.float32
    teacher_module = ParameterSet(shapes, dtype, device, seed=0)
    student_module = ParameterSet(shapes, dtype, device, seed=1)
    teachers, students = list(teacher_module.parameters()), list(student_module.parameters())
    n_params = sum(t.numel() for t in teachers)
    shape = f"{len(shapes)} tensors, {n_params / 1e6:.1f}M fp32"
    moved = _bytes_moved(teachers, students)
    m = MOMENTUM
    flat_t = torch.cat([t.detach().reshape(-1) for t in teachers])
    flat_s = torch.cat([s.detach().reshape(-1) for s in students])

    cases: list[tuple[str, Callable[[], object]]] = [
        ("official per-parameter loop", lambda: official_ema(students, teachers, m)),
        ("torch._foreach_lerp_", lambda: torch._foreach_lerp_(teachers, students, 1 - m)),
        ("flat lerp_ (one tensor)", lambda: flat_t.lerp_(flat_s, 1 - m)),
    ]
    usable = [name for name, reason in available_backends(device).items() if reason is None]
    if device.type != "cuda":
        usable = [name for name in usable if name != "triton"]  # interpreter timings mean nothing
    for backend in usable:
        cases.append(
            (f"dino_fast {backend} list", lambda b=backend: ema_update_(teachers, students, m, backend=b))
        )
        cases.append(
            (
                f"dino_fast {backend} flat kernel",
                lambda b=backend: ema_update_([flat_t], [flat_s], m, backend=b),
            )
        )
        for pack_student, label in ((True, "flat"), (False, "flat teacher")):
            t_mod = ParameterSet(shapes, dtype, device, seed=0)
            s_mod = ParameterSet(shapes, dtype, device, seed=1)
            ema = TeacherEMA(t_mod, s_mod, flat=True, pack_student=pack_student, backend=backend)
            cases.append((f"TeacherEMA {backend} {label}", lambda e=ema: e.update(m)))

    per_round = max(1, iters // rounds)
    stats_by_impl: dict[str, list[dict]] = {impl: [] for impl, _ in cases}
    for _ in range(rounds):
        for impl, fn in cases:
            stats_by_impl[impl].append(measure(fn, device=device, warmup=warmup, iters=per_round))
    rows = []
    for impl, runs in stats_by_impl.items():
        median_ms = statistics.median(run["median_ms"] for run in runs)
        peaks = [run["peak_extra_mib"] for run in runs if run["peak_extra_mib"] is not None]
        rows.append(
            {
                "impl": impl,
                "shape": shape,
                "n_tensors": len(shapes),
                "n_params": n_params,
                "median_ms": median_ms,
                "p10_ms": min(run["p10_ms"] for run in runs),
                "p90_ms": max(run["p90_ms"] for run in runs),
                "peak_extra_mib": max(peaks) if peaks else None,
                "iters": per_round * rounds,
                "rounds": rounds,
                "gbps": moved / (median_ms * 1e6),
            }
        )
    foreach_ms = next(row["median_ms"] for row in rows if row["impl"] == "torch._foreach_lerp_")
    for row in rows:
        row["vs_foreach"] = foreach_ms / row["median_ms"]
    gc.collect()
    return rows
