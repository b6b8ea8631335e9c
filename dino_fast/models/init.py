"""Weight initialization as the official DINO code draws it, so that a seed gives its weights.

The official ``trunc_normal_`` (``utils.py``, the timm-era inverse-CDF method) fills a tensor with
one ``uniform_`` draw per element and maps it through ``erfinv``. ``torch.nn.init.trunc_normal_``
now rejection-samples, which draws a different number of values: same distribution, other
weights, and every later draw of the seeded stream shifted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["init_weights", "trunc_normal_"]


def trunc_normal_(
    tensor: Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0
) -> Tensor:
    """Fill ``tensor`` from N(mean, std²) truncated to [a, b] (absolute bounds, as official)."""

    def normal_cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    low, high = normal_cdf((a - mean) / std), normal_cdf((b - mean) / std)
    with torch.no_grad():
        tensor.uniform_(2 * low - 1, 2 * high - 1).erfinv_()
        return tensor.mul_(std * math.sqrt(2.0)).add_(mean).clamp_(min=a, max=b)


def init_weights(module: nn.Module) -> None:
    """The official ViT and head ``_init_weights``: linear weights ~ truncated N(0, 0.02²), zero
    biases, LayerNorm to the identity. For ``model.apply``, after construction."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)
    elif isinstance(module, nn.LayerNorm):
        nn.init.constant_(module.bias, 0)
        nn.init.constant_(module.weight, 1.0)
