"""The one error path of every command line: a user's mistake is ONE line on stderr and exit status 2.

Every ``python -m rlnlp.<something>`` builds its options with :class:`Parser` and runs through :func:`run`::

    def main(argv=None) -> int:
        args = Parser(prog="python -m rlnlp.thing").parse_args(argv)
        ...
        raise UsageError("--foo belongs to --mode bar")   # any time later: still one line, exit 2

    if __name__ == "__main__":
        raise SystemExit(run(main))

What counts as the user's mistake: a bad option (argparse), a :class:`UsageError`, a missing file or folder, and a
``ValueError`` raised while reading what the user pointed at (a broken task file, a bad config value — configs
validate in ``__post_init__`` with a ``ValueError``). Anything else is a bug and keeps its traceback. Set
``RLNLP_TRACEBACK=1`` to see the traceback of an expected error too.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

EXIT_USAGE = 2
"""Exit status of a user's mistake (argparse's own)."""

EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as a shell reports it."""


class UsageError(ValueError):
    """Bad input a person can fix: an option that contradicts another, a value out of range, a run that is
    not there. The message names what and where; :func:`run` prints it as one line."""


EXPECTED_ERRORS: tuple[type[BaseException], ...] = (UsageError, ValueError, FileNotFoundError, NotADirectoryError,
                                                    IsADirectoryError, PermissionError)
"""What :func:`run` turns into one line by default (UsageError is a ValueError; listed for the reader)."""


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) folded into one space."""
    return " ".join(str(message).split())


def describe(err: BaseException) -> str:
    """One line for an exception: an OS error names its file ("runs/x: No such file or directory"),
    others give their message (or their type when they carry none)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return one_line(f"{err.filename}: {err.strerror}")
    return one_line(err) or type(err).__name__


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``<prog>: error: <message> (usage: <prog> --help)``, with exit status 2
    — no usage block (``--help`` prints it). Sub-commands made by ``add_subparsers`` are Parsers too."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (usage: {self.prog} --help)\n")


def _prog_of(main: Callable) -> str:
    """``python -m rlnlp.attention_guided`` for a main defined in rlnlp/attention_guided/cli.py or __main__.py."""
    module = getattr(main, "__module__", None) or "rlnlp"
    for tail in (".__main__", ".cli"):
        if module.endswith(tail) and module != "rlnlp.cli":
            module = module[: -len(tail)]
    return f"python -m {module}"


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None,
        errors: tuple[type[BaseException], ...] = EXPECTED_ERRORS, prog: str | None = None) -> int:
    """Call ``main(argv)`` and return its exit status.

    An expected error (one of ``errors``) prints ``<prog>: <message>`` on one line to stderr and returns 2;
    any other exception propagates with its traceback (a bug, not a mistake of the user's). Ctrl-C prints
    ``<prog>: interrupted`` and returns 130 (a long run's last checkpoint is already on disk). argparse's own
    exits (``--help``, a bad option) return their status. ``main`` may return an int (the status) or anything
    else (status 0), so a main that returns its results to a notebook still works as a command.
    """
    prog = prog or _prog_of(main)
    try:
        status = main(list(argv) if argv is not None else None)
    except SystemExit as exit_:  # argparse: --help (0) or a bad option (2, message already printed)
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(f"{prog}: {one_line(exit_.code)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except errors as err:
        if os.environ.get("RLNLP_TRACEBACK"):
            raise
        print(f"{prog}: {describe(err)}", file=sys.stderr)
        return EXIT_USAGE
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


# ------------------------------------------------------------------ argparse types (one-line errors)
def _number(kind: type, test: Callable[[float], bool], want: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}")
        return value

    parse.__name__ = want  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer ≥ 1")
"""argparse ``type=``: an integer ≥ 1 (``--episodes 0`` → ``argument --episodes: '0' is not an integer ≥ 1``)."""

nonneg_int = _number(int, lambda v: v >= 0, "an integer ≥ 0")
"""argparse ``type=``: an integer ≥ 0 (e.g. ``--checkpoint-every 0`` = only at the end)."""

positive_float = _number(float, lambda v: v > 0 and v != float("inf"), "a number > 0")
"""argparse ``type=``: a finite number > 0 (NaN fails the test too)."""
