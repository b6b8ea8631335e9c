"""The backbone under evaluation and its weights.

Every ``--arch`` of ``dino_fast.models.BACKBONE_ARCHS`` is evaluated: a ViT (official parameter
names) or a torchvision ResNet whose ``fc`` is an identity, so that its feature is the
global-average-pooled output (2048-d for ResNet-50), as in the official evaluation scripts.

:func:`load_pretrained_weights` takes a dino_fast or an official DINO checkpoint — a full
training checkpoint (``student``/``teacher`` entries, ``module.`` and ``backbone.`` prefixes, the
projection head dropped as the official evaluation does) or a plain backbone state dict (the
released ``*_pretrain.pth``; a torchvision classifier's ``fc`` is dropped too) — and refuses
anything that does not fit the model exactly, naming the mismatching tensors and the ``--arch``
the weights were saved from. Without weights the model keeps its random initialization and a
loud warning says so.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_fast import models
from dino_fast.checkpoint import CheckpointError, load_checkpoint
from dino_fast.eval.arch_inference import OPTIONAL_BUFFER_SUFFIX, describe_state_dict, stored_model_flags
from dino_fast.flags import bool_flag

logger = logging.getLogger(__name__)

# Prefixes wrappers put in front of backbone parameter names: DDP ("module."), the multi-crop
# wrapper / DINOModel ("backbone."), torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "backbone.", "_orig_mod.")
# What a checkpoint may hold beside the backbone: the DINO projection head, and a torchvision
# model's classifier (our ResNets end in the pooled features, fc = identity, as the official
# evaluation's do). Both are dropped, as the official non-strict loading ignores them.
_NOT_BACKBONE_PREFIXES = ("head.", "fc.")
DEFAULT_ARCH, DEFAULT_PATCH_SIZE = "vit_small", 16


def build_backbone(arch: str, patch_size: int = 16, attn_backend: str = "auto") -> nn.Module:
    """The ``arch`` backbone (``patch_size`` and ``attn_backend`` shape ViTs only) in eval mode
    with frozen parameters."""
    model = models.build_backbone(arch, patch_size=patch_size, attn_backend=attn_backend)
    model.eval()
    model.requires_grad_(False)
    return model


def read_checkpoint(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path`` on CPU, without running code from it (``load_checkpoint``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--pretrained_weights {path} does not exist (or is not a file): pass the path of a dino_fast "
            "checkpoint.pth or of an official DINO *_pretrain.pth / checkpoint.pth"
        )
    return load_checkpoint(path, allow_pickle=allow_pickle)


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def backbone_state_dict(
    checkpoint: Any, checkpoint_key: str | None = "teacher", *, source: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """The backbone weights inside ``checkpoint`` with wrapper prefixes stripped and the head dropped.

    ``checkpoint`` is either a training checkpoint (a dict with ``checkpoint_key`` among its
    entries) or a plain state dict. Like the official ``load_pretrained_weights``, a plain
    state dict is used as it is whatever ``checkpoint_key`` says.
    """
    if isinstance(checkpoint, nn.Module):
        checkpoint = checkpoint.state_dict()
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{source} holds a {type(checkpoint).__name__}, not a dict of weights or a training checkpoint"
        )
    if checkpoint_key is not None and checkpoint_key in checkpoint:
        state = checkpoint[checkpoint_key]
        if isinstance(state, nn.Module):
            state = state.state_dict()
        if not _is_state_dict(state):
            raise CheckpointError(
                f"{source}[{checkpoint_key!r}] is a {type(state).__name__}, not a state dict of tensors"
            )
    elif _is_state_dict(checkpoint):
        state = checkpoint
    else:
        candidates = sorted(str(k) for k, v in checkpoint.items() if _is_state_dict(v))
        raise CheckpointError(
            f"--checkpoint_key {checkpoint_key!r} is not in {source}; its entries are "
            f"{sorted(map(str, checkpoint))}. Pass --checkpoint_key with one of the entries holding weights: "
            f"{candidates or 'none found'}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = _strip_prefixes(str(key))
        if key.startswith(_NOT_BACKBONE_PREFIXES):
            continue
        out[key] = value
    if not out:
        raise CheckpointError(
            f"{source} has no backbone tensors once the DINO head and any classifier (fc) are dropped"
        )
    return out


@dataclass(frozen=True)
class LoadedWeights:
    """What :func:`load_pretrained_weights` loaded (``path`` is None for a random init)."""

    path: Path | None
    checkpoint_key: str | None
    num_tensors: int


def load_pretrained_weights(
    model: nn.Module,
    pretrained_weights: str | os.PathLike[str] | None,
    checkpoint_key: str | None = "teacher",
    *,
    arch_hint: str = "",
    allow_pickle: bool = False,
) -> LoadedWeights:
    """Load a dino_fast / official DINO checkpoint into ``model`` (a backbone), strictly.

    Every tensor of the model must be in the checkpoint with the same shape, and the
    checkpoint may hold nothing else besides the DINO head: a partly loaded backbone would
    evaluate silently wrong numbers. ``pretrained_weights`` None or "" keeps the random
    initialization, with a loud warning. ``arch_hint`` (e.g. "--arch vit_small --patch_size
    16") is echoed in errors; ``allow_pickle`` as in :func:`dino_fast.checkpoint.load_checkpoint`.
    """
    if pretrained_weights is None or str(pretrained_weights) == "":
        logger.warning(
            "NO PRETRAINED WEIGHTS GIVEN: evaluating a RANDOMLY INITIALIZED %s. Pass --pretrained_weights "
            "PATH to evaluate a trained model.",
            type(model).__name__,
        )
        return LoadedWeights(path=None, checkpoint_key=None, num_tensors=0)
    path = Path(pretrained_weights)
    checkpoint = read_checkpoint(path, allow_pickle=allow_pickle)
    return _load_backbone_state(
        model,
        backbone_state_dict(checkpoint, checkpoint_key, source=str(path)),
        path,
        checkpoint_key,
        arch_hint,
    )


def _load_backbone_state(
    model: nn.Module, state: dict[str, torch.Tensor], path: Path, checkpoint_key: str | None, arch_hint: str
) -> LoadedWeights:
    own = model.state_dict()
    hint = f" (model built with {arch_hint})" if arch_hint else ""
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if mismatched:
        details = "; ".join(
            f"{k}: model expects {tuple(own[k].shape)}, checkpoint has {tuple(state[k].shape)}"
            for k in mismatched[:4]
        )
        more = f" (and {len(mismatched) - 4} more)" if len(mismatched) > 4 else ""
        raise CheckpointError(
            f"{path} does not match the model{hint}: {details}{more}. {describe_state_dict(state)}."
        )
    # torch fills in batch-norm step counters a state dict lacks (see OPTIONAL_BUFFER_SUFFIX).
    missing = [k for k in own if k not in state and not k.endswith(OPTIONAL_BUFFER_SUFFIX)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model tensors are missing from it (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"it has {len(unexpected)} tensors the model lacks (e.g. {unexpected[:3]})")
        raise CheckpointError(
            f"{path} does not match the model{hint}: {' and '.join(parts)}. {describe_state_dict(state)}."
        )
    model.load_state_dict(state, strict=True)
    logger.info("loaded %d tensors from %s (checkpoint key %r)", len(state), path, checkpoint_key)
    return LoadedWeights(path=path, checkpoint_key=checkpoint_key, num_tensors=len(state))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The official evaluation scripts' model flags; the architecture defaults to the checkpoint's."""
    parser.add_argument(
        "--pretrained_weights", default="", type=str, help="Checkpoint to evaluate (empty: random init)."
    )
    parser.add_argument(
        "--checkpoint_key",
        default="teacher",
        type=str,
        help='Training-checkpoint entry to use ("teacher" or "student"); ignored for a plain state dict.',
    )
    parser.add_argument(
        "--arch",
        default=None,
        choices=models.BACKBONE_ARCHS,
        help=f"Architecture (default: the checkpoint's, else {DEFAULT_ARCH}).",
    )
    parser.add_argument(
        "--patch_size",
        default=None,
        type=int,
        help=f"ViT patch size (default: the checkpoint's, else {DEFAULT_PATCH_SIZE}); convnets ignore it.",
    )
    parser.add_argument(
        "--attn_backend",
        default="auto",
        type=str,
        help="Attention backend of the ViT (see dino_fast.models).",
    )
    parser.add_argument(
        "--allow_pickle",
        default=False,
        type=bool_flag,
        help="Load a checkpoint holding Python objects beyond tensors (runs its code: trusted files only).",
    )


@dataclass(frozen=True)
class ModelChoice:
    """The backbone an evaluation builds (``arch``, a ViT's ``patch_size``), where ``arch`` came from
    (``--arch``, the checkpoint, the default) and the backbone weights to load (None: random init)."""

    arch: str
    patch_size: int
    arch_origin: str
    weights: Path | None = None
    state: dict[str, torch.Tensor] | None = None
    checkpoint_key: str | None = None

    @property
    def flags(self) -> str:
        """The command-line flags that build this backbone."""
        if models.is_convnet(self.arch):
            return f"--arch {self.arch}"
        return f"--arch {self.arch} --patch_size {self.patch_size}"

    def build(self, device: torch.device, attn_backend: str = "auto") -> nn.Module:
        """The backbone with its weights (strictly), frozen, in eval mode, on ``device``."""
        model = build_backbone(self.arch, self.patch_size, attn_backend)
        if self.state is None or self.weights is None:
            load_pretrained_weights(model, None, arch_hint=self.flags)
        else:
            _load_backbone_state(model, self.state, self.weights, self.checkpoint_key, self.flags)
        return model.to(device)


def choose_model(args: argparse.Namespace) -> ModelChoice:
    """The backbone the model flags in ``args`` describe; flags left out come from the checkpoint's
    stored ``args``, else from its weights' shapes, else the official defaults."""
    flags: dict[str, Any] = {"arch": DEFAULT_ARCH, "patch_size": DEFAULT_PATCH_SIZE}
    origin = "the default"
    weights, state = None, None
    if args.pretrained_weights:
        weights = Path(args.pretrained_weights)
        checkpoint = read_checkpoint(weights, allow_pickle=args.allow_pickle)
        state = backbone_state_dict(checkpoint, args.checkpoint_key, source=str(weights))
        stored = stored_model_flags(checkpoint, state)
        if stored:
            flags.update(stored)
            origin = str(weights)
    choice = ModelChoice(
        arch=args.arch or flags["arch"],
        patch_size=args.patch_size or flags["patch_size"],
        arch_origin="--arch" if args.arch else origin,
        weights=weights,
        state=state,
        checkpoint_key=args.checkpoint_key,
    )
    if not args.arch:
        logger.info("evaluating %s (%s, from %s)", choice.arch, choice.flags, choice.arch_origin)
    return choice


def build_model_from_args(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The backbone ``args`` describe, with its weights; flags left out come from the checkpoint."""
    return choose_model(args).build(device, args.attn_backend)
