"""The training loop: step semantics against the official main_dino.py, exact resume, non-finite
stop, checkpoint compatibility, the CLI, and a 2-process gloo run on real photographs.

Every run uses the ``smoke`` preset (ViT-tiny/16 on 32 px global / 16 px local crops, a 256-way
head, 4 images per process): the smallest model with the real depth, so each step takes tens of
milliseconds on the CI CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino_fast.checkpoint import load_checkpoint
from dino_fast.models import CpuSyncBatchNorm
from dino_fast.official.training import clip_gradients as official_clip_gradients
from dino_fast.ops.loss import DINOLoss
from dino_fast.output_lock import LOCK_NAME
from dino_fast.train import (
    ConfigError,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    build_dino_model,
    clip_gradients_,
    get_params_groups,
    main,
    train,
)
from dino_fast.train import loop as loop_module
from dino_fast.train import run as run_module
from dino_fast.train import trainer as trainer_module
from tests.helpers.photos import photo_folder
from tests.helpers.processes import run_python

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: one thread is as fast as two, and far faster when the CI machine's
    # cores are shared (OpenMP threads spin while they wait for each other).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smoke(tmp_path: Path, **overrides) -> TrainConfig:
    values = {"data": "synthetic", "output_dir": str(tmp_path / "run"), "device": "cpu", "seed": 3}
    values.update(overrides)
    return TrainConfig.from_preset("smoke", **values)


def make_trainer(config: TrainConfig, steps_per_epoch: int = 4) -> Trainer:
    return Trainer(config, torch.device("cpu"), steps_per_epoch=steps_per_epoch)


def synthetic_batch(config: TrainConfig, seed: int = 0):
    from dino_fast.data import MultiCropBatch

    g = torch.Generator().manual_seed(seed)
    b = config.batch_size_per_gpu
    G, lsz = config.global_crops_size, config.local_crops_size
    return MultiCropBatch(
        torch.randn(2 * b, 3, G, G, generator=g),
        torch.randn(config.local_crops_number * b, 3, lsz, lsz, generator=g),
    )


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def test_param_groups_are_official():
    # Official get_params_groups: no weight decay for names ending in ".bias" or 1-D tensors,
    # frozen parameters (the weight-normalized last layer's g) left out.
    model = build_dino_model(TrainConfig.from_preset("smoke"), drop_path_rate=0.0)
    regularized, plain = get_params_groups(model)
    assert plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    for p in regularized["params"]:
        assert p.ndim > 1 and not names[id(p)].endswith(".bias")
    for p in plain["params"]:
        assert p.ndim == 1 or names[id(p)].endswith(".bias")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(regularized["params"]) + len(plain["params"]) == len(trainable)
    assert any(n.endswith("pos_embed") for n in (names[id(p)] for p in regularized["params"]))


def test_teacher_starts_as_student_copy_without_grad(tmp_path):
    t = make_trainer(smoke(tmp_path))
    s_state, t_state = t.student.state_dict(), t.teacher.state_dict()
    assert s_state.keys() == t_state.keys()
    assert all(torch.equal(s_state[k], t_state[k]) for k in s_state)
    assert not any(p.requires_grad for p in t.teacher.parameters())
    # Official: the teacher is built without stochastic depth, so in train mode (the official
    # teacher is never put in eval mode) two calls agree while the student's drop path does not.
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(t.teacher(x), t.teacher(x))
        assert not torch.equal(t.student(x), t.student(x))


@pytest.mark.parametrize(
    ("clip_grad_mode", "clip_grad"),
    [("per_param", 0.5), ("global", 0.05)],  # thresholds that bite: on some parameters / on the total
)
def test_step_matches_official_update(tmp_path, clip_grad_mode, clip_grad):
    """One step against the official sequence written out by hand: schedules, the clip (per
    parameter, or of the global norm), then the frozen last layer's gradient dropped, AdamW with
    the two parameter groups, EMA."""
    cfg = smoke(tmp_path, drop_path_rate=0.0, clip_grad=clip_grad, clip_grad_mode=clip_grad_mode, lr=0.3)
    t = make_trainer(cfg)
    ref_student = copy.deepcopy(t.student)
    ref_teacher = copy.deepcopy(t.teacher)
    ref_loss = copy.deepcopy(t.dino_loss)
    batch = synthetic_batch(cfg)
    it = 2  # inside the warmup, epoch 0: the last layer is frozen
    s = t.schedules.at(it)
    loss = t.step(batch, it)

    groups = get_params_groups(ref_student)
    opt = torch.optim.AdamW(groups, foreach=False)
    for i, g in enumerate(opt.param_groups):
        g["lr"] = s.lr
        if i == 0:
            g["weight_decay"] = s.weight_decay
    teacher_out = ref_teacher(batch.global_crops)
    student_out = ref_student(batch.global_crops, batch.local_crops)
    expected_loss = ref_loss(student_out, teacher_out, s.epoch)
    expected_loss.backward()
    grads = [p.grad for p in ref_student.parameters() if p.grad is not None]
    norms = [torch.linalg.vector_norm(g) for g in grads]
    if clip_grad_mode == "per_param":
        assert any(n > clip_grad for n in norms) and any(n < clip_grad for n in norms)
        for g, norm in zip(grads, norms, strict=True):
            coef = clip_grad / (norm + 1e-6)
            if coef < 1:
                g.mul_(coef)
    else:
        total = torch.linalg.vector_norm(torch.stack(norms))
        assert total > clip_grad
        for g in grads:
            g.mul_(clip_grad / (total + 1e-6))
    for n, p in ref_student.named_parameters():
        if "last_layer" in n:
            p.grad = None
    opt.step()
    with torch.no_grad():
        for pt, ps in zip(ref_teacher.parameters(), ref_student.parameters(), strict=True):
            pt.mul_(s.momentum).add_((1 - s.momentum) * ps)

    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(t.student.named_parameters(), ref_student.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"student {name}")
    for (name, a), b in zip(t.teacher.named_parameters(), ref_teacher.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"teacher {name}")
    torch.testing.assert_close(t.dino_loss.center, ref_loss.center)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clip_gradients_equals_the_official_rule_bitwise(dtype):
    gen = torch.Generator().manual_seed(1)
    shapes = [(7, 5), (5,), (3, 5), (3,), (2, 3), (4, 4), (6,)]
    # above, below and near the threshold, an all-zero gradient, one with inf, one with nan, none
    scales = [10.0, 0.01, 1.0, 0.0, 1.0, 1.0, None]
    ours = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in shapes]
    for p, scale in zip(ours, scales, strict=True):
        if scale is not None:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype) * scale
    ours[4].grad[0, 1] = float("inf")
    ours[5].grad[2, 2] = float("nan")
    theirs = torch.nn.ParameterList(torch.nn.Parameter(p.detach().clone()) for p in ours)
    for p, q in zip(theirs, ours, strict=True):
        p.grad = None if q.grad is None else q.grad.clone()

    official_clip_gradients(theirs, 3.0)
    clip_gradients_(ours, 3.0)
    for p, q in zip(theirs, ours, strict=True):
        if p.grad is None:
            assert q.grad is None
        else:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, equal_nan=True)
    assert ours[0].grad.norm() <= 3.0 and ours[1].grad.norm() < 0.1  # clipped; left alone


def test_clip_gradients_never_reads_a_value_on_the_host():
    # Meta tensors have no values: any .item() or Python comparison of a norm would raise here.
    params = [torch.nn.Parameter(torch.empty(shape, device="meta")) for shape in [(4, 3), (3,), (2, 2)]]
    for p in params:
        p.grad = torch.empty_like(p)
    clip_gradients_(params, 3.0)


def test_clip_grad_mode_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="--clip_grad_mode 'norm': choose per_param"):
        smoke(tmp_path, clip_grad_mode="norm").validate()


def test_batchnorm_head_trains_in_one_process(tmp_path):
    # Converted as official (on a CPU to CpuSyncBatchNorm); without a process group it normalizes
    # over the batch.
    cfg = smoke(tmp_path, use_bn_in_head=True, lr=0.05)
    t = make_trainer(cfg)
    assert any(isinstance(m, CpuSyncBatchNorm) for m in t.student.head.modules())
    assert t.teacher_ddp is t.teacher  # DDP only under a process group
    before = state_of(t.student)
    loss = t.step(synthetic_batch(cfg), 5)
    assert torch.isfinite(loss)
    after = t.student.state_dict()
    assert not torch.equal(before["head.mlp.1.weight"], after["head.mlp.1.weight"])  # BN affine trains
    assert not torch.equal(before["head.mlp.1.running_mean"], after["head.mlp.1.running_mean"])


@pytest.mark.parametrize("center_momentum", [0.0, 0.5])  # batch centering (the demo's), and a blend
def test_center_momentum_comes_from_the_config(tmp_path, center_momentum):
    cfg = smoke(tmp_path, precision="fp32", center_momentum=center_momentum)
    t = make_trainer(cfg)
    teacher = copy.deepcopy(t.teacher)
    previous = torch.randn_like(t.dino_loss.center)
    t.dino_loss.center.copy_(previous)
    batch = synthetic_batch(cfg)
    t.step(batch, 0)
    with torch.no_grad():
        batch_center = teacher(batch.global_crops).mean(0, keepdim=True)
    expected = center_momentum * previous + (1 - center_momentum) * batch_center
    torch.testing.assert_close(t.dino_loss.center, expected, rtol=1e-5, atol=1e-6)


def test_sinkhorn_knopp_step_takes_its_loss_at_the_epochs_temperature_learns_and_never_moves_the_center(
    tmp_path,
):
    # Teacher temperatures 0.02, 0.03, 0.04, 0.04 over the 4 epochs; the steps run from epoch 1, past
    # the learning-rate warmup and the frozen last layer. No drop path: the step's outputs are known.
    cfg = smoke(
        tmp_path, teacher_centering="sinkhorn_knopp", epochs=4, warmup_teacher_temp=0.02,
        warmup_teacher_temp_epochs=3, drop_path_rate=0.0, lr=0.005,
    )  # fmt: skip
    t = make_trainer(cfg, steps_per_epoch=2)
    batch = synthetic_batch(cfg)
    with torch.no_grad():
        teacher_output = t.teacher(batch.global_crops)
        student_output = t.student(batch.global_crops, batch.local_crops)
    schedule = (cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs, cfg.epochs)
    want = DINOLoss(cfg.out_dim, cfg.ncrops, *schedule, teacher_centering="sinkhorn_knopp")
    dino_v1 = DINOLoss(cfg.out_dim, cfg.ncrops, *schedule)(student_output, teacher_output, 1)
    losses = [t.step(batch, iteration) for iteration in range(2, 8)]  # the same batch, 6 times
    torch.testing.assert_close(losses[0], want(student_output, teacher_output, 1), rtol=1e-5, atol=0)
    assert not torch.allclose(losses[0], dino_v1, rtol=1e-2)
    assert all(torch.isfinite(loss) for loss in losses)
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
    assert torch.equal(t.dino_loss.center, torch.zeros(1, cfg.out_dim))


def test_last_layer_frozen_only_during_freeze_epochs(tmp_path):
    cfg = smoke(tmp_path, norm_last_layer=False, freeze_last_layer=1, lr=0.5)
    t = make_trainer(cfg, steps_per_epoch=2)
    last = [p for n, p in t.student.named_parameters() if "last_layer" in n]
    before = [p.detach().clone() for p in last]
    t.step(synthetic_batch(cfg, 0), 1)  # epoch 0
    assert all(torch.equal(a, b) for a, b in zip(last, before, strict=True))
    t.step(synthetic_batch(cfg, 1), 2)  # epoch 1
    assert all(not torch.equal(a, b) for a, b in zip(last, before, strict=True))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])  # autocast paths; fp16 adds the GradScaler
def test_mixed_precision_step_runs_and_learns(tmp_path, precision):
    cfg = smoke(tmp_path, precision=precision, lr=0.05)
    t = make_trainer(cfg)
    assert (t.scaler is not None) == (precision == "fp16")
    before = state_of(t.student)
    loss = t.step(synthetic_batch(cfg), 5)
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in t.student.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Runs, checkpoints, resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher_centering", ["center", "sinkhorn_knopp"])
def test_resume_is_exact(tmp_path, teacher_centering):
    """6 steps straight == 3 steps, stop, resume, 3 more (mid-epoch stop, crossing the epoch where
    the last layer unfreezes; drop path on, so the RNG state must be restored too)."""
    run = dict(teacher_centering=teacher_centering)
    straight = train(smoke(tmp_path, output_dir=str(tmp_path / "a"), max_steps=6, **run))
    first = train(smoke(tmp_path, output_dir=str(tmp_path / "b"), max_steps=3, **run))
    assert first.iteration == 3 and load_checkpoint(first.checkpoint)["iteration"] == 3
    resumed = train(smoke(tmp_path, output_dir=str(tmp_path / "b"), max_steps=6, **run))
    assert resumed.iteration == 6
    for name in ("student", "teacher"):
        a = getattr(straight.trainer, name).state_dict()
        b = getattr(resumed.trainer, name).state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k} differs after resume"
    assert torch.equal(straight.trainer.dino_loss.center, resumed.trainer.dino_loss.center)
    sa, sb = straight.trainer.optimizer.state_dict(), resumed.trainer.optimizer.state_dict()
    for k in sa["state"]:
        assert torch.equal(sa["state"][k]["exp_avg"], sb["state"][k]["exp_avg"])


def test_a_run_resumed_with_another_teacher_centering_continues_and_keeps_the_center(tmp_path):
    """Switching --teacher_centering on resume is allowed: sinkhorn_knopp keeps the center a DINO v1
    run saved, unused, and a DINO v1 run resumed after it continues from that center."""
    out = str(tmp_path / "run")
    v1 = train(smoke(tmp_path, output_dir=out, max_steps=2))
    saved_center = load_checkpoint(v1.checkpoint)["dino_loss"]["center"]
    assert saved_center.abs().sum() > 0
    sinkhorn = train(smoke(tmp_path, output_dir=out, max_steps=3, teacher_centering="sinkhorn_knopp"))
    ckpt = load_checkpoint(sinkhorn.checkpoint)
    assert ckpt["iteration"] == 3 and ckpt["args"]["teacher_centering"] == "sinkhorn_knopp"
    assert torch.equal(ckpt["dino_loss"]["center"], saved_center)
    back = train(smoke(tmp_path, output_dir=out, max_steps=4))
    assert back.iteration == 4 and back.trainer.dino_loss.teacher_centering == "center"
    assert not torch.equal(load_checkpoint(back.checkpoint)["dino_loss"]["center"], saved_center)


def test_checkpoint_is_official_compatible(tmp_path):
    result = train(smoke(tmp_path, max_steps=4, saveckp_freq=1))
    path = result.checkpoint
    ckpt = torch.load(path, weights_only=True)  # what torch.load does by default today
    for key in ("student", "teacher", "optimizer", "epoch", "args", "dino_loss"):
        assert key in ckpt
    assert "fp16_scaler" not in ckpt  # only with fp16, as in the official code
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 4
    assert all(k.startswith("module.") for k in ckpt["student"])  # the official DDP student's keys
    assert ckpt["dino_loss"]["center"].shape == (1, 256)
    assert (result.output_dir / "checkpoint0000.pth").is_file()  # saveckp_freq copy of epoch 0
    # The official eval scripts: strip "module." and "backbone.", load non-strictly into a bare ViT.
    from dino_fast import models

    vit = models.vit_tiny(patch_size=16)
    state = {k.replace("module.", "").replace("backbone.", ""): v for k, v in ckpt["teacher"].items()}
    missing, _unexpected = vit.load_state_dict(state, strict=False)
    assert missing == []
    teacher_backbone = result.trainer.teacher.backbone.state_dict()
    assert all(torch.equal(vit.state_dict()[k], teacher_backbone[k]) for k in teacher_backbone)
    # Logs: one JSON record per interval with every field, one official line per epoch.
    records = [json.loads(line) for line in (result.output_dir / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    for field in ("loss", "lr", "wd", "momentum", "teacher_temp", "images_per_s", "gpu_mem_gib"):
        assert field in records[0]
    epoch_log = [json.loads(line) for line in (result.output_dir / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in epoch_log] == [0] and "train_loss" in epoch_log[0]


def test_time_based_checkpoints_mid_epoch(tmp_path, monkeypatch):
    saved: list[int] = []
    real_save = loop_module.atomic_save

    def spy(state, path):
        saved.append(state["iteration"])
        return real_save(state, path)

    monkeypatch.setattr(loop_module, "atomic_save", spy)
    # A deadline that is always due: rank 0 raises the flag with each snapshot, every rank sees
    # it one interval later and saves there (then the deadline restarts).
    train(smoke(tmp_path, ckpt_minutes=1e-9, log_interval=1, max_steps=4))
    assert saved[0] == 2  # flagged with the snapshot after step 1, acted on after step 2
    assert saved[-1] == 4 and saved == sorted(set(saved))


class _PoisonedLoader:
    """Wraps a loader and turns the crops of one global iteration into NaN."""

    def __init__(self, inner, poison_iteration: int) -> None:
        self.inner, self.poison, self.epoch = inner, poison_iteration, 0
        self.dataset_size = inner.dataset_size

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if self.epoch * len(self) + i == self.poison:
                batch.global_crops.fill_(float("nan"))
            yield batch


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_build = run_module.build_loader
    monkeypatch.setattr(run_module, "build_loader", lambda *a, **k: _PoisonedLoader(real_build(*a, **k), 5))
    cfg = smoke(tmp_path, log_interval=100)  # the interval read is not what catches it: the epoch end is
    with pytest.raises(NonFiniteLossError, match="non-finite") as exc:
        train(cfg)
    assert "iterations 4-" in str(exc.value)
    ckpt = load_checkpoint(Path(cfg.output_dir) / "checkpoint.pth")
    assert ckpt["iteration"] == 4  # the end of epoch 0, before the poisoned step
    assert all(torch.isfinite(v).all() for v in ckpt["teacher"].values())
    # Nothing else written: no temporary left behind (the run's lock file stays, hidden).
    assert sorted(os.listdir(cfg.output_dir)) == [LOCK_NAME, "checkpoint.pth", "log.jsonl", "log.txt"]


def test_nonfinite_weights_are_never_saved_and_the_last_good_checkpoint_is_named(tmp_path, monkeypatch):
    cfg = smoke(tmp_path, max_steps=4, log_interval=100)
    train(cfg)  # a good checkpoint at iteration 4
    real_step = trainer_module.Trainer.step

    def step_then_poison(self, batch, iteration):
        loss = real_step(self, batch, iteration)
        if iteration == 4:  # the update after this step's (finite) loss breaks the weights
            next(self.student.parameters()).data.fill_(float("nan"))
        return loss

    monkeypatch.setattr(trainer_module.Trainer, "step", step_then_poison)
    with pytest.raises(
        NonFiniteLossError, match=r"weights became non-finite .* by iteration 5; nothing was saved"
    ) as exc:
        train(dataclasses.replace(cfg, max_steps=5))
    assert f"{Path(cfg.output_dir) / 'checkpoint.pth'} (iteration 4), was not overwritten" in str(exc.value)
    ckpt = load_checkpoint(Path(cfg.output_dir) / "checkpoint.pth")
    assert ckpt["iteration"] == 4 and all(torch.isfinite(v).all() for v in ckpt["student"].values())


@pytest.mark.parametrize("flag", ["lr", "min_lr", "teacher_temp"])
def test_non_finite_numbers_are_refused_by_name(tmp_path, flag):
    with pytest.raises(ConfigError, match=rf"--{flag} nan: give a finite number"):
        smoke(tmp_path, **{flag: float("nan")}).validate()


def test_nonfinite_loss_caught_at_log_interval(tmp_path, monkeypatch):
    real_build = run_module.build_loader
    monkeypatch.setattr(run_module, "build_loader", lambda *a, **k: _PoisonedLoader(real_build(*a, **k), 0))
    cfg = smoke(tmp_path, log_interval=1)
    with pytest.raises(NonFiniteLossError):
        train(cfg)
    # Read one interval late, it stops at iteration 2 at the latest; nothing was ever saved.
    assert not (Path(cfg.output_dir) / "checkpoint.pth").exists()


def test_full_disk_stops_with_a_clear_error_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["--preset", "smoke", "--data", "synthetic", "--device", "cpu", "--output_dir", str(out)]
    assert main([*argv, "--max_steps", "2"]) == 0

    def full_disk_save(obj, f, *args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr("dino_fast.checkpoint.torch.save", full_disk_save)
    assert main([*argv, "--max_steps", "4"]) == 1
    stderr = capsys.readouterr().err  # the command's one error line (dino_fast.errors.run_command)
    assert "previous checkpoint.pth is intact" in stderr
    assert "resumes from the last checkpoint" in stderr
    assert load_checkpoint(out / "checkpoint.pth")["iteration"] == 2
    assert sorted(os.listdir(out)) == [LOCK_NAME, "checkpoint.pth", "log.jsonl"]  # no temporary left behind


def _one_error_line(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize("damage", [b"", b"not a checkpoint", "truncated"])
def test_resuming_a_damaged_checkpoint_is_one_line_saying_how_to_start_over(tmp_path, capsys, damage):
    out = tmp_path / "run"
    argv = ["--preset", "smoke", "--data", "synthetic", "--device", "cpu", "--output_dir", str(out)]
    assert main([*argv, "--max_steps", "1"]) == 0
    data = (out / "checkpoint.pth").read_bytes()
    (out / "checkpoint.pth").write_bytes(data[: len(data) // 3] if damage == "truncated" else damage)
    capsys.readouterr()
    assert main([*argv, "--max_steps", "2"]) == 1
    line = _one_error_line(capsys)
    assert "cannot resume: checkpoint" in line and "--no-resume" in line
    assert main([*argv, "--max_steps", "1", "--no-resume"]) == 0  # the way out it names works


def test_resuming_with_other_model_flags_names_each_flag_and_both_values(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--preset", "smoke", "--data", "synthetic", "--device", "cpu", "--output_dir", str(out)]
    assert main([*argv, "--max_steps", "1"]) == 0
    capsys.readouterr()
    assert main([*argv, "--max_steps", "2", "--out_dim", "512", "--patch_size", "8"]) == 1
    line = _one_error_line(capsys)
    assert "trained with --patch_size 16 --out_dim 256" in line
    assert "asks for --patch_size 8 --out_dim 512" in line and "another --output_dir" in line


def test_a_second_run_on_a_busy_output_dir_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--preset", "smoke", "--data", "synthetic", "--device", "cpu", "--output_dir", str(out)]
    holder = subprocess.Popen(  # another run holds the folder
        [sys.executable, "-c", HOLD_OUTPUT_DIR, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main([*argv, "--max_steps", "1"]) == 1
    finally:
        holder.kill()
        holder.wait()
    assert f"in use by another run (pid {holder.pid} on" in _one_error_line(capsys)
    assert not (out / "checkpoint.pth").exists()


HOLD_OUTPUT_DIR = """
import sys, time
from dino_fast.output_lock import exclusive_output_dir
with exclusive_output_dir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_stale_temporaries_of_a_killed_write_are_removed_at_start(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.pth.tmp.4242").write_bytes(b"x" * 1000)  # what kill -9 mid-write leaves
    train(smoke(tmp_path, output_dir=str(out), max_steps=1))
    assert not (out / ".checkpoint.pth.tmp.4242").exists()
    assert "removed 1 temporary file(s) of interrupted checkpoint writes" in caplog.text


def test_an_output_dir_under_a_read_only_parent_is_one_line(capsys):
    # sysfs refuses new folders even to root, which CI runs as.
    argv = [
        "--preset",
        "smoke",
        "--data",
        "synthetic",
        "--device",
        "cpu",
        "--output_dir",
        "/sys/dino_fast_run",
    ]
    assert main(argv) == 1
    assert "cannot write to --output_dir /sys/dino_fast_run" in _one_error_line(capsys)


def test_too_few_images_for_one_step_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="fewer than batch_size"):
        train(smoke(tmp_path, synthetic_size=3))  # 3 images, 4 per step


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_cli_missing_data_path_is_a_clear_error(tmp_path):
    proc = run_python(["-m", "dino_fast.train", "--preset", "smoke", "--data_path", str(tmp_path / "nope")])
    assert proc.returncode == 2
    assert "is not a directory" in proc.stderr and "--data synthetic" in proc.stderr


@pytest.mark.slow
def test_torchrun_two_process_gloo_on_real_photos(tmp_path):
    data = photo_folder(tmp_path / "photos" / "train")
    shutil.copytree(data, tmp_path / "photos" / "test")  # the split --eval_knn looks for beside train/
    out = tmp_path / "out"
    proc = run_python(
        [
            "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "dino_fast.train", "--preset", "smoke", "--data", "torchvision",
            "--data_path", str(data), "--output_dir", str(out), "--device", "cpu", "--epochs", "2",
            "--eval_knn",
        ],
        timeout=420,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es)" in proc.stderr and "gloo" in proc.stderr
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    # 29 photos over 2 ranks: ceil(29/2) = 15 per rank, 3 full batches of 4 per epoch.
    assert ckpt["steps_per_epoch"] == 3 and ckpt["iteration"] == 6 and ckpt["epoch"] == 2
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    # Each rank drew its own drop-path randomness.
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    assert all(torch.isfinite(v).all() for v in ckpt["teacher"].values())
    assert "checkpoint:" in proc.stdout
    # The k-NN hook ran on both ranks (sharded feature extraction) and rank 0 printed it.
    assert "k-NN top-1 (k=20)" in proc.stdout and "vs random init" in proc.stdout
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["iteration"] == 5 and all(isinstance(r["loss"], float) for r in records)
