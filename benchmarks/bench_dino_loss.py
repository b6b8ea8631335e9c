"""DINO loss benchmark: forward + backward (+ the center update) of the official formulation, eager
and under torch.compile, and of every available dino_fast backend, on the same inputs in one run.

    python benchmarks/kernels.py --suites dino_loss --device cuda   # bf16, K=65536, 12 crops, B=64/128
    python benchmarks/kernels.py --suites dino_loss --device cpu    # B=16, 12 crops, K=16384, fp32
    python benchmarks/kernels.py --suites dino_loss --device cpu --full

``run(device, *, full)`` returns one row per (shape, implementation): impl, shape, median_ms
(p10/p90), peak_extra_mib (CUDA: everything the step allocates, the gradient included),
beyond_grad_mib (the same minus the gradient tensor: the issue's memory target), gbps (the bytes
that must move, over the median time: student + teacher read by the forward, student + teacher
read and the gradient written by the backward) and vs_official, the speed ratio to the official
eager formulation measured in the same run. A failed implementation (torch.compile of the
official loss, say) is a row with an ``error``, never dropped. Triton is timed on CUDA only: on a
CPU it would run under its interpreter.
"""

from __future__ import annotations

import gc
import logging
import traceback
from collections.abc import Callable

import torch
from torch import Tensor

from benchmarks.timing import measure
from dino_fast.official import loss as official
from dino_fast.ops.backends import available_backends
from dino_fast.ops.loss import dino_loss_with_stats

logger = logging.getLogger(__name__)

TEMPERATURES = {"teacher_temp": 0.04, "student_temp": 0.1}
CENTER_MOMENTUM = 0.9


def official_loss_and_center(
    student_output: Tensor, teacher_output: Tensor, center: Tensor, ncrops: int
) -> tuple[Tensor, Tensor]:
    """The official DINOLoss.forward: the loss, then the center update (one process)."""
    loss = official.dino_loss(student_output, teacher_output, center, ncrops=ncrops, **TEMPERATURES)
    return loss, official.update_center(center, teacher_output, CENTER_MOMENTUM)


def fused_loss_and_center(backend: str) -> Callable[[Tensor, Tensor, Tensor, int], tuple[Tensor, Tensor]]:
    """dino_fast's op on one backend; the center update takes the column sum from the same pass."""

    def step(student_output: Tensor, teacher_output: Tensor, center: Tensor, ncrops: int):
        loss, _, _, colsum = dino_loss_with_stats(
            student_output, teacher_output, center, ncrops=ncrops, backend=backend, **TEMPERATURES
        )
        batch_center = colsum.reshape(1, -1) / teacher_output.shape[0]
        return loss, center * CENTER_MOMENTUM + batch_center * (1 - CENTER_MOMENTUM)

    return step


def shapes(device: torch.device, full: bool) -> list[tuple[int, int, int, torch.dtype]]:
    """(B, ncrops, K, dtype) per case."""
    if device.type == "cuda":
        if full:
            bf16, fp32 = torch.bfloat16, torch.float32
            return [(64, 12, 65536, bf16), (128, 12, 65536, bf16), (64, 12, 65536, fp32)]
        return [(32, 12, 65536, torch.bfloat16)]
    # The CPU target shape first; --full adds the head width in bf16.
    return [(16, 12, 16384, torch.float32)] + ([(16, 12, 65536, torch.bfloat16)] if full else [])


def minimal_bytes(batch: int, ncrops: int, dim: int, dtype: torch.dtype) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    student, teacher = ncrops * batch * dim * item, 2 * batch * dim * item
    return 2 * (student + teacher) + student


def time_one(
    impl: Callable, student: Tensor, teacher: Tensor, center: Tensor, ncrops: int, device: torch.device
) -> dict:
    def fwd_bwd() -> None:
        loss, new_center = impl(student, teacher, center, ncrops)
        # The gradient is returned and dropped, so peak memory counts it once and the baseline never.
        torch.autograd.grad(loss, student)
        del new_center

    iters, warmup = (30, 5) if device.type == "cuda" else (8, 2)
    return measure(fwd_bwd, device=device, warmup=warmup, iters=iters)


def run(device: torch.device, *, full: bool) -> list[dict]:
    rows: list[dict] = []
    backends = available_backends(device)
    impls: list[tuple[str, Callable]] = [
        ("official eager", official_loss_and_center),
        ("official torch.compile", torch.compile(official_loss_and_center)),
    ]
    for name in ("triton", "native", "torch"):
        reason = backends[name]
        if name == "triton" and device.type != "cuda":
            reason = reason or "on a CPU Triton runs only under its interpreter; not timed"
        if reason is None:
            impls.append((f"dino_fast {name}", fused_loss_and_center(name)))
        else:
            logger.info("dino_loss benchmark: backend %s skipped: %s", name, reason)

    for batch, ncrops, dim, dtype in shapes(device, full):
        shape = f"B={batch} crops={ncrops} K={dim} {str(dtype).removeprefix('torch.')}"
        gen = torch.Generator(device=device).manual_seed(0)
        student = (torch.randn(ncrops * batch, dim, device=device, generator=gen) * 3).to(dtype)
        student.requires_grad_(True)
        teacher = (torch.randn(2 * batch, dim, device=device, generator=gen) * 3).to(dtype)
        center = torch.randn(1, dim, device=device, generator=gen) * 0.1
        grad_mib = student.numel() * student.element_size() / 2**20
        traffic = minimal_bytes(batch, ncrops, dim, dtype)
        official_ms = None
        for name, impl in impls:
            row: dict = {"impl": name, "shape": shape}
            try:
                row |= time_one(impl, student, teacher, center, ncrops, device)
            except Exception as err:  # a failing implementation is a result, e.g. inductor on some drivers
                traceback.print_exc()
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                rows.append(row)
                continue
            row["gbps"] = traffic / (row["median_ms"] * 1e-3) / 1e9
            if row["peak_extra_mib"] is not None:
                row["beyond_grad_mib"] = row["peak_extra_mib"] - grad_mib
            if name == "official eager":
                official_ms = row["median_ms"]
            row["vs_official"] = official_ms / row["median_ms"] if official_ms else None
            rows.append(row)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del student, teacher, center
    return rows
