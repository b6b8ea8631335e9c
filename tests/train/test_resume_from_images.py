"""A stopped and resumed run on a real image folder equals the uninterrupted run, step by step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dino_fast.train import TrainConfig, train
from tests.helpers.photos import photo_paths


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for photo in photo_paths()[:12]:  # 3 steps of 4 per epoch
        shutil.copy(photo, root / photo.name)
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    ("num_workers", "stop_at"),
    [(2, 3), (0, 4)],
    ids=["2 workers, at an epoch boundary", "in-process loading, mid-epoch"],
)
def test_resumed_run_on_images_repeats_every_loss_and_weight(
    tmp_path: Path, photo_folder: Path, num_workers: int, stop_at: int
) -> None:
    def config(run: str, max_steps: int) -> TrainConfig:
        return TrainConfig.from_preset(
            "smoke",
            data="torchvision",
            data_path=str(photo_folder),
            num_workers=num_workers,
            output_dir=str(tmp_path / run),
            device="cpu",
            seed=5,
            epochs=3,
            max_steps=max_steps,
        )

    straight = train(config("straight", 7))
    train(config("resumed", stop_at))
    resumed = train(config("resumed", 7))
    expected, got = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(got) == sorted(expected) == list(range(7))
    for iteration in range(7):  # drop path, the crops and the batches must all be the same
        assert got[iteration] == expected[iteration], f"loss of iteration {iteration} differs after resume"
    for name in ("student", "teacher"):
        a, b = getattr(straight.trainer, name).state_dict(), getattr(resumed.trainer, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ after resume"
