"""Fused teacher EMA (dino_fast/ops/ema.py, kernels/ema.py, csrc/ema.cpp, csrc/ema_cuda.cu) against the
formula evaluated in float64 and against dino_fast.ops.reference.

Every backend runs on CPU here (triton under the interpreter, which conftest switches on); the
`gpu` tests at the end check the Triton and CUDA kernels on a device.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import dino_fast
from benchmarks import bench_ema
from dino_fast.kernels import ema as triton_ema
from dino_fast.ops import ema as ema_module
from dino_fast.ops import native, reference
from dino_fast.ops.ema import TeacherEMA, ema_update_

# One element, less than one 16-byte vector, just under a power of two, one past a multiple of
# every block size: each takes a different mix of full blocks, partial blocks and scalar tails.
AWKWARD_SIZES = (1, 7, 1023, 65537)
TOLERANCE = {  # one rounding to the teacher dtype after an fp32 (fp64 for fp64) evaluation
    torch.float32: {"rtol": 2e-6, "atol": 1e-6},
    torch.bfloat16: {"rtol": 2**-8, "atol": 1e-6},
    torch.float16: {"rtol": 2**-10, "atol": 1e-6},
    torch.float64: {"rtol": 1e-14, "atol": 1e-15},
}
CUDA = torch.device("cuda")


def make_pairs(
    sizes, teacher_dtype, student_dtype, *, device="cpu", seed=0
) -> tuple[list[Tensor], list[Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    teachers = [torch.randn(n, generator=generator).to(device, teacher_dtype) for n in sizes]
    students = [torch.randn(n, generator=generator).to(device, student_dtype) for n in sizes]
    return teachers, students


def expected_fp64(teachers, students, momentum) -> list[Tensor]:
    m = float(momentum)
    return [t.double() * m + s.double() * (1 - m) for t, s in zip(teachers, students, strict=True)]


def assert_ema_close(teachers, expected) -> None:
    for index, (actual, want) in enumerate(zip(teachers, expected, strict=True)):
        torch.testing.assert_close(
            actual.double(),
            want.to(actual.device),
            **TOLERANCE[actual.dtype],
            msg=lambda m, i=index: f"pair {i}: {m}",
        )


def clones(tensors) -> list[Tensor]:
    return [t.clone() for t in tensors]


def assert_untouched(tensors, originals) -> None:
    for tensor, original in zip(tensors, originals, strict=True):
        assert torch.equal(tensor, original), "the student was modified"


# ---------------------------------------------------------------------------------------------------
# ema_update_: numerics per backend
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("teacher_dtype", "student_dtype"),
    [
        (torch.float32, torch.float32),  # the official setup
        (torch.bfloat16, torch.float32),  # a bf16 teacher of an fp32 student: mixed-dtype kernels
        (torch.float16, torch.bfloat16),  # both narrow, different formats
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),  # a wide teacher of a narrow student
    ],
)
@pytest.mark.parametrize("momentum", [0.996, "tensor"], ids=["float", "tensor"])
def test_matches_fp64_formula(backend, teacher_dtype, student_dtype, momentum) -> None:
    # A 2-D pair besides the flat ones: shapes other than 1-D must stream the same way.
    sizes = (*AWKWARD_SIZES, 33 * 31)
    teachers, students = make_pairs(sizes, teacher_dtype, student_dtype)
    teachers[-1], students[-1] = teachers[-1].view(33, 31), students[-1].view(33, 31)
    m = torch.tensor(0.996) if momentum == "tensor" else momentum
    want = expected_fp64(teachers, students, m)
    before = clones(students)
    ema_update_(teachers, students, m, backend=backend)
    assert_ema_close(teachers, want)
    assert_untouched(students, before)


def test_matches_reference_implementation(backend) -> None:
    # Same result as the readable spec, not only the formula: the reference's own fp32 rounding.
    teachers, students = make_pairs(AWKWARD_SIZES, torch.float32, torch.float32, seed=3)
    expected = clones(teachers)
    reference.reference_ema_update_(expected, students, 0.9)
    ema_update_(teachers, students, 0.9, backend=backend)
    for actual, want in zip(teachers, expected, strict=True):
        torch.testing.assert_close(actual, want, rtol=2e-7, atol=2e-7)


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("tensor_momentum", [False, True])
def test_momentum_one_and_zero_are_exact(backend, teacher_dtype, tensor_momentum) -> None:
    # m = 1 must leave the teacher bit-identical, m = 0 must copy the student rounded once: the
    # schedule ends at exactly 1, and a teacher drifting there would be a bug, not rounding.
    teachers, students = make_pairs(AWKWARD_SIZES, teacher_dtype, torch.float32, seed=1)
    original = clones(teachers)
    ema_update_(teachers, students, torch.tensor(1.0) if tensor_momentum else 1.0, backend=backend)
    for actual, want in zip(teachers, original, strict=True):
        assert torch.equal(actual, want)
    ema_update_(teachers, students, torch.tensor(0.0) if tensor_momentum else 0.0, backend=backend)
    for actual, student in zip(teachers, students, strict=True):
        assert torch.equal(actual, student.to(teacher_dtype))


def test_fp64_teacher_uses_fp64_math(backend) -> None:
    # fp64 teachers are computed in fp64 (the reference's rule): an fp32 momentum would be off by 1e-8.
    teachers, students = make_pairs((5, 4099), torch.float64, torch.float32, seed=2)
    want = expected_fp64(teachers, students, 0.996)
    ema_update_(teachers, students, 0.996, backend=backend)
    assert_ema_close(teachers, want)


@pytest.mark.parametrize("momentum_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tensor_momentum_rounds_like_the_reference(backend, momentum_dtype) -> None:
    # A tensor momentum is taken in the compute dtype and 1 - m is evaluated there.
    teachers, students = make_pairs((257,), torch.float32, torch.float32, seed=4)
    m = torch.tensor(0.9963, dtype=momentum_dtype)
    expected = clones(teachers)
    reference.reference_ema_update_(expected, students, m)
    ema_update_(teachers, students, m, backend=backend)
    torch.testing.assert_close(teachers[0], expected[0], rtol=2e-7, atol=2e-7)


def test_mixed_dtype_pairs_in_one_list(backend) -> None:
    # One call over pairs of four dtype combinations: the kernels group them (one launch per group).
    combos = [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.float64, torch.float32),
    ]
    teachers, students = [], []
    for index, size in enumerate((*AWKWARD_SIZES, 4096, 3)):
        t_dtype, s_dtype = combos[index % len(combos)]
        pair = make_pairs((size,), t_dtype, s_dtype, seed=10 + index)
        teachers += pair[0]
        students += pair[1]
    want = expected_fp64(teachers, students, 0.99)
    before = clones(students)
    ema_update_(teachers, students, 0.99, backend=backend)
    assert_ema_close(teachers, want)
    assert_untouched(students, before)


def test_many_tensors(backend) -> None:
    # More tensors than one CUDA launch holds (96) and sizes around the 16K-element CPU chunk.
    sizes = [((i * 7919) % 20000) + 1 for i in range(130)]
    teachers, students = make_pairs(sizes, torch.float32, torch.float32, seed=5)
    want = expected_fp64(teachers, students, 0.996)
    ema_update_(teachers, students, 0.996, backend=backend)
    assert_ema_close(teachers, want)


def test_unaligned_tensors(backend) -> None:
    # Views one element into their storage are not 16-byte aligned: the vector paths must notice.
    teachers = [torch.randn(1026)[1:], torch.randn(9)[3:]]
    students = [torch.randn(1027).to(torch.bfloat16)[2:], torch.randn(7).to(torch.bfloat16)[1:]]
    want = expected_fp64(teachers, students, 0.5)
    ema_update_(teachers, students, 0.5, backend=backend)
    assert_ema_close(teachers, want)


def test_non_contiguous_pairs_take_the_reference_path(backend) -> None:
    # A transposed teacher and a strided student beside ordinary pairs: results stay exact.
    teachers, students = make_pairs((64 * 48, 100, 9), torch.float32, torch.float32, seed=7)
    teachers[0] = teachers[0].view(64, 48).t()
    students[0] = students[0].view(48, 64)
    students[1] = torch.randn(200)[::2]
    want = expected_fp64(teachers, students, 0.9)
    ema_update_(teachers, students, 0.9, backend=backend)
    assert_ema_close(teachers, want)


def test_empty_and_zero_size(backend) -> None:
    ema_update_([], [], 0.9, backend=backend)  # nothing to do, and no error
    teachers, students = make_pairs((0, 5), torch.float32, torch.float32)
    want = expected_fp64(teachers, students, 0.9)
    ema_update_(teachers, students, 0.9, backend=backend)
    assert_ema_close(teachers, want)


def test_accepts_parameter_iterators(backend) -> None:
    # What codebases pass: model.parameters() generators, parameters that require grad.
    student = nn.Linear(6, 5)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(-1.0)
    want = expected_fp64(list(teacher.parameters()), list(student.parameters()), 0.8)
    ema_update_(teacher.parameters(), student.parameters(), 0.8, backend=backend)
    assert_ema_close(list(teacher.parameters()), want)


# ---------------------------------------------------------------------------------------------------
# Errors and backend choice
# ---------------------------------------------------------------------------------------------------


def test_length_mismatch() -> None:
    teachers, students = make_pairs((3, 4), torch.float32, torch.float32)
    with pytest.raises(ValueError, match="2 teacher tensors but 1 student"):
        ema_update_(teachers, students[:1], 0.9)


def test_shape_mismatch_names_the_pair() -> None:
    teachers, students = make_pairs((3, 4), torch.float32, torch.float32)
    students[1] = students[1].view(2, 2)
    with pytest.raises(ValueError, match=r"pair 1: teacher shape \(4,\) differs from student shape \(2, 2\)"):
        ema_update_(teachers, students, 0.9)


def test_unsupported_dtype() -> None:
    with pytest.raises(TypeError, match="int64 is not supported"):
        ema_update_([torch.zeros(3, dtype=torch.int64)], [torch.zeros(3)], 0.9)


def test_device_mismatch() -> None:
    with pytest.raises(ValueError, match="student is on meta"):
        ema_update_([torch.zeros(3)], [torch.zeros(3, device="meta")], 0.9)


@pytest.mark.parametrize(
    ("momentum", "error", "match"),
    [
        (torch.tensor([0.9, 0.9]), ValueError, "one element"),
        (torch.tensor(1), ValueError, "floating tensor"),
        ("0.9", TypeError, "got str"),
        (True, TypeError, "got bool"),
    ],
)
def test_bad_momentum(momentum, error, match) -> None:
    teachers, students = make_pairs((3,), torch.float32, torch.float32)
    with pytest.raises(error, match=match):
        ema_update_(teachers, students, momentum)


def test_unknown_backend() -> None:
    teachers, students = make_pairs((3,), torch.float32, torch.float32)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ema_update_(teachers, students, 0.9, backend="cuda")


def _record_backends(monkeypatch) -> list[str]:
    seen: list[str] = []
    run = ema_module._run

    def spy(backend, *args, **kwargs):
        seen.append(backend)
        return run(backend, *args, **kwargs)

    monkeypatch.setattr(ema_module, "_run", spy)
    return seen


def test_default_cpu_backend_is_native(monkeypatch) -> None:
    monkeypatch.delenv("DINO_FAST_BACKEND", raising=False)
    seen = _record_backends(monkeypatch)
    teachers, students = make_pairs((3,), torch.float32, torch.float32)
    ema_update_(teachers, students, 0.9)
    assert seen == ["native"]


def test_backend_forced_by_argument_and_environment(monkeypatch, backend) -> None:
    seen = _record_backends(monkeypatch)
    teachers, students = make_pairs((3,), torch.float32, torch.float32)
    ema_update_(teachers, students, 0.9, backend=backend)
    monkeypatch.setenv("DINO_FAST_BACKEND", backend)
    ema_update_(teachers, students, 0.9)
    assert seen == [backend, backend]


@pytest.fixture
def native_op():
    """torch.ops.dino_fast_native.ema_update_, registered once dino_fast._C is loaded."""
    module, reason = native.load()
    assert module is not None, reason
    return torch.ops.dino_fast_native.ema_update_


def test_native_op_checks_its_inputs(native_op) -> None:
    # The op is public (torch.ops.dino_fast_native.ema_update_): it must not trust its caller.
    op = native_op
    teachers, students = make_pairs((4, 6), torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="is not contiguous"):
        op([teachers[1].view(2, 3).t()], [students[1].view(3, 2)], None, 0.9)
    with pytest.raises(RuntimeError, match="2 teacher tensors but 1 student"):
        op(teachers, students[:1], None, 0.9)
    with pytest.raises(RuntimeError, match="differs from student shape"):
        op(teachers, students[::-1], None, 0.9)
    with pytest.raises(RuntimeError, match="one element"):
        op(teachers, students, torch.ones(2), 0.9)


def test_native_op_traces_on_meta_tensors(native_op) -> None:
    # The Meta kernel lets fake-tensor tracing through, with the same checks.
    op = native_op
    teachers = [torch.empty(3, 4, device="meta"), torch.empty(5, device="meta", dtype=torch.bfloat16)]
    students = [torch.empty(3, 4, device="meta"), torch.empty(5, device="meta")]
    op(teachers, students, None, 0.9)
    with pytest.raises(RuntimeError, match="differs from student shape"):
        op(teachers, students[::-1], None, 0.9)


def test_triton_kernels_refuse_non_contiguous_tensors() -> None:
    teacher = torch.randn(6, 4).t()
    with pytest.raises(ValueError, match="not contiguous"):
        triton_ema.ema_update_([teacher], [torch.randn(4, 6)], 0.9)
    with pytest.raises(ValueError, match="not contiguous"):
        triton_ema.ema_update_flat_(teacher, torch.randn(4, 6), 0.9)


def test_triton_kernels_refuse_a_momentum_on_another_device() -> None:
    # Reading it would need a copy (and, from another GPU, a sync): refused, not done silently.
    teacher, student = torch.randn(8), torch.randn(8)
    with pytest.raises(ValueError, match="momentum tensor is on meta"):
        triton_ema.ema_update_flat_(teacher, student, torch.tensor(0.9, device="meta"))


# ---------------------------------------------------------------------------------------------------
# Triton specifics: tiny blocks, plan cache, the flat kernel
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("teacher_dtype", "student_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.float16)]
)
def test_triton_many_blocks_per_tensor(teacher_dtype, student_dtype) -> None:
    # 16-element blocks: sizes below, at and past one block and many blocks, so every tensor has
    # full (unmasked) blocks and a partial one, in the aligned and unaligned groups.
    sizes = (1, 15, 16, 17, 100, 513)
    teachers, students = make_pairs(sizes, teacher_dtype, student_dtype, seed=8)
    teachers.append(torch.randn(101).to(teacher_dtype)[1:])  # unaligned
    students.append(torch.randn(100).to(student_dtype))
    want = expected_fp64(teachers, students, 0.75)
    triton_ema.ema_update_(teachers, students, 0.75, block_size=16)
    assert_ema_close(teachers, want)


def test_triton_plan_cache_is_reused_and_keyed_by_address() -> None:
    triton_ema._plan_cache.clear()
    teachers, students = make_pairs((10, 20), torch.float32, torch.float32)
    triton_ema.ema_update_(teachers, students, 0.9)
    triton_ema.ema_update_(teachers, students, 0.9)
    assert len(triton_ema._plan_cache) == 1
    # Same shapes, other storage: a new plan, and the right tensors get updated.
    others, other_students = make_pairs((10, 20), torch.float32, torch.float32, seed=9)
    want = expected_fp64(others, other_students, 0.5)
    triton_ema.ema_update_(others, other_students, 0.5)
    assert len(triton_ema._plan_cache) == 2
    assert_ema_close(others, want)


def test_triton_plan_cache_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(triton_ema, "PLAN_CACHE_SIZE", 3)
    triton_ema._plan_cache.clear()
    for seed in range(5):
        teachers, students = make_pairs((4,), torch.float32, torch.float32, seed=seed)
        triton_ema.ema_update_(teachers, students, 0.9)
    assert len(triton_ema._plan_cache) == 3


def test_triton_multi_tensor_plan_object() -> None:
    teachers, students = make_pairs(AWKWARD_SIZES, torch.bfloat16, torch.float32, seed=11)
    plan = triton_ema.MultiTensorEMA(teachers, students)
    want = expected_fp64(teachers, students, 0.9)
    plan(0.9)
    assert_ema_close(teachers, want)
    assert plan.is_current(teachers, students)
    assert not plan.is_current([t.clone() for t in teachers], students)


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_triton_flat_kernel(size) -> None:
    # Sizes around the 4096-element block: the full-block branch and the masked tail.
    (teacher,), (student,) = make_pairs((size,), torch.bfloat16, torch.float32, seed=size)
    want = expected_fp64([teacher], [student], torch.tensor(0.996))
    triton_ema.ema_update_flat_(teacher, student, torch.tensor(0.996))
    assert_ema_close([teacher], want)


def test_triton_bf16_rounding_is_round_to_nearest_even() -> None:
    # Ties and carries into the exponent, the cases a truncating conversion gets wrong.
    student = torch.tensor(
        [1.0, 1.00390625, 1.01171875, 1.99999, 255.99, -1.00390625, 3.0e38, 1e-40, float("inf")]
    )
    teacher = torch.zeros(len(student), dtype=torch.bfloat16)
    triton_ema.ema_update_flat_(teacher, student, 0.0)
    assert torch.equal(teacher, student.to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------
# TeacherEMA
# ---------------------------------------------------------------------------------------------------


class TinyDINO(nn.Module):
    """The parameter kinds of a DINO ViT + head: tokens, patch conv, norms, linears, and the
    weight-normed last layer (official code: nn.utils.weight_norm with weight_g frozen)."""

    def __init__(self, dim: int = 12, out_dim: int = 33) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, 7))
        with warnings.catch_warnings():  # deprecated in favour of parametrizations; DINO uses this one
            warnings.simplefilter("ignore", FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(7, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        self.last_layer.weight_g.requires_grad = False

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        return self.last_layer(self.mlp(self.norm(tokens[:, 0])))


def make_models(teacher_dtype=torch.float32, seed=0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    student = TinyDINO()
    teacher = TinyDINO()  # as in main_dino.py: a second model, not a deepcopy (weight_norm forbids it)
    teacher.load_state_dict(student.state_dict())
    teacher.to(teacher_dtype)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))  # a teacher that differs from the student
            p.requires_grad_(False)
    return teacher, student


def expected_teacher(teacher, student, momentum) -> dict[str, Tensor]:
    s = dict(student.named_parameters())
    return {
        name: t.detach().double() * momentum + s[name].detach().double() * (1 - momentum)
        for name, t in teacher.named_parameters()
    }


def assert_teacher(teacher, want) -> None:
    for name, param in teacher.named_parameters():
        torch.testing.assert_close(
            param.double(), want[name], **TOLERANCE[param.dtype], msg=lambda m, n=name: f"{n}: {m}"
        )


LAYOUTS = [
    pytest.param({"flat": False}, id="lists"),
    pytest.param({"flat": True}, id="flat-teacher"),
    pytest.param({"flat": True, "pack_student": True}, id="flat-both"),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_teacher_ema_updates_every_parameter(backend, layout, teacher_dtype) -> None:
    teacher, student = make_models(teacher_dtype)
    x = torch.randn(2, 3, 8, 8)
    before_out = (teacher(x.to(teacher_dtype)), student(x))
    ema = TeacherEMA(teacher, student, backend=backend, **layout)
    # Packing keeps values, shapes and the models' outputs.
    torch.testing.assert_close(teacher(x.to(teacher_dtype)), before_out[0], rtol=0, atol=0)
    torch.testing.assert_close(student(x), before_out[1], rtol=0, atol=0)
    student_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    for momentum in (0.996, torch.tensor(0.9)):
        want = expected_teacher(teacher, student, float(momentum))
        ema.update(momentum)
        assert_teacher(teacher, want)
    for name, param in student.named_parameters():
        assert torch.equal(param, student_before[name]), f"student parameter {name} changed"


@pytest.mark.parametrize("pack_student", [False, True])
def test_flat_packs_one_buffer_per_dtype_pair(pack_student) -> None:
    teacher, student = make_models()
    with torch.no_grad():
        teacher.norm.to(torch.bfloat16)  # two dtype groups: (fp32, fp32) and (bf16, fp32)
    ema = TeacherEMA(teacher, student, flat=True, pack_student=pack_student, backend="native")
    assert sorted(str(t.dtype) for t, _ in ema.buffers) == ["torch.bfloat16", "torch.float32"]
    storages = {t.untyped_storage().data_ptr(): t for t, _ in ema.buffers}
    for name, param in teacher.named_parameters():
        assert param.untyped_storage().data_ptr() in storages, f"{name} is not a view into a flat buffer"
        assert param.is_contiguous() and param.data_ptr() % ema_module.PACK_ALIGN_BYTES == 0
    student_storages = {s.untyped_storage().data_ptr() for _, s in ema.buffers if s is not None}
    in_buffer = [p.untyped_storage().data_ptr() in student_storages for p in student.parameters()]
    assert all(in_buffer) if pack_student else not any(in_buffer)


def test_packed_student_trains_and_the_teacher_follows(backend) -> None:
    teacher, student = make_models(torch.bfloat16)
    ema = TeacherEMA(teacher, student, flat=True, pack_student=True, backend=backend)
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.1)  # built after packing, as documented
    for _ in range(2):
        optimizer.zero_grad()
        student(torch.randn(2, 3, 8, 8)).square().mean().backward()
        optimizer.step()
        want = expected_teacher(teacher, student, 0.9)
        ema.update(0.9)
        assert_teacher(teacher, want)
    _, s_buf = ema.buffers[0]
    assert all(
        p.untyped_storage().data_ptr() == s_buf.untyped_storage().data_ptr() for p in student.parameters()
    )


def test_packing_keeps_channels_last_convolutions_channels_last(backend) -> None:
    # Convnets train in channels_last on GPUs; packed, each weight keeps its layout, the student's
    # and the teacher's element i are the same weight, and the update stays the formula's.
    teacher, student = make_models()
    teacher.to(memory_format=torch.channels_last)
    student.to(memory_format=torch.channels_last)
    ema = TeacherEMA(teacher, student, flat=True, pack_student=True, backend=backend)
    convs = [(n, p) for n, p in [*teacher.named_parameters(), *student.named_parameters()] if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for _, p in convs)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    want = expected_teacher(teacher, student, 0.7)
    ema.update(0.7)
    assert_teacher(teacher, want)


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, enough for DistributedDataParallel on CPU."""
    created = not dist.is_initialized()
    if created:
        store = dist.FileStore(str(tmp_path / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ddp_student(process_group, backend, layout) -> None:
    teacher, student = make_models()
    if layout.get("pack_student"):
        # The documented order: TeacherEMA packs, then the optimizer and DDP are built.
        ema = TeacherEMA(teacher, student, backend=backend, **layout)
        ddp = nn.parallel.DistributedDataParallel(student)
    else:
        ddp = nn.parallel.DistributedDataParallel(student)
        ema = TeacherEMA(teacher, ddp, backend=backend, **layout)  # "module." names are matched
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
    ddp(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    want = expected_teacher(teacher, student, 0.8)
    ema.update(0.8)
    assert_teacher(teacher, want)


def test_pack_student_refuses_a_ddp_wrapped_student(process_group) -> None:
    teacher, student = make_models()
    ddp = nn.parallel.DistributedDataParallel(student)
    with pytest.raises(RuntimeError, match=r"got a wrapped student.*first, then the optimizer, then DDP"):
        TeacherEMA(teacher, ddp, flat=True, pack_student=True)


def test_compiled_wrappers_are_unwrapped() -> None:
    teacher, student = make_models()
    ema = TeacherEMA(teacher, torch.compile(student), backend="torch")  # never called: no compile here
    assert ema.names == [name for name, _ in teacher.named_parameters()]


def test_name_mismatch_is_reported() -> None:
    teacher, student = make_models()
    teacher.only_teacher = nn.Parameter(torch.zeros(2))
    student.extra = nn.Linear(2, 2)
    with pytest.raises(
        ValueError,
        match=r"teacher parameters without a student counterpart: \['only_teacher'\]; "
        r"student parameters without a teacher counterpart: \['extra.weight', 'extra.bias'\]",
    ):
        TeacherEMA(teacher, student)


def test_shape_mismatch_is_reported() -> None:
    teacher, student = make_models()
    teacher.norm.weight = nn.Parameter(torch.ones(5))
    with pytest.raises(
        ValueError, match=r"'norm\.weight' has shape \(5,\) in the teacher but \(12,\) in the student"
    ):
        TeacherEMA(teacher, student)


def test_shared_parameters_are_refused() -> None:
    _, student = make_models()
    with pytest.raises(ValueError, match="shared by teacher and student"):
        TeacherEMA(student, student)


def test_pack_student_needs_flat() -> None:
    teacher, student = make_models()
    with pytest.raises(ValueError, match="pack_student=True needs flat=True"):
        TeacherEMA(teacher, student, pack_student=True)


def test_moving_a_packed_teacher_is_detected() -> None:
    teacher, student = make_models()
    ema = TeacherEMA(teacher, student, flat=True, backend="native")
    teacher.double()  # replaces every parameter's storage: the flat buffer no longer backs them
    with pytest.raises(RuntimeError, match="teacher parameters no longer live in the flat buffers"):
        ema.update(0.9)


def test_single_swapped_parameter_is_found_within_a_few_updates() -> None:
    # 40 parameters: more than one check window, so the swapped one is found by the rotation.
    teacher = nn.Sequential(*(nn.Linear(3, 3) for _ in range(20)))
    student = nn.Sequential(*(nn.Linear(3, 3) for _ in range(20)))
    ema = TeacherEMA(teacher, student, flat=True, backend="native")
    ema.update(0.9)
    teacher[10].bias.data = torch.zeros(3)
    calls = -(-len(ema.names) // ema_module.STORAGE_CHECK_WINDOW) + 1
    with pytest.raises(RuntimeError, match="no longer live in the flat buffers"):
        for _ in range(calls):
            ema.update(0.9)


def test_unpacked_parameters_may_move(backend) -> None:
    # Without packing, a student cast after construction is picked up (the triton plan is rebuilt).
    teacher, student = make_models()
    ema = TeacherEMA(teacher, student, backend=backend)
    ema.update(0.9)
    student.to(torch.bfloat16)
    want = expected_teacher(teacher, student, 0.5)
    ema.update(0.5)
    assert_teacher(teacher, want)


def test_teacher_ema_is_exported() -> None:
    assert dino_fast.TeacherEMA is TeacherEMA


# ---------------------------------------------------------------------------------------------------
# Benchmark smoke test (the suite must run and report every implementation)
# ---------------------------------------------------------------------------------------------------


def test_benchmark_suite_runs() -> None:
    full = bench_ema.vit_dino_shapes()
    assert len(full) == 158 and sum(torch.Size(s).numel() for _, s in full) == 44_017_792
    config = {"dim": 8, "depth": 1, "img_size": 32, "out_dim": 64, "hidden_dim": 16, "bottleneck_dim": 8}
    rows = bench_ema.run(torch.device("cpu"), full=False, warmup=1, iters=2, config=config)
    impls = {row["impl"] for row in rows}
    assert {"official per-parameter loop", "torch._foreach_lerp_", "flat lerp_ (one tensor)"} <= impls
    assert {"dino_fast native list", "TeacherEMA native flat", "TeacherEMA torch flat teacher"} <= impls
    assert all(row["median_ms"] > 0 and row["gbps"] > 0 for row in rows)


# ---------------------------------------------------------------------------------------------------
# GPU (benchmarks/gpu_check.sh runs these on a lent device)
# ---------------------------------------------------------------------------------------------------

GPU_BACKENDS = ["triton", "native"]


def gpu_pairs(seed=0) -> tuple[list[Tensor], list[Tensor]]:
    # 200 tensors, 150 of them fp32/fp32 (> 96 pointer pairs per CUDA launch), three of those with
    # 130 chunks of 65536 each (> 320 blocks per launch, split mid-tensor), every fourth pair in
    # another dtype combination, every eleventh not 16-byte aligned, some of zero size.
    combos = [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.float64, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ]
    teachers, students = [], []
    for i in range(200):
        size = 130 * 65536 + 5 if i in (5, 6, 7) else [1, 7, 1023, 65537, 384, 0, 3 * 65536 + 11][i % 7]
        t_dtype, s_dtype = combos[(i // 4) % len(combos)] if i % 4 == 0 else (torch.float32, torch.float32)
        (t,), (s,) = make_pairs((size + 1,), t_dtype, s_dtype, device="cuda", seed=seed + i)
        if i % 11 == 0:
            t, s = t[1:], s[1:]
        else:
            t, s = t[:size], s[:size]
        teachers.append(t)
        students.append(s)
    return teachers, students


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("momentum", ["float", "device", "host"])
def test_gpu_matches_fp64(backend, momentum) -> None:
    teachers, students = gpu_pairs()
    m = {"float": 0.996, "device": torch.tensor(0.996, device=CUDA), "host": torch.tensor(0.996)}[momentum]
    want = expected_fp64(teachers, students, m)
    before = clones(students)
    ema_update_(teachers, students, m, backend=backend)
    torch.cuda.synchronize()
    assert_ema_close(teachers, want)
    assert_untouched(students, before)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_momentum_edges_exact(backend) -> None:
    teachers, students = gpu_pairs(seed=1)
    original = clones(teachers)
    ema_update_(teachers, students, torch.tensor(1.0, device=CUDA), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(teachers, original, strict=True))
    ema_update_(teachers, students, 0.0, backend=backend)
    assert all(torch.equal(t, s.to(t.dtype)) for t, s in zip(teachers, students, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("size", [1, 4097, 33_554_432 + 3])
def test_gpu_flat_pair(backend, size) -> None:
    (teacher,), (student,) = make_pairs((size,), torch.bfloat16, torch.float32, device="cuda", seed=size % 97)
    want = expected_fp64([teacher], [student], 0.9)
    ema_update_([teacher], [student], 0.9, backend=backend)
    assert_ema_close([teacher], want)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_no_host_sync(backend) -> None:
    teacher, student = (m.cuda() for m in make_models())
    ema = TeacherEMA(teacher, student, flat=True, pack_student=True, backend=backend)
    lists = TeacherEMA(*(m.cuda() for m in make_models(seed=1)), backend=backend)
    m = torch.tensor(0.99, device=CUDA)
    ema.update(m)  # first calls compile / build tables
    lists.update(m)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema.update(m)
        lists.update(m)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_cuda_graph_replays_with_new_momentum(backend, layout) -> None:
    teacher, student = (m.cuda() for m in make_models(torch.bfloat16))
    ema = TeacherEMA(teacher, student, backend=backend, **layout)
    m = torch.tensor(0.99, device=CUDA)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ema.update(m)  # warm-up outside the capture, as CUDA graphs require
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema.update(m)
    for value in (0.5, 0.0):
        m.fill_(value)
        want = expected_teacher(teacher, student, value)
        graph.replay()
        torch.cuda.synchronize()
        assert_teacher(teacher, want)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_vit_small_dino_parameter_set(backend) -> None:
    # The anchor set: 158 tensors, 44.0M parameters, list mode and fully packed mode.
    shapes = bench_ema.vit_dino_shapes()
    teacher = bench_ema.ParameterSet(shapes, torch.float32, CUDA, seed=0)
    student = bench_ema.ParameterSet(shapes, torch.float32, CUDA, seed=1)
    want = expected_teacher(teacher, student, 0.996)
    ema_update_(teacher.parameters(), student.parameters(), 0.996, backend=backend)
    assert_teacher(teacher, want)
    ema = TeacherEMA(teacher, student, flat=True, pack_student=True, backend=backend)
    want = expected_teacher(teacher, student, 0.996)
    ema.update(torch.tensor(0.996, device=CUDA))
    assert_teacher(teacher, want)
