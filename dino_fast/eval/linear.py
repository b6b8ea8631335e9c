"""Linear probe on frozen DINO features (the official ``eval_linear.py`` recipe).

Recipe defaults, as in the official script: SGD with momentum 0.9, no weight decay,
lr = 0.001 x (batch x world size) / 256 with a per-epoch cosine schedule to 0 over 100
epochs, batch 128 per process, a linear layer initialized N(0, 0.01) with zero bias.
Features of a ViT: the CLS tokens of the last ``n_last_blocks`` blocks (4 for ViT-S/16), plus
the average-pooled patch tokens of the last block with ``--avgpool_patchtokens true`` (what the
paper uses for ViT-B); ``--n_last_blocks 1`` is the last-layer CLS. Features of a convnet
(``--arch resnet50``): its global-average-pooled output (fc = identity, 2048-d for ResNet-50),
with the same recipe otherwise. The official script ignores the two ViT flags for a convnet;
here a value other than their default is refused rather than silently ignored. Training images
get RandomResizedCrop + horizontal flip, validation images Resize + CenterCrop. Top-1 and top-5
(top-5 only with 5 classes or more) are reported every ``val_freq`` epochs; the official
script's headline number is the best top-1 over those evaluations, reported here as
``best_top1`` next to the last epoch's ``top1``.

``--cached_features`` is a deliberate deviation for CPUs: features of the *un-augmented*
images (the validation transform) are extracted once, and the linear layer trains on those
tensors. Epochs then cost microseconds instead of a backbone pass per image; accuracies are
typically a little below the augmented recipe's.

    python -m dino_fast.eval.linear --pretrained_weights out/checkpoint.pth --arch vit_small \
        --patch_size 16 --data_path /path/to/imagenet --output_dir out/linear
    python -m dino_fast.eval.linear --pretrained_weights dino_resnet50_pretrain.pth \
        --data_path /path/to/imagenet --output_dir out/linear_rn50
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_fast import distributed
from dino_fast.checkpoint import atomic_save
from dino_fast.errors import run_command
from dino_fast.eval.cache import FeatureCache
from dino_fast.eval.classifier import (
    LinearClassifier,
    evaluate_classifier,
    load_linear_weights,
    strip_ddp_prefix,
)
from dino_fast.eval.features import FeatureSet, FeatureSpec, has_block_tokens
from dino_fast.eval.splits import extract_split, scan_split, split_dirs, train_dataset
from dino_fast.eval.weights import add_model_arguments, build_model_from_args
from dino_fast.flags import bool_flag

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth.tar"  # official file name, resumed from when present
DEFAULT_N_LAST_BLOCKS = 4  # official; the ViT-S/16 setting


@dataclass
class LinearProbeConfig:
    """Official ``eval_linear.py`` defaults."""

    epochs: int = 100
    lr: float = 0.001  # for a total batch of 256, scaled linearly
    batch_size_per_gpu: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    val_freq: int = 1
    n_last_blocks: int = DEFAULT_N_LAST_BLOCKS  # ViTs only, as avgpool_patchtokens
    avgpool_patchtokens: bool = False
    image_size: int = 224
    resize_size: int | None = None
    num_workers: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size_per_gpu", "val_freq", "n_last_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")

    def feature_spec(self, model: nn.Module) -> FeatureSpec:
        """The probe's feature of ``model``: a ViT's tokens as configured, a convnet's pooled output."""
        if has_block_tokens(model):
            return FeatureSpec(
                image_size=self.image_size,
                resize_size=self.resize_size,
                n_last_blocks=self.n_last_blocks,
                avgpool_patchtokens=self.avgpool_patchtokens,
            )
        vit_flags = []
        if self.n_last_blocks != DEFAULT_N_LAST_BLOCKS:
            vit_flags.append(f"--n_last_blocks {self.n_last_blocks}")
        if self.avgpool_patchtokens:
            vit_flags.append("--avgpool_patchtokens true")
        if vit_flags:
            raise ValueError(
                f"{' and '.join(vit_flags)}: ViT-only flags, but the {type(model).__name__} under "
                "evaluation is a convnet, whose feature is its global-average-pooled output; leave them out"
            )
        return FeatureSpec(image_size=self.image_size, resize_size=self.resize_size)

    def scaled_lr(self) -> float:
        return self.lr * self.batch_size_per_gpu * distributed.get_world_size() / 256.0


@dataclass
class LinearProbeResult:
    """Accuracies in percent; ``top5`` is None with fewer than 5 classes."""

    top1: float
    top5: float | None
    best_top1: float
    epochs: int
    history: list[dict[str, float]] = field(default_factory=list)
    classifier: LinearClassifier | None = None


Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def _fit(
    classifier: LinearClassifier,
    train_batches: Batches,
    validate: Callable[[nn.Module], tuple[float, float | None, float]],
    cfg: LinearProbeConfig,
    device: torch.device,
    output_dir: Path | None,
) -> LinearProbeResult:
    """The official training loop: SGD + per-epoch cosine, validate every val_freq epochs."""
    classifier.to(device)
    model: nn.Module = classifier
    if distributed.get_world_size() > 1:
        model = nn.parallel.DistributedDataParallel(
            classifier, device_ids=[device] if device.type == "cuda" else None
        )
    optimizer = torch.optim.SGD(
        model.parameters(), cfg.scaled_lr(), momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs, eta_min=0)
    start_epoch, best_acc = 0, 0.0
    history: list[dict[str, float]] = []
    ckpt_path = output_dir / CHECKPOINT_NAME if output_dir is not None else None
    if ckpt_path is not None and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        classifier.load_state_dict(strip_ddp_prefix(state["state_dict"]))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_acc = int(state["epoch"]), float(state["best_acc"])
        logger.info("resumed the linear probe from %s at epoch %d", ckpt_path, start_epoch)
    top1, top5 = float("nan"), None
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        steps = 0
        for x, y in train_batches(epoch):
            logits = model(x.to(device, non_blocking=True))
            loss = nn.functional.cross_entropy(logits, y.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double()
            steps += 1
        scheduler.step()
        stats = {"epoch": float(epoch), "train_loss": float(loss_sum) / max(steps, 1)}
        if epoch % cfg.val_freq == 0 or epoch == cfg.epochs - 1:
            top1, top5, val_loss = validate(model)
            best_acc = max(best_acc, top1)
            stats.update({"test_acc1": top1, "test_loss": val_loss})
            if top5 is not None:
                stats["test_acc5"] = top5
            logger.info(
                "epoch %d: loss %.4f, val top-1 %.2f%% (best %.2f%%)",
                epoch,
                stats["train_loss"],
                top1,
                best_acc,
            )
        history.append(stats)
        if output_dir is not None and distributed.is_main_process():
            output_dir.mkdir(parents=True, exist_ok=True)
            with (output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(stats) + "\n")
            atomic_save(
                {
                    "epoch": epoch + 1,
                    "state_dict": classifier.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "best_acc": best_acc,
                    "config": asdict(cfg),
                },
                output_dir / CHECKPOINT_NAME,
            )
    if math.isnan(top1):
        # resumed from a finished run: report its final evaluation
        top1, top5, _ = validate(model)
    return LinearProbeResult(
        top1=top1, top5=top5, best_top1=best_acc, epochs=cfg.epochs, history=history, classifier=classifier
    )


def _epoch_permutation(num_samples: int, epoch: int, seed: int) -> list[int]:
    """This rank's shuffled, padded shard for ``epoch`` (DistributedSampler semantics)."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_samples, generator=g).tolist()
    world, rank_ = distributed.get_world_size(), distributed.get_rank()
    return [order[i] for i in distributed.shard_indices(num_samples, world, rank_)]


def train_linear_on_features(
    train: FeatureSet,
    val: FeatureSet,
    cfg: LinearProbeConfig | None = None,
    *,
    num_labels: int | None = None,
    device: torch.device | str = "cpu",
    output_dir: str | os.PathLike[str] | None = None,
) -> LinearProbeResult:
    """Train the linear layer on precomputed features (no augmentation: the fast path)."""
    cfg = cfg or LinearProbeConfig()
    device = torch.device(device)
    if train.features.ndim != 2 or val.features.ndim != 2 or train.features.shape[1] != val.features.shape[1]:
        raise ValueError(
            "train and val features must be (N, dim) with one dim, got "
            f"{tuple(train.features.shape)} and {tuple(val.features.shape)}"
        )
    num_labels = num_labels or max(len(train.classes), int(train.labels.max()) + 1, int(val.labels.max()) + 1)
    torch.manual_seed(cfg.seed)
    classifier = LinearClassifier(train.features.shape[1], num_labels)
    x_train = train.features.to(device, torch.float32)
    y_train = train.labels.to(device)
    x_val = val.features.to(device, torch.float32)
    y_val = val.labels.to(device)

    def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.as_tensor(_epoch_permutation(x_train.shape[0], epoch, cfg.seed), device=device)
        for start in range(0, order.shape[0], cfg.batch_size_per_gpu):
            idx = order[start : start + cfg.batch_size_per_gpu]
            yield x_train[idx], y_train[idx]

    return _fit(
        classifier,
        batches,
        lambda m: evaluate_classifier(m, x_val, y_val),
        cfg,
        device,
        Path(output_dir) if output_dir is not None else None,
    )


def train_linear_on_images(
    model: nn.Module,
    train_root: str | os.PathLike[str],
    val_root: str | os.PathLike[str],
    cfg: LinearProbeConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    output_dir: str | os.PathLike[str] | None = None,
) -> LinearProbeResult:
    """The official recipe: every step runs the frozen backbone on freshly augmented images."""
    cfg = cfg or LinearProbeConfig()
    device = torch.device(device)
    model.eval().to(device)
    spec = cfg.feature_spec(model)
    train_index = scan_split(train_root)
    val_index = scan_split(val_root)
    if list(train_index.classes) != list(val_index.classes):
        raise ValueError(
            f"train ({train_root}) and val ({val_root}) have different class folders: "
            f"{list(train_index.classes)} vs {list(val_index.classes)}"
        )
    # Validation images are not augmented, so their features are extracted once (all ranks); their
    # width sizes the classifier (official: embed_dim x (n_last_blocks + avgpool), or a convnet's fc input).
    val = extract_split(
        model, val_root, spec, device=device, batch_size=cfg.batch_size_per_gpu, num_workers=cfg.num_workers
    )
    torch.manual_seed(cfg.seed)
    classifier = LinearClassifier(val.features.shape[1], len(train_index.classes))
    train_set = train_dataset(train_index, spec)
    feature_fn = spec.feature_fn(model)

    def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(train_set, _epoch_permutation(len(train_set), epoch, cfg.seed)),
            batch_size=cfg.batch_size_per_gpu,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
            drop_last=False,
        )
        for images, target in loader:
            with torch.no_grad():
                x = feature_fn(images.to(device, non_blocking=True))
            yield x, target

    return _fit(
        classifier,
        batches,
        lambda m: evaluate_classifier(m, val.features, val.labels.to(device)),
        cfg,
        device,
        Path(output_dir) if output_dir is not None else None,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "python -m dino_fast.eval.linear", description="Linear probe on frozen DINO features."
    )
    add_model_arguments(parser)
    d = LinearProbeConfig()
    parser.add_argument(
        "--n_last_blocks", default=d.n_last_blocks, type=int, help="ViTs: the CLS of the n last blocks."
    )
    parser.add_argument(
        "--avgpool_patchtokens",
        default=d.avgpool_patchtokens,
        type=bool_flag,
        help="ViTs: also concatenate the average-pooled patch tokens of the last block.",
    )
    parser.add_argument("--epochs", default=d.epochs, type=int)
    parser.add_argument(
        "--lr", default=d.lr, type=float, help="lr for a total batch of 256 (scaled linearly)."
    )
    parser.add_argument("--batch_size_per_gpu", default=d.batch_size_per_gpu, type=int)
    parser.add_argument("--val_freq", default=d.val_freq, type=int, help="Validate every this many epochs.")
    parser.add_argument(
        "--data_path", type=Path, required=True, help="Folder with train/ and val/ (or test/)."
    )
    parser.add_argument("--image_size", default=d.image_size, type=int)
    parser.add_argument(
        "--resize_size", default=None, type=int, help="Validation resize (default size*256/224)."
    )
    parser.add_argument("--num_workers", default=d.num_workers, type=int)
    parser.add_argument(
        "--output_dir", type=Path, default=Path("."), help="Logs, checkpoint and linear layer."
    )
    parser.add_argument("--num_labels", default=None, type=int, help="Classes (default: from the folders).")
    parser.add_argument("--seed", default=d.seed, type=int)
    parser.add_argument(
        "--cached_features",
        action="store_true",
        help="Train on features of un-augmented images extracted once (fast on CPU; deviates from the "
        "official augmented recipe).",
    )
    parser.add_argument(
        "--cache_dir", type=Path, default=None, help="Keyed feature cache for --cached_features."
    )
    parser.add_argument(
        "--evaluate", action="store_true", help="Only evaluate the linear layer given by --linear_weights."
    )
    parser.add_argument("--linear_weights", type=Path, default=None, help="Linear layer for --evaluate.")
    return parser


def main(argv: Sequence[str] | None = None) -> LinearProbeResult:

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = LinearProbeConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size_per_gpu=args.batch_size_per_gpu,
        val_freq=args.val_freq,
        n_last_blocks=args.n_last_blocks,
        avgpool_patchtokens=args.avgpool_patchtokens,
        image_size=args.image_size,
        resize_size=args.resize_size,
        num_workers=args.num_workers,
        seed=args.seed,
    )
    train_dir, val_dir = split_dirs(args.data_path)
    with distributed.distributed_context() as device:
        model = build_model_from_args(args, device)
        spec = cfg.feature_spec(model)
        common: dict[str, Any] = dict(
            device=device, batch_size=cfg.batch_size_per_gpu, num_workers=cfg.num_workers
        )
        if args.evaluate:
            if args.linear_weights is None:
                raise SystemExit(
                    "--evaluate needs --linear_weights PATH (a linear layer saved by this script)"
                )
            val = extract_split(model, val_dir, spec, **common)
            num_labels = args.num_labels or len(val.classes)
            classifier = LinearClassifier(val.features.shape[1], num_labels)
            load_linear_weights(classifier, args.linear_weights)
            top1, top5, _ = evaluate_classifier(classifier.to(device), val.features, val.labels.to(device))
            result = LinearProbeResult(top1=top1, top5=top5, best_top1=top1, epochs=0, classifier=classifier)
        elif args.cached_features:
            cache = FeatureCache(args.cache_dir) if args.cache_dir is not None else None
            train = extract_split(model, train_dir, spec, cache=cache, **common)
            val = extract_split(model, val_dir, spec, cache=cache, **common)
            result = train_linear_on_features(
                train, val, cfg, num_labels=args.num_labels, device=device, output_dir=args.output_dir
            )
        else:
            result = train_linear_on_images(
                model, train_dir, val_dir, cfg, device=device, output_dir=args.output_dir
            )
        if distributed.is_main_process():
            if not args.evaluate and result.classifier is not None:
                args.output_dir.mkdir(parents=True, exist_ok=True)
                torch.save(
                    {"state_dict": result.classifier.state_dict(), "config": asdict(cfg)},
                    args.output_dir / "linear.pth",
                )
            top5 = f", top-5 {result.top5:.2f}%" if result.top5 is not None else ""
            print(
                f"Linear probe: top-1 {result.top1:.2f}%{top5} (best top-1 over evaluations "
                f"{result.best_top1:.2f}%)",
                flush=True,
            )
    return result


if __name__ == "__main__":
    sys.exit(run_command(main))
