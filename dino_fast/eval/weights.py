"""The backbone under evaluation and its weights.

:func:`load_pretrained_weights` takes a dino_fast or an official DINO checkpoint — a full
training checkpoint (``student``/``teacher`` entries, ``module.`` and ``backbone.`` prefixes, the
projection head dropped as the official evaluation does) or a plain backbone state dict (the
released ``*_pretrain.pth``) — and refuses anything that does not fit the model exactly, naming
the mismatching tensors. Without weights the model keeps its random initialization and a loud
warning says so.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_fast.checkpoint import CheckpointError, load_checkpoint
from dino_fast.flags import bool_flag
from dino_fast.models import ARCHS

logger = logging.getLogger(__name__)

_EMBED_DIM_TO_ARCH = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large"}
# Prefixes wrappers put in front of backbone parameter names: DDP ("module."), the multi-crop
# wrapper / DINOModel ("backbone."), torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def build_backbone(arch: str, patch_size: int = 16, attn_backend: str = "auto") -> nn.Module:
    """A dino_fast ViT (official parameter names) in eval mode with frozen parameters."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHS)}")
    model = ARCHS[arch](patch_size=patch_size, drop_path_rate=0.0, attn_backend=attn_backend)
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
        if key.startswith("head."):
            # The DINO projection head is not part of the evaluated backbone (official: dropped).
            continue
        out[key] = value
    if not out:
        raise CheckpointError(f"{source} has no backbone tensors once the DINO head is dropped")
    return out


def _vit_shape(state: Mapping[str, torch.Tensor]) -> tuple[int, int, int] | None:
    """``(embed_dim, patch_size, depth)`` of the ViT a backbone state dict was saved from."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return None
    depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    return proj.shape[0], proj.shape[-1], depth


def describe_vit_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """Best-effort description of the ViT a state dict was saved from (for error messages)."""
    shape = _vit_shape(state)
    if shape is None:
        return "it does not look like a ViT backbone (no patch_embed.proj.weight)"
    dim, patch, depth = shape
    arch = _EMBED_DIM_TO_ARCH.get(dim)
    guess = f" -> --arch {arch} --patch_size {patch}" if arch else ""
    return f"it was saved from a ViT with embed_dim={dim}, patch_size={patch}, depth={depth}{guess}"


def stored_model_flags(checkpoint: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``arch`` and ``patch_size`` the checkpoint was trained with: from its stored ``args`` (a
    dino_fast dict or an official ``argparse.Namespace``), else read off the weights' shapes."""
    args = checkpoint.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    if isinstance(args, Mapping) and args.get("arch") in ARCHS and isinstance(args.get("patch_size"), int):
        return {"arch": args["arch"], "patch_size": args["patch_size"]}
    shape = _vit_shape(state)
    if shape is not None and shape[0] in _EMBED_DIM_TO_ARCH:
        return {"arch": _EMBED_DIM_TO_ARCH[shape[0]], "patch_size": shape[1]}
    return {}


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
            f"{path} does not match the model{hint}: {details}{more}. {describe_vit_state_dict(state)}."
        )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model tensors are missing from it (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"it has {len(unexpected)} tensors the model lacks (e.g. {unexpected[:3]})")
        raise CheckpointError(
            f"{path} does not match the model{hint}: {' and '.join(parts)}. {describe_vit_state_dict(state)}."
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
        choices=tuple(ARCHS),
        help="Architecture (default: the checkpoint's, else vit_small).",
    )
    parser.add_argument(
        "--patch_size", default=None, type=int, help="Patch resolution (default: the checkpoint's, else 16)."
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


def build_model_from_args(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The backbone ``args`` describe, with its weights; flags left out come from the checkpoint."""
    flags = {"arch": "vit_small", "patch_size": 16}
    state = None
    if args.pretrained_weights:
        path = Path(args.pretrained_weights)
        checkpoint = read_checkpoint(path, allow_pickle=args.allow_pickle)
        state = backbone_state_dict(checkpoint, args.checkpoint_key, source=str(path))
        flags.update(stored_model_flags(checkpoint, state))
    arch = args.arch or flags["arch"]
    patch_size = args.patch_size or flags["patch_size"]
    model = build_backbone(arch, patch_size, args.attn_backend)
    hint = f"--arch {arch} --patch_size {patch_size}"
    if state is None:
        load_pretrained_weights(model, None, arch_hint=hint)
    else:
        _load_backbone_state(model, state, path, args.checkpoint_key, hint)
    return model.to(device)
