"""Errors a user can fix, and how every command reports them: one line, a non-zero exit.

``python -m dino_fast.train``, ``dino_fast.eval.knn``, ``dino_fast.eval.linear``,
``dino_fast.visualize`` and ``benchmarks/throughput.py`` end through :func:`run_command`. A bad
path, file, flag or checkpoint, a missing package or a busy output folder prints
``<command>: error: <message>`` (each message names the problem and the fix); anything else is
a bug and keeps its traceback. ``DINO_FAST_TRACEBACK=1`` shows the traceback of every failure.
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


def run_command(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main``; return its exit status (0, 1 for an expected failure, 130 for Ctrl-C)."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "dino_fast"
    try:
        main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as err:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    return 0
