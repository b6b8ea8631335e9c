"""The optimizer side of a step, with official semantics: parameter groups, LARS, gradient clipping."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def get_params_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Official ``utils.get_params_groups``: biases and 1-D parameters (norms) get no weight decay.

    The first group is the regularized one; the schedule sets its weight decay every step.
    """
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """The official DINO ``utils.LARS`` (for convnets and very large batches): SGD with momentum
    whose update of each multi-dimensional parameter is rescaled by ``eta * |p| / |dp|``; biases and
    norms get neither weight decay nor the adaptation."""

    def __init__(
        self, params: Any, lr: float = 0, weight_decay: float = 0, momentum: float = 0.9, eta: float = 0.001
    ):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("LARS.step does not take a closure")
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0, g["eta"] * param_norm / update_norm, one),
                        one,
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


@torch.no_grad()
def clip_gradients_(parameters: Iterable[Tensor], clip: float) -> None:
    """The official ``utils.clip_gradients`` computed on the device, without host syncs: each
    gradient on its own is multiplied by ``clip / (norm + 1e-6)`` where that is below 1."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return
    grads = [p.grad for p in params]
    coefs = torch._foreach_norm(grads)
    torch._foreach_add_(coefs, 1e-6)
    # clip * (1 / x) is how torch computes the official ``clip / tensor``: the same rounding.
    torch._foreach_reciprocal_(coefs)
    torch._foreach_mul_(coefs, clip)
    stacked = torch.stack(coefs)
    # A NaN coefficient fails ``< 1`` and leaves its gradient alone, as the official ``if`` does.
    stacked = torch.where(stacked < 1, stacked, 1.0)
    torch._foreach_mul_(grads, list(stacked.unbind()))


def build_optimizer(name: str, groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    """``--optimizer name`` over ``groups``; the schedules set the learning rate and weight decay."""
    if name == "adamw":
        # Fused AdamW (one kernel for all parameters) where torch has it; foreach otherwise.
        try:
            return torch.optim.AdamW(groups, fused=True)
        except (RuntimeError, ValueError) as exc:
            logger.debug("fused AdamW unavailable on %s (%s); using foreach", device, exc)
            return torch.optim.AdamW(groups, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9)
    if name == "lars":
        return LARS(groups)
    raise ValueError(f"unknown optimizer {name!r} (TrainConfig.validate lists the choices)")
