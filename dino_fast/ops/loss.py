"""The fused DINO loss: the ``dino_fast::dino_loss_with_stats`` torch op and ``DINOLoss``, a drop-in for the
official module.

One op, three backends behind it (dino_fast.ops.backends): ``triton`` (dino_fast.kernels.dino_loss),
``native`` (csrc/dino_loss.cpp, ``torch.ops.dino_fast_native.dino_loss_fwd/bwd``) and ``torch``
(dino_fast.ops.reference). Every backend's forward returns the same four tensors,

    (loss, student_stats (ncrops*B, 2), teacher_stats (n_global*B, 2), teacher column sum (K,)),

where a row's statistics are (M, log Z): the max of its scaled logits (s / tau_s, or
(t - c) / tau_t) and the log-sum-exp of the logits minus M, so logsumexp = M + log Z (kept apart
so the backward's exponents keep full fp32 precision). Every backward rebuilds both softmaxes
from those statistics, so a backward may run on another backend than its forward, and DINOLoss
takes the center's column sum from the same pass over the teacher rows.

``DINOLoss(teacher_centering="sinkhorn_knopp")`` takes DINOv2's teacher targets instead: Sinkhorn-Knopp
(dino_fast.ops.sinkhorn) at the epoch's teacher temperature, with the same student side
(dino_fast.ops.target_loss); no center is used or updated.

The op is a ``torch.library.custom_op`` with a fake implementation and an autograd formula, so
``torch.compile(fullgraph=True)`` traces through it. The backend is resolved inside the op (at run
time), where the ``DINO_FAST_BACKEND`` variable is read as well.
"""

import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dino_fast.ops.backends import select_backend
from dino_fast.ops.reference import center_update, reference_dino_loss, reference_dino_loss_grad
from dino_fast.ops.sinkhorn import sinkhorn_knopp
from dino_fast.ops.target_loss import dino_loss_from_targets, validate_multicrop_shapes

__all__ = [
    "TEACHER_CENTERINGS",
    "DINOLoss",
    "dino_loss",
    "dino_loss_with_stats",
    "teacher_temp_schedule",
    "validate_inputs",
]

NATIVE_FORWARD_OP = "dino_loss_fwd"
NATIVE_BACKWARD_OP = "dino_loss_bwd"
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# How DINOLoss turns teacher outputs into targets: DINO v1's EMA center, or DINOv2's Sinkhorn-Knopp.
TEACHER_CENTERINGS = ("center", "sinkhorn_knopp")
SINKHORN_ITERATIONS = 3  # dinov2's sinkhorn_knopp_teacher default, which its train loop uses


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def validate_inputs(
    student_output: Tensor,
    teacher_output: Tensor,
    center: Tensor,
    *,
    ncrops: int,
    n_global: int,
    teacher_temp: float,
    student_temp: float,
) -> None:
    """Raise a ValueError/TypeError naming the problem and the fix; returns None when the inputs
    form a valid crop-major DINO batch."""
    validate_multicrop_shapes(student_output, teacher_output, ncrops=ncrops, n_global=n_global)
    if not isinstance(center, Tensor):
        raise TypeError(f"center must be a torch.Tensor of shape (1, K), got {type(center).__name__}")
    dim = student_output.shape[1]
    if center.numel() != dim or center.dim() > 2 or (center.dim() == 2 and center.shape[0] != 1):
        raise ValueError(f"center must have shape (1, K) or (K,) with K={dim}, got {tuple(center.shape)}")
    if student_output.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"student_output dtype {student_output.dtype} is not supported: use fp32/bf16/fp16/fp64"
        )
    if teacher_output.dtype != student_output.dtype:
        raise TypeError(
            f"student_output is {student_output.dtype} but teacher_output is {teacher_output.dtype}; "
            "cast one so both share a dtype"
        )
    if not center.is_floating_point():
        raise TypeError(f"center must be a floating-point tensor, got {center.dtype}")
    devices = {student_output.device, teacher_output.device, center.device}
    if len(devices) > 1:
        raise ValueError(
            f"student_output ({student_output.device}), teacher_output ({teacher_output.device}) and center "
            f"({center.device}) must be on one device; move them with .to(device)"
        )
    for name, temp in (("teacher_temp", teacher_temp), ("student_temp", student_temp)):
        if not (math.isfinite(temp) and temp > 0):
            raise ValueError(f"{name} must be a positive finite number, got {temp}")


# --- per-backend implementations -------------------------------------------------------------


class _Config(NamedTuple):
    ncrops: int
    n_global: int
    teacher_temp: float
    student_temp: float

    def kwargs(self) -> dict[str, Any]:
        return self._asdict()


def _row_statistics(logits: Tensor) -> Tensor:
    """(rows, 2): each row's max M and log Z = logsumexp(logits - M)."""
    row_max = logits.amax(dim=-1, keepdim=True)
    return torch.cat([row_max, torch.logsumexp(logits - row_max, dim=-1, keepdim=True)], dim=-1)


def _forward_torch(student: Tensor, teacher: Tensor, center: Tensor, cfg: _Config):
    loss = reference_dino_loss(student, teacher, center, **cfg.kwargs())
    acc = _accumulation_dtype(student.dtype)
    student_stats = _row_statistics(student.to(acc) / cfg.student_temp)
    teacher_stats = _row_statistics((teacher.to(acc) - center.to(acc).reshape(1, -1)) / cfg.teacher_temp)
    return loss.to(acc), student_stats, teacher_stats, teacher.to(acc).sum(dim=0)


def _backward_torch(grad_loss, student, teacher, center, student_stats, teacher_stats, cfg: _Config):
    # The spec's closed form; it needs no saved statistics.
    grad = reference_dino_loss_grad(student, teacher, center, **cfg.kwargs())
    return (grad * grad_loss.to(grad.dtype)).to(student.dtype)


def _forward_native(student: Tensor, teacher: Tensor, center: Tensor, cfg: _Config):
    return tuple(torch.ops.dino_fast_native.dino_loss_fwd(student, teacher, center, *cfg))


def _backward_native(grad_loss, student, teacher, center, student_stats, teacher_stats, cfg: _Config):
    return torch.ops.dino_fast_native.dino_loss_bwd(
        grad_loss, student, teacher, center, student_stats, teacher_stats, *cfg
    )


def _forward_triton(student: Tensor, teacher: Tensor, center: Tensor, cfg: _Config):
    from dino_fast.kernels import dino_loss as triton_dino_loss

    return triton_dino_loss.dino_loss_forward(student, teacher, center, **cfg.kwargs())


def _backward_triton(grad_loss, student, teacher, center, student_stats, teacher_stats, cfg: _Config):
    from dino_fast.kernels import dino_loss as triton_dino_loss

    return triton_dino_loss.dino_loss_backward(
        grad_loss, student, teacher, center, student_stats, teacher_stats, **cfg.kwargs()
    )


_FORWARD = {"torch": _forward_torch, "native": _forward_native, "triton": _forward_triton}
_BACKWARD = {"torch": _backward_torch, "native": _backward_native, "triton": _backward_triton}


# --- the torch ops ---------------------------------------------------------------------------


@torch.library.custom_op("dino_fast::dino_loss_with_stats", mutates_args=())
def _dino_loss_with_stats_op(
    student_output: Tensor,
    teacher_output: Tensor,
    center: Tensor,
    ncrops: int,
    n_global: int,
    teacher_temp: float,
    student_temp: float,
    backend: str | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    name = select_backend(backend, student_output.device, op="dino_loss", native_op=NATIVE_FORWARD_OP)
    cfg = _Config(ncrops, n_global, teacher_temp, student_temp)
    return _FORWARD[name](student_output, teacher_output, center, cfg)


@_dino_loss_with_stats_op.register_fake
def _dino_loss_with_stats_fake(student_output, teacher_output, center, *args):
    acc = _accumulation_dtype(student_output.dtype)
    return (
        student_output.new_empty((), dtype=acc),
        student_output.new_empty((student_output.shape[0], 2), dtype=acc),
        student_output.new_empty((teacher_output.shape[0], 2), dtype=acc),
        student_output.new_empty((student_output.shape[1],), dtype=acc),
    )


@torch.library.custom_op("dino_fast::dino_loss_backward", mutates_args=())
def _dino_loss_backward_op(
    grad_loss: Tensor,
    student_output: Tensor,
    teacher_output: Tensor,
    center: Tensor,
    student_stats: Tensor,
    teacher_stats: Tensor,
    ncrops: int,
    n_global: int,
    teacher_temp: float,
    student_temp: float,
    backend: str | None,
) -> Tensor:
    name = select_backend(backend, student_output.device, op="dino_loss", native_op=NATIVE_BACKWARD_OP)
    cfg = _Config(ncrops, n_global, teacher_temp, student_temp)
    stats = (student_stats, teacher_stats)
    return _BACKWARD[name](grad_loss, student_output, teacher_output, center, *stats, cfg)


@_dino_loss_backward_op.register_fake
def _dino_loss_backward_fake(grad_loss, student_output, *args):
    return torch.empty_like(student_output, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    student_output, teacher_output, center, ncrops, n_global, teacher_temp, student_temp, backend = inputs
    _, student_stats, teacher_stats, colsum = output
    ctx.save_for_backward(student_output, teacher_output, center, student_stats, teacher_stats)
    ctx.config = (ncrops, n_global, teacher_temp, student_temp, backend)
    ctx.mark_non_differentiable(student_stats, teacher_stats, colsum)


def _backward(ctx, grad_loss, *_unused_grads):
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _dino_loss_backward_op(grad_loss, *ctx.saved_tensors, *ctx.config)
    return grad, None, None, None, None, None, None, None


_dino_loss_with_stats_op.register_autograd(_backward, setup_context=_setup_context)


def dino_loss_with_stats(
    student_output: Tensor,
    teacher_output: Tensor,
    center: Tensor,
    *,
    ncrops: int,
    teacher_temp: float,
    student_temp: float = 0.1,
    n_global: int = 2,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dino_loss`` that also returns (student_stats (ncrops*B, 2), teacher_stats (n_global*B, 2),
    teacher column sum (K,)); a row's statistics are (M, log Z), its logsumexp is M + log Z."""
    validate_inputs(
        student_output,
        teacher_output,
        center,
        ncrops=ncrops,
        n_global=n_global,
        teacher_temp=teacher_temp,
        student_temp=student_temp,
    )
    return _dino_loss_with_stats_op(
        student_output,
        teacher_output,
        center,
        ncrops,
        n_global,
        float(teacher_temp),
        float(student_temp),
        backend,
    )


def dino_loss(
    student_output: Tensor,
    teacher_output: Tensor,
    center: Tensor,
    *,
    ncrops: int,
    teacher_temp: float,
    student_temp: float = 0.1,
    n_global: int = 2,
    backend: str | None = None,
) -> Tensor:
    """DINO cross-entropy between the centered, sharpened teacher and the student views.

    ``student_output`` is crop-major ``(ncrops * B, K)``, ``teacher_output`` ``(n_global * B, K)``
    (teacher view t is student view t and the two are not paired), ``center`` ``(1, K)``. Returns a
    0-dim fp32 loss (fp64 for fp64 inputs), differentiable in ``student_output`` only; the gradient has
    the student's dtype. ``backend``: "triton", "native" or "torch"; None takes ``DINO_FAST_BACKEND``
    when set, else the fastest backend available for the tensors' device.
    """
    return dino_loss_with_stats(
        student_output,
        teacher_output,
        center,
        ncrops=ncrops,
        teacher_temp=teacher_temp,
        student_temp=student_temp,
        n_global=n_global,
        backend=backend,
    )[0]


# --- the module ------------------------------------------------------------------------------


def teacher_temp_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int, nepochs: int
) -> np.ndarray:
    """Per-epoch teacher temperature, exactly the official DINOLoss ``teacher_temp_schedule``: a linear
    warmup, since a high temperature early makes training unstable, then constant."""
    if not 0 <= warmup_teacher_temp_epochs <= nepochs:
        raise ValueError(
            f"warmup_teacher_temp_epochs must be in [0, nepochs={nepochs}] (got {warmup_teacher_temp_epochs})"
        )
    return np.concatenate(
        (
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        )
    )


class DINOLoss(nn.Module):
    """Drop-in for the official ``DINOLoss``: same constructor, ``forward(student_output,
    teacher_output, epoch)``, ``center`` buffer and state dict, with the fused op inside.

    The center update takes the teacher column sum from the loss's own pass. With torch.distributed
    initialized, its all-reduce is started asynchronously at the end of ``forward`` and waited on
    only when the center is next needed: the next forward, reading ``self.center``, ``state_dict``,
    ``load_state_dict``, ``buffers()`` or moving the module. As in the official code the updated
    center is a new tensor (the one the current loss saved for its backward is left untouched).

    ``teacher_centering="sinkhorn_knopp"`` (DINOv2) replaces the centered softmax with Sinkhorn-Knopp
    targets over all teacher rows (sums all-reduced across ranks); the center buffer stays in the
    state dict, neither read nor updated, so checkpoints keep one format.
    """

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        *,
        backend: str | None = None,
        teacher_centering: str = "center",
    ) -> None:
        super().__init__()
        if teacher_centering not in TEACHER_CENTERINGS:
            raise ValueError(
                f"teacher_centering={teacher_centering!r}: use 'center' (DINO v1's EMA center) or "
                "'sinkhorn_knopp' (DINOv2's Sinkhorn-Knopp targets)"
            )
        self.teacher_centering = teacher_centering
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.backend = backend
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )
        self._pending_center = None  # (all-reduce work or None, column sum (1, K), total teacher rows)
        self.register_state_dict_pre_hook(lambda module, *args, **kwargs: module.wait_center_update())
        self._register_load_state_dict_pre_hook(
            lambda module, *args, **kwargs: module.wait_center_update(), with_module=True
        )

    def __getattr__(self, name: str):
        if name == "center":
            self.wait_center_update()
        return super().__getattr__(name)

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int) -> Tensor:
        teacher_temp = float(self.teacher_temp_schedule[epoch])
        if self.teacher_centering == "sinkhorn_knopp":
            return self._sinkhorn_knopp_loss(student_output, teacher_output, teacher_temp)
        loss, _, _, colsum = dino_loss_with_stats(
            student_output,
            teacher_output,
            self.center,
            ncrops=self.ncrops,
            teacher_temp=teacher_temp,
            student_temp=self.student_temp,
            n_global=2,
            backend=self.backend,
        )
        self.update_center(colsum, teacher_output.shape[0])
        return loss

    def _sinkhorn_knopp_loss(
        self, student_output: Tensor, teacher_output: Tensor, teacher_temp: float
    ) -> Tensor:
        # As dinov2's train loop: one assignment over both global views' rows, then the pairs.
        validate_inputs(
            student_output,
            teacher_output,
            self._buffers["center"],
            ncrops=self.ncrops,
            n_global=2,
            teacher_temp=teacher_temp,
            student_temp=self.student_temp,
        )
        targets = sinkhorn_knopp(
            teacher_output, teacher_temp, n_iterations=SINKHORN_ITERATIONS, backend=self.backend
        )
        return dino_loss_from_targets(
            student_output, targets, ncrops=self.ncrops, student_temp=self.student_temp, backend=self.backend
        )

    @torch.no_grad()
    def update_center(self, teacher_column_sum: Tensor, teacher_rows: int) -> None:
        """Start the center update from this process's teacher column sum (K,) over ``teacher_rows``
        rows: all-reduced asynchronously across ranks when torch.distributed is initialized."""
        self.wait_center_update()
        column_sum = teacher_column_sum.detach().reshape(1, -1)
        work, world = None, 1
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            work = dist.all_reduce(column_sum, async_op=True)
        self._pending_center = (work, column_sum, teacher_rows * world)
        if work is None:
            self.wait_center_update()

    def wait_center_update(self) -> None:
        """Finish a pending center update (waits for its all-reduce); a no-op when none is pending."""
        pending = self.__dict__.get("_pending_center")
        if pending is None:
            return
        self._pending_center = None
        work, column_sum, total_rows = pending
        if work is not None:
            work.wait()
        center = self._buffers["center"]
        batch_center = column_sum / total_rows
        self._buffers["center"] = center_update(center, batch_center, self.center_momentum)

    def __getstate__(self):
        # A pending all-reduce handle cannot be pickled (torch.save(module), copy.deepcopy).
        self.wait_center_update()
        return super().__getstate__()

    def named_buffers(self, *args, **kwargs):
        self.wait_center_update()
        return super().named_buffers(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self.wait_center_update()
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"out_dim={self._buffers['center'].shape[1]}, ncrops={self.ncrops}, "
            f"student_temp={self.student_temp}, center_momentum={self.center_momentum}, "
            f"backend={self.backend!r}, teacher_centering={self.teacher_centering!r}"
        )
