"""Errors caused by the user's input, and how they reach the user.

Conventions:
- every error caused by what the user gave (data files, options, output folders) is a `UserError` whose message is
  one line that names the file or option and the fix;
- such an error reaches the user as that one line, last on stderr, prefixed ``error:``, with exit status 2 and no
  traceback, from ``python -m meddiff`` and from ``python -m monai.bundle run`` alike. MONAI's config parser wraps
  an exception raised inside a config expression in ``RuntimeError: Failed to evaluate ...``, so the hook looks
  through the whole exception chain (``__cause__`` and ``__context__``) for a `UserError`;
- any other exception is a bug or an environment problem and keeps its full traceback;
- ``MEDDIFF_DEBUG=1`` shows the full traceback of user errors too.

`install_excepthook` runs when ``meddiff`` is imported (every bundle config imports it), so a bundle run gets this
behaviour without a wrapper command.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
from collections.abc import Callable
from types import TracebackType
from typing import ParamSpec

P = ParamSpec("P")

__all__ = [
    "EXIT_USER_ERROR",
    "OptionError",
    "UserError",
    "find_user_error",
    "format_user_error",
    "install_excepthook",
    "report_user_errors",
]

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Bad input from the user; the message names the file or option and the fix."""


class OptionError(UserError):
    """An option (config key or command-line flag) with a value outside what it accepts."""


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The first `UserError` in `exc`'s chain (the exception itself, then its causes and contexts), or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def format_user_error(err: BaseException) -> str:
    """The one line a user reads: ``error: <message>`` with the message's whitespace collapsed."""
    return "error: " + " ".join(str(err).split())


def report_user_errors(main: Callable[P, int]) -> Callable[P, int]:
    """Wrap a command-line `main` so a user error prints its one line and returns status 2 instead of raising."""

    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except Exception as exc:
            err = find_user_error(exc)
            if err is None or _debug():
                raise
            sys.stdout.flush()
            print(format_user_error(err), file=sys.stderr, flush=True)
            return EXIT_USER_ERROR

    return wrapper


def _debug() -> bool:
    return os.environ.get("MEDDIFF_DEBUG", "").lower() not in ("", "0", "false", "no")


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    err = find_user_error(exc)
    if err is None or _debug():
        _previous_hook(exc_type, exc, tb)
        return
    atexit._run_exitfuncs()  # flush logs and progress bars first, so the message is the last line
    sys.stdout.flush()
    print(format_user_error(err), file=sys.stderr, flush=True)
    os._exit(EXIT_USER_ERROR)


_previous_hook = sys.excepthook


def install_excepthook() -> None:
    """Make uncaught user errors print one line and exit with status 2 (idempotent)."""
    global _previous_hook
    if sys.excepthook is not _excepthook:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook
