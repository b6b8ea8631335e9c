"""The official DINOLoss module (dino_fast.official.loss) runs its two halves as the functions the
fp64 checks of dino_fast use: the epoch's teacher temperature, then the center update."""

from __future__ import annotations

import pytest
import torch

from dino_fast.official.loss import DINOLoss as OfficialDINOLoss
from dino_fast.official.loss import dino_loss as official_dino_loss
from dino_fast.official.loss import update_center as official_center_update


@pytest.mark.parametrize(
    ("batch", "ncrops", "dim"),
    [
        (1, 2, 33),  # smallest legal batch, globals only
        (3, 12, 1000),  # the anchor's crop count, odd batch
        (4, 5, 4099),  # odd local count, K not a multiple of any block size
    ],
)
def test_official_loss_and_center_match_formulas(batch: int, ncrops: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(ncrops)
    student = torch.randn(ncrops * batch, dim, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(2 * batch, dim, generator=gen, dtype=torch.float64) * 3
    # Epoch 1 of a 0.03 -> 0.05 warmup over 2 epochs: the schedule's second entry, 0.05.
    loss_fn = OfficialDINOLoss(dim, ncrops, 0.03, 0.05, 2, 3).double()
    loss_fn.center = torch.randn(1, dim, generator=gen, dtype=torch.float64)
    center = loss_fn.center.clone()
    loss = loss_fn(student, teacher, 1)
    expected = official_dino_loss(student, teacher, center, ncrops=ncrops, teacher_temp=0.05)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_fn.center, official_center_update(center, teacher, 0.9))
