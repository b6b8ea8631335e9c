"""benchmarks/throughput.py and its official baseline (benchmarks/end_to_end/official_step.py).

The baseline must compute what the official DINO step computes (loss, clipping, EMA) and the
tuned variants must compute the same thing faster; the FLOP count behind MFU must be exact; the
script must run end to end on a CPU and report every variant, failed ones with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import throughput
from benchmarks.end_to_end import equal_loss, variants
from benchmarks.end_to_end import official_step as od
from benchmarks.end_to_end.flops import step_flops
from dino_fast.official import vision_transformer
from dino_fast.official.training import build_student_teacher

REPO = Path(__file__).resolve().parents[2]


def vit_test_2blocks(patch_size: int = 16, **kwargs: object) -> vision_transformer.VisionTransformer:
    """Tests of the step's logic and of the FLOP formula need every part, not twelve blocks: a
    2-block ViT built as the official vit_* are keeps them fast."""
    return vision_transformer.VisionTransformer(
        patch_size=patch_size,
        embed_dim=48,
        depth=2,
        num_heads=3,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        **kwargs,
    )


@pytest.fixture(autouse=True)
def _small_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Registered for each test, beside the official constructors (which stay untouched).
    monkeypatch.setattr(vision_transformer, "vit_test_2blocks", vit_test_2blocks, raising=False)


TINY = od.ModelSpec(arch="vit_tiny", patch_size=16, out_dim=256, drop_path_rate=0.0)


def small_spec(**overrides: object) -> od.ModelSpec:
    return od.ModelSpec(**{**dataclasses.asdict(TINY), "arch": "vit_test_2blocks", **overrides})


def crops(batch: int, n_local: int, global_size: int = 32, local_size: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch, 3, global_size, global_size, generator=gen) for _ in range(2)]
    return views + [torch.randn(batch, 3, local_size, local_size, generator=gen) for _ in range(n_local)]


# ---------------------------------------------------------------------------------------------
# FLOP count
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "global_size", "local_size", "n_local", "out_dim"),
    [
        (16, 32, 16, 2, 256),  # the tiny preset: 2x2 and 1x1 patch grids
        (8, 24, 16, 3, 97),  # odd grids (3x3, 2x2), an odd crop count and a prime K
        (16, 48, 32, 0, 64),  # no local crops: the student sees the global crops only
    ],
)
def test_flop_count_equals_torch_flop_counter(
    patch: int, global_size: int, local_size: int, n_local: int, out_dim: int
) -> None:
    batch = 2
    spec = small_spec(patch_size=patch, out_dim=out_dim)
    student, teacher = build_student_teacher(spec)
    views = crops(batch, n_local, global_size, local_size)
    with FlopCounterMode(display=False) as counter:
        student(views).sum().backward()
        teacher(views[:2])
    expected = step_flops(spec.arch, patch, global_size, local_size, n_local, out_dim)
    assert counter.get_total_flops() == expected["total"] * batch


def test_anchor_flop_count_against_design() -> None:
    flops = step_flops("vit_small", 16, 224, 96, 10, 65536)
    # docs/design.md's ~121 GFLOP/image is the transformer blocks alone (student fwd+bwd, teacher fwd).
    assert flops["blocks_only"] == pytest.approx(121e9, rel=0.01)
    # Patch embedding (~1.1 GFLOP) and the DINO head (~1.7, mostly the 256 x 65536 layer) add 2.3%.
    assert flops["total"] == pytest.approx(123.4e9, rel=0.005)
    assert flops["student_head"] + flops["teacher_head"] == pytest.approx(1.69e9, rel=0.01)


# ---------------------------------------------------------------------------------------------
# The official baseline's pieces
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [2, 37, 197])  # a local 16 px crop, a 96 px one, a 224 px one
def test_sdpa_attention_equals_explicit_attention(tokens: int) -> None:
    explicit = vision_transformer.Attention(48, 3, qkv_bias=True).double()
    sdpa = od.SDPAAttention(48, 3, qkv_bias=True).double()
    sdpa.load_state_dict(explicit.state_dict())
    x = torch.randn(3, tokens, 48, dtype=torch.float64)
    torch.testing.assert_close(sdpa(x)[0], explicit(x)[0], rtol=1e-12, atol=1e-12)


def test_official_student_loads_into_dino_fast_model_and_agrees() -> None:
    from dino_fast.train import TrainConfig, build_dino_model

    config = TrainConfig.from_preset(
        "vit_small_imagenet", arch="vit_tiny", out_dim=256, global_crops_size=32, local_crops_size=16
    )
    theirs = build_dino_model(config, drop_path_rate=0.0)
    student, _ = build_student_teacher(TINY)
    theirs.load_state_dict(student.state_dict())  # strict: identical names and shapes
    views = crops(3, 2)
    ours = student(views)
    torch.testing.assert_close(theirs(torch.cat(views[:2]), torch.cat(views[2:])), ours, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Whole steps
# ---------------------------------------------------------------------------------------------

HYPER = od.Hyper(lr=1e-3, weight_decay=0.04, momentum=0.9)


def run_steps(
    options: od.StepOptions, steps: int = 2, dtype: torch.dtype = torch.float32
) -> tuple[list[float], od.TrainStep]:
    state = od.official_state_dict(small_spec(), seed=3)
    step = od.TrainStep(small_spec(), options, state, torch.device("cpu"), ncrops=4, dtype=dtype)
    views = [v.to(dtype) for v in crops(2, 2, seed=4)]
    return [step.step(views, HYPER) for _ in range(steps)], step


def test_tuned_parts_compute_the_official_step() -> None:
    # Every tuned replacement at once, without autocast so that only the implementations differ:
    # SDPA, fused AdamW, sync-free clipping and the foreach EMA must give the official trajectory.
    # fp64, because Adam turns rounding noise in near-zero gradients (the key bias has an exactly
    # zero true gradient) into +-lr steps. A large lr and low EMA momentum make every part count.
    tuned_no_amp = dataclasses.replace(od.TUNED, amp_dtype=None)
    official_losses, official = run_steps(od.OFFICIAL_FP32, steps=3, dtype=torch.float64)
    tuned_losses, tuned = run_steps(tuned_no_amp, steps=3, dtype=torch.float64)
    assert official_losses[0] != official_losses[2]  # the steps did change the model
    torch.testing.assert_close(tuned_losses, official_losses, rtol=1e-10, atol=0)
    for module in ("student", "teacher"):
        ours = getattr(tuned, module).state_dict()
        for name, value in getattr(official, module).state_dict().items():
            torch.testing.assert_close(ours[name], value, rtol=1e-9, atol=1e-10, msg=f"{module}.{name}")
    torch.testing.assert_close(tuned.dino_loss.center, official.dino_loss.center)


def test_official_fp16_grad_scaler_path_runs_on_cpu() -> None:
    # The official precision (fp16 autocast + GradScaler, unscale before the clip) normally runs
    # on a GPU only; CPU autocast supports fp16, which exercises the same code here.
    fp32_losses, _ = run_steps(od.OFFICIAL_FP32, steps=1)
    fp16_losses, step = run_steps(od.OFFICIAL, steps=2)
    assert step.scaler is not None and step.scaler.get_scale() > 0
    assert fp16_losses[0] == pytest.approx(fp32_losses[0], rel=2e-3)
    assert all(torch.isfinite(torch.tensor(fp16_losses)))


def test_step_rejects_inconsistent_options() -> None:
    with pytest.raises(ValueError, match="GradScaler"):
        od.TrainStep(TINY, od.StepOptions(amp_dtype=torch.bfloat16), {}, torch.device("cpu"), ncrops=4)
    with pytest.raises(ValueError, match="attn_impl"):
        od.TrainStep(TINY, od.StepOptions(attn_impl="flash"), {}, torch.device("cpu"), ncrops=4)
    with pytest.raises(ValueError, match="unknown arch"):
        od.ModelSpec(arch="vit_huge")


# ---------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "cpu", "--data", "dali"], "needs --data_path"),
        (["--device", "cpu", "--data", "torchvision", "--data_path", "/no/such/dir"], "not a directory"),
        (["--device", "cpu", "--variants", "official", "nope"], "unknown variant"),
        (["--device", "cpu", "--variants", "official", "official"], "twice"),
        (["--device", "cpu", "--batch_size_per_gpu", "0"], "batch_size_per_gpu"),
        (["--device", "cpu", "--data_path", "/tmp"], "only used with --data dali"),
        (["--device", "cpu", "--arch", "vit_small", "resnet50"], "only with --mode inference"),
        (["--device", "cpu", "--image_size", "64"], "--image_size is only used with --mode inference"),
        (["--device", "cpu", "--mode", "inference", "--variants", "official"], "only used with --mode train"),
        (["--device", "cpu", "--mode", "inference", "--preset", "rn50"], "choose anchor, tiny"),
        (["--device", "cpu", "--mode", "inference", "--arch", "resnet18", "resnet18"], "twice"),
        (["--device", "cpu", "--arch", "resnet51"], "invalid choice"),
    ],
)
def test_cli_rejects_bad_input(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        throughput.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is missing")
def test_cli_cuda_without_gpu_says_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        throughput.parse_args(["--device", "cuda"])
    assert "--device cpu --preset tiny" in capsys.readouterr().err


def test_failed_and_mismatching_variants_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = variants.Variant("broken", "cannot be built", od.StepOptions(attn_impl="flash"))
    monkeypatch.setitem(variants.VARIANTS, "broken", broken)
    # A zero bf16 tolerance turns tuned's (correct) rounding differences into a mismatch.
    monkeypatch.setitem(equal_loss.CHECK_RTOL, "bf16", 0.0)
    out = tmp_path / "tiny.json"
    argv = ["--device", "cpu", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--json", str(out)]
    payload = throughput.main([*argv, "--variants", "official", "tuned", "broken"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    results = {r["name"]: r for r in payload["variants"]}
    assert list(results) == ["official", "tuned", "broken"]
    assert results["official"]["status"] == "ok" and results["official"]["ratio_vs_official"] == 1.0
    assert results["official"]["check"]["passed"]
    assert results["tuned"]["status"] == "failed" and "loss mismatch" in results["tuned"]["error"]
    assert "images_per_s" not in results["tuned"]  # a wrong step is not timed
    assert results["broken"]["status"] == "failed" and "attn_impl" in results["broken"]["error"]
    assert payload["all_ok"] is False and payload["complete"] is True


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["dali", "torchvision"])
def test_real_data_pipeline_feeds_the_timed_steps(pipeline: str, tmp_path: Path) -> None:
    from tests.helpers.photos import photo_folder

    photos = photo_folder(tmp_path / "photos", per_class=4)
    argv = ["--device", "cpu", "--preset", "tiny", "--steps", "1", "--warmup", "1", "--num_workers", "1"]
    payload = throughput.main(
        [*argv, "--data", pipeline, "--data_path", str(photos), "--variants", "dino_fast"]
    )
    (result,) = payload["variants"]
    assert result["status"] == "ok", result.get("error")
    assert result["check"]["passed"] and result["images_per_s"] > 0
    assert payload["config"]["data"] == pipeline and payload["config"]["data_path"] == str(photos)


@pytest.mark.slow
def test_cpu_tiny_run_reports_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--device", "cpu", "--preset", "tiny"]
    # The compiled variants are left to the GPU check: a cold inductor build on a 2-core CI
    # machine costs minutes per variant and would test the compiler more than this script.
    variants = ["official", "tuned", "dino_fast"]
    proc = subprocess.run(
        [*cmd, "--steps", "2", "--variants", *variants, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    payload = json.loads(out.read_text())
    results = {r["name"]: r for r in payload["variants"]}
    assert list(results) == variants, proc.stderr[-3000:]
    for name, r in results.items():
        if r["status"] == "ok":
            assert r["images_per_s"] > 0 and r["ms_per_step"] > 0 and r["steps"] == 2, name
            assert r["check"]["passed"], name
        else:
            assert r["status"] == "failed" and r["error"], name
    # The baseline, the tuned step and dino_fast's step must run and agree on the loss on a CPU.
    for name in ("official", "tuned", "dino_fast"):
        assert results[name]["status"] == "ok", (name, results[name].get("error"), proc.stderr[-3000:])
        assert results[name]["check"]["passed"], results[name]["check"]
    assert payload["environment"]["torch"] == torch.__version__
    assert payload["flops_per_image"]["total"] > 0
    assert (proc.returncode == 0) == payload["all_ok"]
    assert "vs official" in proc.stdout  # the table was printed


# ---------------------------------------------------------------------------------------------
# GPU (benchmarks/gpu_check.sh)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_tuned_parts_compute_the_official_step() -> None:
    # The CUDA kernels of the tuned parts (fused AdamW, foreach norm/mul/lerp, SDPA) against the
    # official loops, in fp64 as on the CPU.
    cuda = torch.device("cuda")
    results = {}
    for name, options in (
        ("official", od.OFFICIAL_FP32),
        ("tuned", dataclasses.replace(od.TUNED, amp_dtype=None)),
    ):
        state = od.official_state_dict(small_spec(), seed=3)
        step = od.TrainStep(small_spec(), options, state, cuda, ncrops=4, dtype=torch.float64)
        views = [v.to(cuda, torch.float64) for v in crops(2, 2, seed=4)]
        results[name] = ([step.step(views, HYPER) for _ in range(3)], step)
    (official_losses, official), (tuned_losses, tuned) = results["official"], results["tuned"]
    torch.testing.assert_close(tuned_losses, official_losses, rtol=1e-10, atol=0)
    for name, value in official.teacher.state_dict().items():
        torch.testing.assert_close(tuned.teacher.state_dict()[name], value, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.gpu
def test_gpu_small_run_times_every_precision(tmp_path: Path) -> None:
    # The official variant on CUDA is the real fp16 + GradScaler path; every variant must pass the
    # equal-loss check there and report memory (and MFU where the device is in the peak table).
    argv = ["--device", "cuda", "--preset", "tiny", "--steps", "3", "--json", str(tmp_path / "t.json")]
    payload = throughput.main([*argv, "--variants", "official", "tuned", "dino_fast", "dino_fast+fp16"])
    results = {r["name"]: r for r in payload["variants"]}
    for name, r in results.items():
        assert r["status"] == "ok", (name, r.get("error"))
        assert r["check"]["passed"] and r["peak_gib"] > 0, name
        assert (r["mfu"] is None) == (payload["peak_tflops"] is None)
    assert results["official"]["precision"] == "fp16" and results["tuned"]["precision"] == "bf16"
    assert payload["environment"]["device_type"] == "cuda"


class _HalvingScaler:
    """A GradScaler stand-in whose scale halves on every step (every update skipped)."""

    def __init__(self) -> None:
        self.scale = 65536.0

    def get_scale(self) -> float:
        return self.scale


class _StubRunner:
    def __init__(self, losses: list[float], scaler: _HalvingScaler | None) -> None:
        self.losses, self.grad_scaler, self.iterations = iter(losses), scaler, []

    def prepare(self, batch: object) -> object:
        return batch

    def step(self, prepared: object, iteration: int) -> float:
        self.iterations.append(iteration)
        if self.grad_scaler is not None:
            self.grad_scaler.scale /= 2
        return next(self.losses)


def test_check_compares_only_the_forward_after_a_skipped_fp16_update() -> None:
    ctx = type("Ctx", (), {"first_iteration": 1000})()
    # A skipped first update leaves the weights where they were, so only the first loss can match.
    runner = _StubRunner([5.0, 4.0], _HalvingScaler())
    losses, skipped = equal_loss.check_losses(runner, None, ctx)
    assert skipped and losses == [5.0, 4.0] and runner.iterations == [1000, 1001]
    check = equal_loss.compare(losses, [5.001, 5.5], "fp16", skipped)
    assert check["passed"] and check["compared_steps"] == 1
    # Without a scaler every step counts: the same losses then fail the check.
    losses, skipped = equal_loss.check_losses(_StubRunner([5.0, 4.0], None), None, ctx)
    assert not skipped and not equal_loss.compare(losses, [5.001, 5.5], "fp16", skipped)["passed"]
    assert not equal_loss.compare([5.0, float("nan")], [5.0, 5.0], "bf16", False)["passed"]
