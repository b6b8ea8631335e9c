"""Fused multi-tensor teacher EMA in Triton: ``teacher <- m * teacher + (1 - m) * student`` over whole
lists of tensors in a small constant number of launches.

Two kernels:

- ``_ema_flat_kernel``: one teacher tensor against one student tensor (the flat buffers of
  ``dino_fast.TeacherEMA(flat=True, pack_student=True)``), a plain vectorized stream.
- ``_ema_multi_tensor_kernel``: any number of tensor pairs. Each program handles BLOCK elements of
  one pair; which pair and where is read from a block table of int64 rows
  ``(teacher address, student address, element count)``, built once per tensor list and cached, so
  the launch count depends only on how many (teacher dtype, student dtype, alignment) groups the list
  holds (usually 1), never on how many tensors it has.

Public API (imports nothing from dino_fast, so this file can be copied elsewhere as it is):

- ``ema_update_(teachers, students, momentum, *, block_size=None)``: functional, plans cached by the
  lists' addresses, sizes and dtypes.
- ``ema_update_flat_(teacher, student, momentum, *, block_size=None)``: one pair, no table.
- ``MultiTensorEMA(teachers, students, *, block_size=None)``: a plan built once and applied with
  ``plan(momentum)``; keeps its tensors alive, so a CUDA graph that captured it stays valid.
- ``FlatEMA(teacher, student, *, block_size=None)``: the same for one pair and the flat kernel.

``momentum`` is a Python float or a one-element floating tensor. A tensor on the tensors' device is
read by the kernel itself (no host sync, CUDA-graph capturable); a CPU tensor with CUDA parameters is
read on the host, which never waits for the GPU.

Tensors must be contiguous and have identical shapes pairwise; dtypes float32, float64, float16
and bfloat16 in any teacher/student combination. On CPU the kernels run only under the Triton
interpreter (``TRITON_INTERPRET=1`` before this module is imported).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .runtime import interpreting

BLOCK_SIZE = 4096  # elements per program: 16 per thread at 8 warps, i.e. 4 x 16-byte fp32 accesses per stream
NUM_WARPS = 8
ALIGN_BYTES = 16  # widest vector access; pairs whose addresses are not multiples of it get unhinted loads
PLAN_CACHE_SIZE = 64

_INTERPRET = interpreting()  # fixed at import, like the kernels Triton decorated then
_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


# Math, per element, with C = fp64 for fp64 teachers and fp32 otherwise:
#
#     t' = round_T( C(t) * C(m) + C(s) * w ),   w = C(1 - m)
#
# which is dino_fast.ops.reference.reference_ema_update_ term for term: the same compute dtype, and
# w evaluated as the reference evaluates it (1 - m in double for a Python-float m, rounded to C;
# 1 - C(m) in C for a tensor m). It is written t*m + s*w rather than as the lerp t + w*(s - t) so
# that m = 1 keeps t and m = 0 copies round_T(s) bit-exactly for finite inputs, whether or not the
# compiler fuses an FMA.
# Traffic per element is one read of t, one of s and one write of t, so both kernels are pure
# streams: the flat kernel is bound by (2|T| + |S|) bytes per element, and the multi-tensor kernel
# adds only a 24-byte table row per BLOCK elements.
@triton.jit
def _momentum(m_ptr, m, w, COMPUTE: tl.constexpr, M_FROM_PTR: tl.constexpr):
    if M_FROM_PTR:
        mc = tl.load(m_ptr).to(COMPUTE)
        wc = 1.0 - mc
    else:
        mc = tl.cast(m, COMPUTE)  # tl.cast, not .to: the interpreter hands scalars over as Python floats
        wc = tl.cast(w, COMPUTE)
    return mc, wc


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    if dtype == tl.bfloat16:
        # Round to nearest even by hand, as torch does (c10::round_to_nearest_even): Triton's own
        # fp32 -> bf16 cast is RNE on the GPU but truncates under the interpreter, and CI tests the
        # kernels there. Add half an ulp (minus one unless the kept lsb is odd), drop the low half.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + ((bits >> 16) & 1) + 0x7FFF
        high = tl.where(x != x, 0x7FC0, bits >> 16)  # any NaN becomes the canonical quiet NaN
        return high.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _ema_block(t_ptr, s_ptr, offs, count, mc, wc, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    # Full blocks take the unmasked branch: a mask built from an arbitrary count would keep the
    # compiler from proving that runs of elements share a predicate, and it would split the
    # 16-byte accesses into scalar ones.
    if count >= BLOCK:
        t = tl.load(t_ptr + offs, eviction_policy="evict_first").to(COMPUTE)
        s = tl.load(s_ptr + offs, eviction_policy="evict_first").to(COMPUTE)
        tl.store(t_ptr + offs, _round_to(t * mc + s * wc, t_ptr.dtype.element_ty))
    else:
        mask = offs < count
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        tl.store(t_ptr + offs, _round_to(t * mc + s * wc, t_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ema_flat_kernel(
    t_ptr,
    s_ptr,
    n,
    m_ptr,
    m,
    w,
    COMPUTE: tl.constexpr,
    M_FROM_PTR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK  # int64: flat buffers can exceed 2**31 elements
    mc, wc = _momentum(m_ptr, m, w, COMPUTE, M_FROM_PTR)
    _ema_block(t_ptr + start, s_ptr + start, tl.arange(0, BLOCK), n - start, mc, wc, COMPUTE, BLOCK)


@triton.jit
def _ema_multi_tensor_kernel(
    table_ptr,
    m_ptr,
    m,
    w,
    T_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    M_FROM_PTR: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = table_ptr + tl.program_id(0).to(tl.int64) * 3
    t_addr = tl.load(row)
    s_addr = tl.load(row + 1)
    count = tl.load(row + 2)
    t_ptr = t_addr.to(tl.pointer_type(T_DTYPE))
    s_ptr = s_addr.to(tl.pointer_type(S_DTYPE))
    if ALIGNED:
        # The host checked these addresses; the hint (on the pointers: it does not survive the
        # int-to-pointer cast) is what lets the loads below become 16-byte accesses.
        t_ptr = tl.multiple_of(t_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
    mc, wc = _momentum(m_ptr, m, w, COMPUTE, M_FROM_PTR)
    _ema_block(t_ptr, s_ptr, tl.arange(0, BLOCK), count, mc, wc, COMPUTE, BLOCK)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _compute_dtype(teacher_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if teacher_dtype == torch.float64 else torch.float32


def _check_block_size(block_size: int | None) -> int:
    block = BLOCK_SIZE if block_size is None else block_size
    if block < 16 or block & (block - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block}")
    return block


def _check_pair(index: int, teacher: Tensor, student: Tensor, device: torch.device) -> None:
    where = f"ema_update_: pair {index}"
    for role, tensor in (("teacher", teacher), ("student", student)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{where}: {role} is a {type(tensor).__name__}, expected a torch.Tensor")
        if tensor.dtype not in _TL_DTYPES:
            raise TypeError(
                f"{where}: {role} dtype {tensor.dtype} is not supported; "
                "use float32, float64, float16 or bfloat16"
            )
        if tensor.device != device:
            raise ValueError(
                f"{where}: {role} is on {tensor.device} but pair 0's teacher is on {device}; "
                "move all parameters to one device"
            )
        if not tensor.is_contiguous():
            raise ValueError(
                f"{where}: {role} of shape {tuple(tensor.shape)} is not contiguous "
                f"(strides {tensor.stride()}); the fused kernels stream memory linearly: pass "
                ".contiguous() tensors, or update such pairs in plain PyTorch "
                "(dino_fast.ops.ema_update_ does that for you)"
            )
    if teacher.shape != student.shape:
        raise ValueError(
            f"{where}: teacher shape {tuple(teacher.shape)} differs from student shape {tuple(student.shape)}"
        )


def _check_device(device: torch.device) -> None:
    if device.type == "cuda" and not _INTERPRET:
        return
    if device.type == "cpu" and _INTERPRET:
        return
    if _INTERPRET:
        raise RuntimeError(
            f"ema_update_: TRITON_INTERPRET=1 runs Triton on the host, where these kernels take CPU "
            f"tensors only (their address tables cannot reach {device} memory); unset TRITON_INTERPRET "
            "to run them on the GPU"
        )
    raise RuntimeError(
        f"ema_update_: Triton kernels need CUDA tensors, got {device}; on CPU set TRITON_INTERPRET=1 "
        "before importing this module (or use another backend)"
    )


def _check_momentum(momentum: float | Tensor) -> None:
    if isinstance(momentum, Tensor):
        if momentum.numel() != 1 or not momentum.is_floating_point():
            raise ValueError(
                f"ema_update_: a tensor momentum must be a floating tensor with one element, got dtype "
                f"{momentum.dtype} and shape {tuple(momentum.shape)}"
            )
    elif isinstance(momentum, bool) or not isinstance(momentum, (float, int)):
        raise TypeError(
            f"ema_update_: momentum must be a float or a one-element tensor, got {type(momentum).__name__}"
        )


def _momentum_args(momentum: float | Tensor, compute: torch.dtype, device: torch.device) -> tuple:
    """(m_ptr, m, w, M_FROM_PTR) for one launch, with m and w rounded as the reference rounds them."""
    if isinstance(momentum, Tensor) and momentum.device == device:
        return momentum.detach(), 0.0, 0.0, True  # the kernel loads it: no host sync, graph-capturable
    if isinstance(momentum, Tensor):
        if momentum.device.type != "cpu":
            raise ValueError(
                f"ema_update_: the momentum tensor is on {momentum.device} but the tensors are on {device}; "
                "keep it on their device (or on the CPU)"
            )
        # A CPU tensor beside CUDA parameters: reading it never waits for the GPU.
        m_c = momentum.detach().to(compute)
        m, w = float(m_c), float(1 - m_c)
    else:
        m, w = float(momentum), 1.0 - float(momentum)
    if compute == torch.float64:
        # Triton passes Python floats as fp32; fp64 teachers get their momentum through memory instead.
        return torch.full((), m, dtype=torch.float64, device=device), 0.0, 0.0, True
    return None, m, w, False


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (cuda:1 params from a
    process whose current device is cuda:0 would otherwise get a launch on the wrong GPU)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launch_flat(teacher: Tensor, student: Tensor, momentum: float | Tensor, block: int) -> None:
    n = teacher.numel()
    if n == 0:
        return
    compute = _compute_dtype(teacher.dtype)
    m_ptr, m, w, from_ptr = _momentum_args(momentum, compute, teacher.device)
    with _on_device(teacher.device):
        _ema_flat_kernel[(triton.cdiv(n, block),)](
            teacher,
            student,
            n,
            teacher if m_ptr is None else m_ptr,  # unread when the momentum comes as scalars
            m,
            w,
            COMPUTE=_TL_DTYPES[compute],
            M_FROM_PTR=from_ptr,
            BLOCK=block,
            num_warps=NUM_WARPS,
        )


def ema_update_flat_(
    teacher: Tensor, student: Tensor, momentum: float | Tensor, *, block_size: int | None = None
) -> None:
    """teacher <- m * teacher + (1 - m) * student for one contiguous pair of equal shapes, one launch."""
    block = _check_block_size(block_size)
    _check_momentum(momentum)
    _check_pair(0, teacher, student, teacher.device)
    _check_device(teacher.device)
    _launch_flat(teacher, student, momentum, block)


class FlatEMA:
    """``ema_update_flat_`` for a fixed pair, checked once here: each call is the launch alone (the
    per-step path of a packed teacher/student, where host time is a visible share of ~0.2 ms)."""

    def __init__(self, teacher: Tensor, student: Tensor, *, block_size: int | None = None) -> None:
        self.block = _check_block_size(block_size)
        _check_pair(0, teacher, student, teacher.device)
        _check_device(teacher.device)
        self.teacher, self.student = teacher, student

    def __call__(self, momentum: float | Tensor) -> None:
        _check_momentum(momentum)
        _launch_flat(self.teacher, self.student, momentum, self.block)


@dataclass(frozen=True)
class _Group:
    table: Tensor  # (blocks, 3) int64 on the device: teacher address, student address, element count
    teacher_dtype: torch.dtype
    student_dtype: torch.dtype
    aligned: bool


class _Plan:
    """Block tables for one tensor list: addresses and sizes only, no references to the tensors."""

    def __init__(self, teachers: Sequence[Tensor], students: Sequence[Tensor], block: int) -> None:
        self.block = block
        self.device = teachers[0].device if teachers else torch.device("cpu")
        rows: dict[tuple[torch.dtype, torch.dtype, bool], list[Tensor]] = {}
        for teacher, student in zip(teachers, students, strict=True):
            n = teacher.numel()
            if n == 0:
                continue
            t_addr, s_addr = teacher.data_ptr(), student.data_ptr()
            aligned = t_addr % ALIGN_BYTES == 0 and s_addr % ALIGN_BYTES == 0
            starts = torch.arange(0, n, block, dtype=torch.int64)
            block_rows = torch.stack(
                (
                    t_addr + starts * teacher.element_size(),
                    s_addr + starts * student.element_size(),
                    (n - starts).clamp_(max=block),
                ),
                dim=1,
            )
            rows.setdefault((teacher.dtype, student.dtype, aligned), []).append(block_rows)
        self.groups: list[_Group] = []
        if not rows:
            return
        tables = [torch.cat(parts) for parts in rows.values()]
        # One host-to-device copy for every group; each group's table is a slice of it.
        on_device = torch.cat(tables).to(self.device)
        first = 0
        for (t_dtype, s_dtype, aligned), table in zip(rows, tables, strict=True):
            self.groups.append(_Group(on_device[first : first + len(table)], t_dtype, s_dtype, aligned))
            first += len(table)

    def __call__(self, momentum: float | Tensor) -> None:
        if not self.groups:
            return
        with _on_device(self.device):
            for group in self.groups:
                compute = _compute_dtype(group.teacher_dtype)
                m_ptr, m, w, from_ptr = _momentum_args(momentum, compute, self.device)
                _ema_multi_tensor_kernel[(group.table.shape[0],)](
                    group.table,
                    group.table if m_ptr is None else m_ptr,  # unread when the momentum comes as scalars
                    m,
                    w,
                    T_DTYPE=_TL_DTYPES[group.teacher_dtype],
                    S_DTYPE=_TL_DTYPES[group.student_dtype],
                    COMPUTE=_TL_DTYPES[compute],
                    M_FROM_PTR=from_ptr,
                    ALIGNED=group.aligned,
                    BLOCK=self.block,
                    num_warps=NUM_WARPS,
                )


def _validated_lists(teachers: Sequence[Tensor], students: Sequence[Tensor]) -> tuple[list, list]:
    teachers, students = list(teachers), list(students)
    if len(teachers) != len(students):
        raise ValueError(
            f"ema_update_: got {len(teachers)} teacher tensors but {len(students)} student tensors; "
            "pass the two parameter lists in matching order"
        )
    if teachers:
        device = teachers[0].device
        for index, (teacher, student) in enumerate(zip(teachers, students, strict=True)):
            _check_pair(index, teacher, student, device)
        _check_device(device)
    return teachers, students


class MultiTensorEMA:
    """A fused EMA over fixed tensor lists: the block table is built here once, and each call is
    one launch per (teacher dtype, student dtype, alignment) group.

    The plan records addresses: it stays correct while the tensors keep their storage (in-place
    updates are fine; ``param.data = ...``, ``.to()`` or re-allocation are not, see ``is_current``).
    It holds references to the tensors, so their memory cannot be reused underneath a captured
    CUDA graph.
    """

    def __init__(
        self, teachers: Sequence[Tensor], students: Sequence[Tensor], *, block_size: int | None = None
    ) -> None:
        self.teachers, self.students = _validated_lists(teachers, students)
        self._plan = _Plan(self.teachers, self.students, _check_block_size(block_size))
        self._addresses = _addresses(self.teachers, self.students)

    def is_current(self, teachers: Sequence[Tensor], students: Sequence[Tensor]) -> bool:
        """Whether these lists still sit at the addresses the plan was built for."""
        return _addresses(teachers, students) == self._addresses

    def __call__(self, momentum: float | Tensor) -> None:
        _check_momentum(momentum)
        self._plan(momentum)


def _addresses(teachers: Sequence[Tensor], students: Sequence[Tensor]) -> tuple:
    return (tuple(map(Tensor.data_ptr, teachers)), tuple(map(Tensor.data_ptr, students)))


_plan_cache: collections.OrderedDict[tuple, _Plan] = collections.OrderedDict()
_plan_cache_lock = threading.Lock()


def _plan_key(teachers: list[Tensor], students: list[Tensor], block: int) -> tuple:
    # Everything the table depends on (addresses, sizes, dtypes) plus what validation looked at, so
    # a hit never needs re-validation: a hit means the same memory regions as an earlier valid call.
    return (
        block,
        teachers[0].device,
        *_addresses(teachers, students),
        tuple(map(Tensor.numel, teachers)),
        tuple(map(Tensor.numel, students)),
        tuple(t.dtype for t in teachers),
        tuple(s.dtype for s in students),
        tuple(map(Tensor.is_contiguous, teachers)),
        tuple(map(Tensor.is_contiguous, students)),
        tuple(s.device for s in students),
    )


def ema_update_(
    teachers: Sequence[Tensor],
    students: Sequence[Tensor],
    momentum: float | Tensor,
    *,
    block_size: int | None = None,
) -> None:
    """teacher <- m * teacher + (1 - m) * student for every pair, in place, fused.

    The block table is cached per (addresses, sizes, dtypes) of the lists, for the last
    PLAN_CACHE_SIZE lists seen. Cached plans do not keep tensors alive; use ``MultiTensorEMA`` when a
    CUDA graph captures the update.
    """
    block = _check_block_size(block_size)
    _check_momentum(momentum)
    teachers, students = list(teachers), list(students)
    if len(teachers) != len(students) or not teachers:
        _validated_lists(teachers, students)  # raises on a length mismatch; nothing to do when empty
        return
    key = _plan_key(teachers, students, block)
    with _plan_cache_lock:
        plan = _plan_cache.get(key)
        if plan is not None:
            _plan_cache.move_to_end(key)
    if plan is None:
        _validated_lists(teachers, students)
        plan = _Plan(teachers, students, block)
        with _plan_cache_lock:
            _plan_cache[key] = plan
            while len(_plan_cache) > PLAN_CACHE_SIZE:
                _plan_cache.popitem(last=False)
    plan(momentum)
