"""Argument types the command lines share (training and evaluation) with the official scripts."""

from __future__ import annotations

import argparse


def bool_flag(value: str) -> bool:
    """The official ``utils.bool_flag``: on/true/1 and off/false/0."""
    lowered = value.lower()
    if lowered in {"off", "false", "0"}:
        return False
    if lowered in {"on", "true", "1"}:
        return True
    raise argparse.ArgumentTypeError(
        f"invalid value {value!r} for a boolean flag: use true/false, on/off or 1/0"
    )
