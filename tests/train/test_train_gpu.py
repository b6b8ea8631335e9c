"""GPU checks of the training step (run by benchmarks/gpu_check.sh on a lent GPU machine):
no host sync inside the step or the metric snapshot, bf16/fp16 paths, exact-in-distribution
resume on CUDA, and --compile agreeing with eager."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dino_fast.train import TrainConfig, Trainer, train
from dino_fast.train.metrics import AsyncMetrics

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def gpu_config(tmp_path, **overrides) -> TrainConfig:
    # ViT-tiny/16 with real 224/96 crops and 4 local crops: small enough to be quick, large
    # enough that the attention, fused loss and EMA kernels run their GPU paths.
    values = {
        "data": "synthetic",
        "device": "cuda",
        "global_crops_size": 224,
        "local_crops_size": 96,
        "local_crops_number": 4,
        "batch_size_per_gpu": 16,
        "out_dim": 4096,
        "precision": "bf16",
        "synthetic_size": 64,
        "output_dir": str(tmp_path / "run"),
        "seed": 5,
    }
    values.update(overrides)
    return TrainConfig.from_preset("smoke", **values)


def batch_for(config: TrainConfig, seed: int = 0):
    from dino_fast.data import MultiCropBatch

    g = torch.Generator(device=CUDA).manual_seed(seed)
    b, G, lsz = config.batch_size_per_gpu, config.global_crops_size, config.local_crops_size
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        config.resolved_precision()
    ]
    return MultiCropBatch(
        torch.randn(2 * b, 3, G, G, generator=g, device=CUDA, dtype=dtype),
        torch.randn(config.local_crops_number * b, 3, lsz, lsz, generator=g, device=CUDA, dtype=dtype),
    )


@pytest.mark.parametrize(
    ("precision", "clip_grad_mode"),
    [("bf16", "per_param"), ("fp16", "per_param"), ("fp32", "per_param"), ("bf16", "global")],
)
def test_step_has_no_host_sync(tmp_path, precision, clip_grad_mode):
    # Clipping on (under fp16 after the GradScaler's unscale_); the step computes every
    # coefficient on the device whether or not a norm exceeds the threshold.
    cfg = gpu_config(tmp_path, precision=precision, clip_grad=0.5, clip_grad_mode=clip_grad_mode)
    trainer = Trainer(cfg, CUDA, steps_per_epoch=4)
    metrics = AsyncMetrics(CUDA, cfg.batch_size_per_gpu)
    batch = batch_for(cfg)
    metrics.start(0)
    metrics.accumulate(trainer.step(batch, 0))  # first call: lazy initializations may sync
    metrics.snapshot(0)
    metrics.collect()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for it in (1, 5):  # epoch 0 (last layer frozen) and epoch 1
            metrics.accumulate(trainer.step(batch, it))
        metrics.snapshot(5)  # the async read is started without waiting
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats = metrics.collect()
    assert stats.nonfinite == 0 and stats.steps == 2


def test_resume_continues_the_run_on_cuda(tmp_path):
    """Straight vs stop-and-resume on CUDA: GPU kernels are not bit-reproducible run to run, so the
    parameter *updates* must agree to 1% (a wrong iteration, data position or drop-path RNG after
    the resume changes them completely)."""
    base = dict(max_steps=6, drop_path_rate=0.1, lr=0.05)
    init = Trainer(gpu_config(tmp_path, **base), CUDA, steps_per_epoch=4)
    start = {k: v.detach().float().clone() for k, v in init.student.state_dict().items()}
    del init
    a = train(gpu_config(tmp_path, output_dir=str(tmp_path / "a"), **base))
    train(gpu_config(tmp_path, output_dir=str(tmp_path / "b"), **{**base, "max_steps": 3}))
    b = train(gpu_config(tmp_path, output_dir=str(tmp_path / "b"), **base))
    sa, sb = a.trainer.student.state_dict(), b.trainer.student.state_dict()
    num = den = 0.0
    for k, v in start.items():
        da, db = sa[k].float() - v, sb[k].float() - v
        num += float((da - db).square().sum())
        den += float(da.square().sum())
    assert den > 0 and (num / den) ** 0.5 < 0.01


def test_compile_matches_eager(tmp_path):
    cfg = gpu_config(tmp_path, drop_path_rate=0.0)
    eager = Trainer(cfg, CUDA, steps_per_epoch=4)
    compiled = Trainer(dataclasses.replace(cfg, compile=True), CUDA, steps_per_epoch=4)
    for it in range(3):
        batch = batch_for(cfg, seed=it)
        le = eager.step(batch, it)
        lc = compiled.step(batch, it)
        torch.testing.assert_close(lc.float(), le.float(), rtol=2e-2, atol=2e-2)
    for (name, a), b in zip(eager.teacher.named_parameters(), compiled.teacher.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3, msg=name)


def test_resnet50_step_runs_channels_last_with_cudnn_benchmark(tmp_path) -> None:
    config = gpu_config(
        tmp_path, arch="resnet50", optimizer="sgd", lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4
    )
    trainer = Trainer(config, CUDA, steps_per_epoch=4)
    assert torch.backends.cudnn.benchmark
    convs = [p for p in trainer.student.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.student.modules())
    before = trainer.student.backbone.conv1.weight.detach().clone()
    batch = batch_for(config)
    losses = [float(trainer.step(batch, it)) for it in range(1, 4)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert not torch.equal(before, trainer.student.backbone.conv1.weight)
    assert trainer.student.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
