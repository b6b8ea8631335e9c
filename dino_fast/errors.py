"""Errors a user can fix, and how every command reports them: one line, a non-zero exit.

``python -m dino_fast.train``, ``dino_fast.eval.knn``, ``dino_fast.eval.linear``,
``dino_fast.visualize`` (and their console scripts, ``dino-fast-train`` ...) and
``benchmarks/throughput.py`` end through :func:`run_command`. A bad path, file, flag or
checkpoint, a missing package or a busy output folder prints ``<command>: error: <message>``
(each message names the problem and the fix); anything else is a bug and keeps its traceback.
``DINO_FAST_TRACEBACK=1`` shows the traceback of every failure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

TRACEBACK_ENV = "DINO_FAST_TRACEBACK"


class UserError(Exception):
    """A failure the user can fix; its message says what and how. Our error classes derive from
    it next to the builtin they refine (``class X(UserError, RuntimeError)``)."""


# Besides ours: missing or unreadable paths, bad values and missing packages.
EXPECTED_ERRORS = (UserError, OSError, ValueError, ImportError)


def command_name() -> str:
    """The command as the user typed it: ``python -m dino_fast.train``, or the script's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:  # run with python -m
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "dino_fast"


def run_command(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main``; return its exit status (0, 1 for an expected failure, 130 for Ctrl-C).

    A command may raise ``KeyboardInterrupt(message)`` to say what the interruption left behind.
    """
    prog = command_name()
    try:
        main(argv)
    except KeyboardInterrupt as err:
        print(f"{prog}: interrupted" + (f"; {err}" if str(err) else ""), file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as err:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    return 0
