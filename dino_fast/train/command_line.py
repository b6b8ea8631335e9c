"""The ``dino_fast.train`` command line, generated from TrainConfig's fields.

A field's name is its flag, its default the flag's default (a preset's value under ``--preset``),
its metadata the help and the choices, so help, defaults and the dataclass cannot drift apart.
Official booleans take a value ("true"/"false", main_dino.py's ``bool_flag``), ours are
``--flag``/``--no-flag``; number pairs take ``nargs="+"`` as official and are checked with every
other value by ``TrainConfig.validate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Sequence
from typing import Any

from dino_fast.errors import command_name
from dino_fast.flags import bool_flag
from dino_fast.train.config import OFFICIAL, OURS, ConfigError, TrainConfig

DESCRIPTION = (
    "DINO self-supervised ViT and ResNet training, fast. Accepts every flag of the official main_dino.py "
    "under its official name; torchrun --nproc_per_node=N -m dino_fast.train runs it on N GPUs. "
    "Start from --preset vit_small_imagenet, resnet50_imagenet, demo or smoke."
)


def _argument(field: dataclasses.Field, hint: Any, default: Any) -> dict[str, Any]:
    """``add_argument`` keywords for ``field``, whose resolved annotation is ``hint``."""
    kwargs: dict[str, Any] = {"default": default, "help": field.metadata["help"]}
    if field.metadata["choices"] is not None:
        kwargs["choices"] = field.metadata["choices"]
    args = typing.get_args(hint)
    value_type = next(t for t in args if t is not type(None)) if type(None) in args else hint  # X | None
    if value_type is bool:
        if field.metadata["section"] == OFFICIAL:
            kwargs["type"] = bool_flag
        else:
            kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(value_type) is tuple:
        kwargs.update(type=typing.get_args(value_type)[0], nargs="+")
    else:
        kwargs["type"] = value_type
    return kwargs


def _add_fields(parser: Any, names: Sequence[str], defaults: TrainConfig) -> None:
    """A flag for each field of ``names`` on ``parser`` (a parser or an argument group)."""
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in names:
        parser.add_argument(f"--{name}", **_argument(fields[name], hints[name], getattr(defaults, name)))


def build_parser(defaults: TrainConfig | None = None) -> argparse.ArgumentParser:
    """The ``dino_fast.train`` parser; ``defaults`` (a preset) supplies the default values."""
    defaults = defaults or TrainConfig()
    parser = argparse.ArgumentParser(
        prog=command_name(),
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for section in (OFFICIAL, OURS):
        names = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata["section"] == section]
        _add_fields(parser.add_argument_group(section), names, defaults)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """A validated TrainConfig from a command line: the preset's values first, then the flags given."""
    # The preset's values are the parser's defaults, and a preset's CPU and GPU schedules differ.
    pre = argparse.ArgumentParser(add_help=False)
    _add_fields(pre, ("preset", "device"), TrainConfig())
    known, _ = pre.parse_known_args(argv)
    defaults = TrainConfig()
    if known.preset is not None:
        try:
            defaults = TrainConfig.from_preset(known.preset, device=known.device)
        except ConfigError as exc:
            build_parser().error(str(exc))
    parser = build_parser(defaults)
    config = TrainConfig(**vars(parser.parse_args(argv)))
    try:
        config.validate()
    except ConfigError as exc:
        parser.error(str(exc))
    if os.environ.get("LOCAL_RANK") is not None:
        config.local_rank = int(os.environ["LOCAL_RANK"])
    return config
