"""Teacher EMA at flat-buffer speed: ``teacher <- m * teacher + (1 - m) * student``.

Two entry points:

- ``ema_update_(teacher_params, student_params, momentum, *, backend=None)``: the fused op on any two
  parameter lists (also re-exported as ``dino_fast.ops.ema_update_``).
- ``TeacherEMA(teacher, student, *, flat=False, pack_student=False, backend=None)``: pairs the two
  models' parameters by name once, optionally packs them into flat buffers, and ``update(momentum)``
  then runs the prepared update every step.

``momentum`` is a Python float or a one-element floating tensor. A tensor on the parameters' device
is read by the kernels on the device: no host sync, and a captured CUDA graph picks up new values.
The update runs in fp32 (fp64 for fp64 teachers) and rounds once to the teacher's dtype, exactly
like ``reference_ema_update_`` (dino_fast.ops.reference); teacher and student dtypes may differ
(e.g. a bf16 teacher of an fp32 student).

Backends (``dino_fast.ops.backends``): "triton" (one launch per dtype group, block table built once per
list), "native" (dino_fast._C: one OpenMP region on CPU; apex-style multi-tensor launches on CUDA)
and "torch" (``torch._foreach_lerp_`` where teacher and student share a dtype and the momentum is a
host value, ``reference_ema_update_`` otherwise). Non-contiguous pairs, which the fused kernels
cannot stream, always go through the reference implementation.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from dino_fast.ops.backends import select_backend
from dino_fast.ops.reference import reference_ema_update_

__all__ = ["NATIVE_OP", "TeacherEMA", "ema_update_"]

NATIVE_OP = "ema_update_"  # torch.ops.dino_fast_native.ema_update_ (csrc/ema.cpp, csrc/ema_cuda.cu)
PACK_ALIGN_BYTES = 64  # every packed parameter starts on a cache line, in both buffers
STORAGE_CHECK_WINDOW = 32  # parameters whose storage TeacherEMA.update re-checks per call, besides first/last

logger = logging.getLogger(__name__)
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _triton_kernels():
    from dino_fast.kernels import ema as triton_ema  # imported on first use: triton is optional

    return triton_ema


def _check_momentum(momentum: float | Tensor, device: torch.device) -> float | Tensor:
    """The momentum as the backends take it: a Python float or a one-element floating tensor."""
    if isinstance(momentum, Tensor):
        if momentum.numel() != 1 or not momentum.is_floating_point():
            raise ValueError(
                f"ema_update_: a tensor momentum must be a floating tensor with one element, got dtype "
                f"{momentum.dtype} and shape {tuple(momentum.shape)}"
            )
        if momentum.device != device and momentum.device.type != "cpu":
            raise ValueError(
                f"ema_update_: the momentum tensor is on {momentum.device} but the parameters are on "
                f"{device}; keep it on the parameters' device (or on the CPU)"
            )
        return momentum.detach()
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(
            f"ema_update_: momentum must be a float or a one-element tensor, got {type(momentum).__name__}"
        )
    return float(momentum)


def _check_pairs(teachers: Sequence[Tensor], students: Sequence[Tensor], names: Sequence[str] | None = None):
    if len(teachers) != len(students):
        raise ValueError(
            f"ema_update_: got {len(teachers)} teacher tensors but {len(students)} student tensors; "
            "pass the two parameter lists in matching order"
        )
    if not teachers:
        return
    device = teachers[0].device
    for index, (teacher, student) in enumerate(zip(teachers, students, strict=True)):
        what = f"parameter {names[index]!r}" if names is not None else f"pair {index}"
        for role, tensor in (("teacher", teacher), ("student", student)):
            if not isinstance(tensor, Tensor):
                raise TypeError(f"ema_update_: {what}: {role} is a {type(tensor).__name__}, not a tensor")
            if tensor.dtype not in _FLOAT_DTYPES:
                raise TypeError(
                    f"ema_update_: {what}: {role} dtype {tensor.dtype} is not supported; "
                    "use float32, float64, float16 or bfloat16"
                )
            if tensor.device != device:
                raise ValueError(
                    f"ema_update_: {what}: {role} is on {tensor.device} but the first teacher tensor is on "
                    f"{device}; move both models to one device"
                )
        if teacher.shape != student.shape:
            raise ValueError(
                f"ema_update_: {what}: teacher shape {tuple(teacher.shape)} differs from student shape "
                f"{tuple(student.shape)}"
            )


def _torch_update_(teachers: list[Tensor], students: list[Tensor], momentum: float | Tensor) -> None:
    """The "torch" backend: _foreach_lerp_ where it computes what the reference computes, else the
    reference. lerp with weight w = 1 - m evaluates in the same compute dtype with one rounding to
    the storage dtype; it keeps t exactly at m = 1 and returns s exactly at m = 0 (torch switches
    to s - (s - t) * (1 - w) for w >= 0.5), and differs from t*m + s*(1 - m) by at most an fp32
    rounding step elsewhere."""
    if isinstance(momentum, Tensor) and momentum.device.type != "cpu":
        # A device momentum must stay on the device (no sync, graph-capturable): lerp's scalar
        # weight would need it on the host, so the reference's tensor arithmetic runs instead.
        reference_ema_update_(teachers, students, momentum)
        return
    by_dtype: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
    mixed_t, mixed_s = [], []
    for teacher, student in zip(teachers, students, strict=True):
        if teacher.dtype == student.dtype:
            group = by_dtype.setdefault(teacher.dtype, ([], []))
            group[0].append(teacher)
            group[1].append(student)
        else:
            mixed_t.append(teacher)
            mixed_s.append(student)
    for dtype, (group_t, group_s) in by_dtype.items():
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        # For a tensor m the reference evaluates 1 - m in the compute dtype; so does this.
        weight = float(1 - momentum.to(compute)) if isinstance(momentum, Tensor) else 1.0 - momentum
        torch._foreach_lerp_(group_t, group_s, weight)
    if mixed_t:
        reference_ema_update_(mixed_t, mixed_s, momentum)


def _run(
    backend: str,
    teachers: list[Tensor],
    students: list[Tensor],
    momentum: float | Tensor,
    triton_plan=None,
) -> None:
    """Checked, contiguous pairs on one device through ``backend``."""
    if backend == "native":
        tensor = momentum if isinstance(momentum, Tensor) else None
        value = 0.0 if tensor is not None else momentum
        torch.ops.dino_fast_native.ema_update_(teachers, students, tensor, value)
    elif backend == "triton":
        if triton_plan is not None:
            triton_plan(momentum)
        elif len(teachers) == 1:  # a flat buffer (or any single pair): the plain streaming kernel
            _triton_kernels().ema_update_flat_(teachers[0], students[0], momentum)
        else:
            _triton_kernels().ema_update_(teachers, students, momentum)
    elif backend == "torch":
        _torch_update_(teachers, students, momentum)
    else:
        raise ValueError(f"unknown backend {backend!r}")


def _split_contiguous(teachers: list[Tensor], students: list[Tensor]):
    """(fused teachers, fused students, fallback teachers, fallback students)."""
    if all(map(Tensor.is_contiguous, teachers)) and all(map(Tensor.is_contiguous, students)):
        return teachers, students, [], []
    fused_t, fused_s, slow_t, slow_s = [], [], [], []
    for teacher, student in zip(teachers, students, strict=True):
        if teacher.is_contiguous() and student.is_contiguous():
            fused_t.append(teacher)
            fused_s.append(student)
        else:
            slow_t.append(teacher)
            slow_s.append(student)
    return fused_t, fused_s, slow_t, slow_s


@torch.no_grad()
def ema_update_(
    teacher_params: Iterable[Tensor],
    student_params: Iterable[Tensor],
    momentum: float | Tensor,
    *,
    backend: str | None = None,
) -> None:
    """teacher <- m * teacher + (1 - m) * student for every pair, in place, without host syncs.

    ``teacher_params`` and ``student_params`` are matching sequences (or iterators, such as
    ``model.parameters()``) of tensors of equal shapes on one device. ``backend`` is "triton",
    "native", "torch" or None (the fastest available; ``DINO_FAST_BACKEND`` overrides).

    The triton backend caches its block table per list (by addresses, sizes and dtypes), so calling
    this every step with the same parameters costs one table lookup; for a CUDA graph, build a
    ``TeacherEMA`` (which owns its table) and capture ``TeacherEMA.update``.
    """
    teachers, students = list(teacher_params), list(student_params)
    _check_pairs(teachers, students)
    if not teachers:
        return
    device = teachers[0].device
    momentum = _check_momentum(momentum, device)
    name = select_backend(backend, device, op="ema_update_", native_op=NATIVE_OP)
    fused_t, fused_s, slow_t, slow_s = _split_contiguous(teachers, students)
    if fused_t:
        _run(name, fused_t, fused_s, momentum)
    if slow_t:
        reference_ema_update_(slow_t, slow_s, momentum)


# ---------------------------------------------------------------------------------------------------
# TeacherEMA
# ---------------------------------------------------------------------------------------------------


def _unwrap(module: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            module = module._orig_mod
        else:
            return module


def _strip_wrapper_prefixes(name: str) -> str:
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name


def _named_parameters(module: nn.Module, role: str) -> dict[str, nn.Parameter]:
    named: dict[str, nn.Parameter] = {}
    for raw_name, param in module.named_parameters():
        name = _strip_wrapper_prefixes(raw_name)
        if name in named:
            raise ValueError(
                f"TeacherEMA: the {role} has two parameters named {name!r} once wrapper prefixes "
                "('module.', '_orig_mod.') are stripped; pass the unwrapped model"
            )
        named[name] = param
    return named


def _match_parameters(teacher: nn.Module, student: nn.Module) -> tuple[list[str], list, list]:
    teacher_named = _named_parameters(teacher, "teacher")
    student_named = _named_parameters(student, "student")
    missing = [name for name in teacher_named if name not in student_named]
    extra = [name for name in student_named if name not in teacher_named]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"teacher parameters without a student counterpart: {missing[:5]}")
        if extra:
            parts.append(f"student parameters without a teacher counterpart: {extra[:5]}")
        raise ValueError(
            "TeacherEMA: teacher and student parameters must match by name; "
            + "; ".join(parts)
            + " (pass two modules of the same architecture, e.g. the two backbones and heads)"
        )
    names = list(teacher_named)
    teachers = [teacher_named[name] for name in names]
    students = [student_named[name] for name in names]
    for name, t, s in zip(names, teachers, students, strict=True):
        if t.shape != s.shape:
            raise ValueError(
                f"TeacherEMA: parameter {name!r} has shape {tuple(t.shape)} in the teacher but "
                f"{tuple(s.shape)} in the student"
            )
        if t is s or (t.data_ptr() == s.data_ptr() and t.numel() > 0):
            raise ValueError(
                f"TeacherEMA: parameter {name!r} is shared by teacher and student; the teacher must be a "
                "separate copy (e.g. copy.deepcopy(student) before wrapping it)"
            )
    _check_pairs(teachers, students, names)
    return names, teachers, students


def _addresses(tensors: Sequence[Tensor]) -> tuple[int, ...]:
    return tuple(map(Tensor.data_ptr, tensors))


class TeacherEMA:
    """Momentum teacher: ``update(m)`` does ``teacher <- m * teacher + (1 - m) * student`` for every
    parameter, paired by name.

    Args:
        teacher: the teacher model (may be wrapped in DDP / DataParallel / torch.compile).
        student: the student model, likewise; a DDP-wrapped student is unwrapped ("module." goes).
        flat: pack the teacher's parameters into one contiguous buffer per (teacher dtype, student
            dtype) pair; each parameter becomes a view into it (its ``.data`` is replaced, the
            Parameter object stays the same, values are copied).
        pack_student: with ``flat``, pack the student's parameters the same way, so that the update
            is one streaming kernel per buffer (about one memory pass at copy bandwidth).
            Call this BEFORE building the student's optimizer and BEFORE wrapping the student in
            DistributedDataParallel: DDP records its parameters' storage when it is built, and an
            optimizer state created earlier would keep pointing at the old storage. A student that
            is already DDP-wrapped is refused; an existing optimizer cannot be detected.
        backend: "triton", "native", "torch" or None (fastest available for the device).

    Packing rules: parameters keep their shapes and values but become contiguous views; the
    checkpoint format (``state_dict``) is unchanged. Build the TeacherEMA after moving and casting
    both models: ``.to()``, ``.half()`` or ``load_state_dict(assign=True)`` on a packed model
    replaces the storage of its parameters, which ``update`` detects and refuses (at once for
    whole-model moves; a single parameter's ``.data`` swapped by hand is found within a few calls,
    see ``_check_storage``). Replacing a Parameter object itself (``module.weight =
    nn.Parameter(...)``) after construction is not detected; build a new TeacherEMA then.

    With a momentum tensor on the device, ``update`` performs no host sync and can be captured in a
    CUDA graph (after one eager call, as for any capture).
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        flat: bool = False,
        pack_student: bool = False,
        backend: str | None = None,
    ) -> None:
        if pack_student and not flat:
            raise ValueError(
                "TeacherEMA: pack_student=True needs flat=True (the student is packed like the teacher)"
            )
        teacher_module, student_module = _unwrap(teacher), _unwrap(student)
        if pack_student and student_module is not student:
            raise RuntimeError(
                f"TeacherEMA(pack_student=True) got a wrapped student ({type(student).__name__}); packing "
                "replaces the storage of its parameters, which DistributedDataParallel has already recorded. "
                "Build TeacherEMA(teacher, student, flat=True, pack_student=True) first, then the optimizer, "
                "then DDP"
            )
        self.names, teacher_params, student_params = _match_parameters(teacher_module, student_module)
        if not self.names:
            raise ValueError("TeacherEMA: the teacher has no parameters")
        self.device = teacher_params[0].device
        self.backend = select_backend(backend, self.device, op="TeacherEMA.update", native_op=NATIVE_OP)
        self.flat = flat
        self.pack_student = pack_student
        self.teacher_params: list[nn.Parameter] = teacher_params
        self.student_params: list[nn.Parameter] = student_params
        # (teacher buffer, student buffer or None) per (teacher dtype, student dtype) group.
        self.buffers: list[tuple[Tensor, Tensor | None]] = []
        if flat:
            self._pack()
        self._prepare()
        logger.debug(
            "TeacherEMA: %d parameters, flat=%s, pack_student=%s, backend=%s, buffers=%s",
            len(self.names),
            flat,
            pack_student,
            self.backend,
            [(t.dtype, t.numel()) for t, _ in self.buffers],
        )

    @torch.no_grad()
    def _pack(self) -> None:
        groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
        for index, (t, s) in enumerate(zip(self.teacher_params, self.student_params, strict=True)):
            groups.setdefault((t.dtype, s.dtype), []).append(index)
        for (t_dtype, s_dtype), indices in groups.items():
            itemsize = min(t_dtype.itemsize, s_dtype.itemsize)
            align = max(1, PACK_ALIGN_BYTES // itemsize)
            offsets, total = [], 0
            for index in indices:
                offsets.append(total)
                total += -(-self.teacher_params[index].numel() // align) * align
            # Zero padding in both buffers stays zero under the EMA (m * 0 + (1 - m) * 0).
            t_buf = torch.zeros(total, dtype=t_dtype, device=self.device)
            s_buf = torch.zeros(total, dtype=s_dtype, device=self.device) if self.pack_student else None
            for index, offset in zip(indices, offsets, strict=True):
                # Both views take the teacher's dense layout (a channels_last convolution stays
                # channels_last), so element i of the two buffers is the same weight.
                strides = torch.empty_like(self.teacher_params[index]).stride()
                for param, buf in ((self.teacher_params[index], t_buf), (self.student_params[index], s_buf)):
                    if buf is None:
                        continue
                    view = buf[offset : offset + param.numel()].as_strided(param.shape, strides)
                    view.copy_(param.detach())
                    param.data = view
            self.buffers.append((t_buf, s_buf))

    def _prepare(self) -> None:
        """Everything update() reuses: the contiguous/fallback split, the triton plan, the addresses."""
        teachers = [p.detach() for p in self.teacher_params]
        students = [p.detach() for p in self.student_params]
        _check_pairs(teachers, students, self.names)
        self._fused_t, self._fused_s, self._slow_t, self._slow_s = _split_contiguous(teachers, students)
        self._triton_plan = None
        self._triton_flat = []
        if self.backend == "triton" and self.pack_student:
            self._triton_flat = [_triton_kernels().FlatEMA(t, s) for t, s in self.buffers]
        elif self.backend == "triton" and self._fused_t:
            self._triton_plan = _triton_kernels().MultiTensorEMA(self._fused_t, self._fused_s)
        self._teacher_addresses = _addresses(self.teacher_params)
        self._student_addresses = _addresses(self.student_params)
        self._check_cursor = 0

    def _check_storage(self) -> None:
        """Detect parameters whose storage was replaced since _prepare().

        Reading every address costs O(parameters) Python per step (tens of microseconds for a ViT,
        as much as the GPU needs for the update itself), so each call reads the first and last
        parameter (a .to(), .half() or load_state_dict(assign=True) replaces all of them: caught at
        once) and a rotating window of STORAGE_CHECK_WINDOW others (a single replaced parameter:
        caught within len(parameters) / STORAGE_CHECK_WINDOW calls).
        """
        count = len(self.teacher_params)
        start = self._check_cursor
        stop = min(start + STORAGE_CHECK_WINDOW, count)
        self._check_cursor = 0 if stop >= count else stop
        moved = False
        for params, addresses in (
            (self.teacher_params, self._teacher_addresses),
            (self.student_params, self._student_addresses),
        ):
            if (
                params[0].data_ptr() != addresses[0]
                or params[-1].data_ptr() != addresses[-1]
                or _addresses(params[start:stop]) != addresses[start:stop]
            ):
                moved = True
        if not moved:
            return
        teacher_moved = _addresses(self.teacher_params) != self._teacher_addresses
        student_moved = _addresses(self.student_params) != self._student_addresses
        packed = [
            role
            for role, moved, is_packed in (
                ("teacher", teacher_moved, self.flat),
                ("student", student_moved, self.pack_student),
            )
            if moved and is_packed
        ]
        if packed:
            raise RuntimeError(
                f"TeacherEMA: the {' and '.join(packed)} parameters no longer live in the flat buffers "
                "TeacherEMA packed them into (the model was moved or cast with .to()/.half(), or a "
                "parameter's .data was replaced). Build TeacherEMA after moving and casting the models"
            )
        self._prepare()  # unpacked parameters may move freely: re-plan for their new storage

    @torch.no_grad()
    def update(self, momentum: float | Tensor) -> None:
        """teacher <- m * teacher + (1 - m) * student for every parameter, in place."""
        momentum = _check_momentum(momentum, self.device)
        self._check_storage()
        if self._triton_flat:
            for flat in self._triton_flat:
                flat(momentum)
            return
        if self.pack_student:
            for t_buf, s_buf in self.buffers:
                _run(self.backend, [t_buf], [s_buf], momentum)
            return
        if self._fused_t:
            _run(self.backend, self._fused_t, self._fused_s, momentum, triton_plan=self._triton_plan)
        if self._slow_t:
            reference_ema_update_(self._slow_t, self._slow_s, momentum)

    def __repr__(self) -> str:
        return (
            f"TeacherEMA({len(self.names)} parameters, flat={self.flat}, pack_student={self.pack_student}, "
            f"backend={self.backend!r})"
        )
