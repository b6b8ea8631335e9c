"""The linear probe's classifier: the official linear layer, its accuracies on frozen features,
and its saved weights (ours or the official ``eval_linear.py``'s)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from dino_fast.eval.weights import CheckpointError, read_checkpoint


class LinearClassifier(nn.Module):
    """One linear layer on flattened features (official initialization)."""

    def __init__(self, dim: int, num_labels: int = 1000) -> None:
        super().__init__()
        if dim < 1 or num_labels < 1:
            raise ValueError(f"LinearClassifier needs dim >= 1 and num_labels >= 1, got {dim}, {num_labels}")
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


@torch.no_grad()
def accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is among the ``k`` highest logits, per k (tensors, no sync)."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hits = pred == target[:, None]
    return [hits[:, : min(k, maxk)].any(dim=1).sum() for k in topk]


def _unwrap(module: nn.Module) -> LinearClassifier:
    inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
    assert isinstance(inner, LinearClassifier)
    return inner


@torch.no_grad()
def evaluate_classifier(
    classifier: nn.Module, val_features: torch.Tensor, val_labels: torch.Tensor, batch_size: int = 1024
) -> tuple[float, float | None, float]:
    """(top-1, top-5 or None, mean loss) of ``classifier`` on precomputed features."""
    classifier.eval()
    num_labels = _unwrap(classifier).num_labels
    device = next(classifier.parameters()).device
    c1 = torch.zeros((), dtype=torch.long, device=device)
    c5 = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, val_features.shape[0], batch_size):
        x = val_features[start : start + batch_size].to(device)
        y = val_labels[start : start + batch_size].to(device)
        logits = classifier(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        a1, a5 = accuracy(logits, y, (1, 5))
        c1 += a1
        c5 += a5
    n = val_features.shape[0]
    top5 = float(c5) * 100.0 / n if num_labels >= 5 else None
    return float(c1) * 100.0 / n, top5, float(loss_sum) / n


def strip_ddp_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without DDP's ``module.`` prefixes (the official script saves the wrapped layer)."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_linear_weights(classifier: LinearClassifier, path: str | os.PathLike[str]) -> None:
    """Load a linear layer saved by this script or by the official one (``module.`` prefixes)."""
    blob = read_checkpoint(path)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    state = strip_ddp_prefix(dict(state))
    own = classifier.state_dict()
    bad = {
        k: (tuple(v.shape), tuple(own[k].shape))
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    }
    if set(state) != set(own) or bad:
        raise CheckpointError(
            f"{path} does not hold a linear layer for this probe: keys {sorted(state)} "
            f"(expected {sorted(own)}), "
            f"shape mismatches (found, expected): {bad}. Check --n_last_blocks/--avgpool_patchtokens/--arch."
        )
    classifier.load_state_dict(state)
