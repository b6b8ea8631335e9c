"""The DINO projection head with official parameter names.

``torch.nn.utils.weight_norm`` (what the official head uses) is deprecated, and its replacement
``torch.nn.utils.parametrizations.weight_norm`` renames the parameters to
``parametrizations.weight.original0/1``. :class:`WeightNormLinear` instead owns the two
parameters under the official names ``weight_g`` ``(out, 1)`` and ``weight_v`` ``(out, in)`` and
computes ``W = g * v / ||v||`` (row norms) with the same op as both torch APIs
(``torch._weight_norm``), so official head state dicts load strictly, ours load into the official
head strictly, and nothing is renamed by hooks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_fast.models.init import init_weights

__all__ = ["DINOHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with a weight-normalized weight ``W[i] = g[i] * v[i] / ||v[i]||``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # nn.Linear's default init for v; g = 1 as the DINO head sets it after weight_norm.
        weight_v = nn.init.kaiming_uniform_(torch.empty(out_features, in_features), a=math.sqrt(5))
        # Registered g first, as weight_norm does: the official parameter order, which optimizer
        # state dicts index by.
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(weight_v)

    @property
    def weight(self) -> Tensor:
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class DINOHead(nn.Module):
    """MLP (``nlayers`` linear layers, GELU, optional BatchNorm) to ``bottleneck_dim``, L2
    normalization, then a weight-normalized linear layer to ``out_dim`` prototypes.
    ``norm_last_layer=True`` fixes the last layer's norms ``weight_g`` to 1 (not trained)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
