"""Errors a user can fix, and how the entry points report them.

Everything a user can fix (a config value, a shape, a range, a missing or corrupt file, a device that is not there)
raises a :class:`UserError` whose message names the problem and the fix. The entry points (``evaluate.py``,
``train.py``, the ``data_prep`` scripts) print that message alone, without a traceback, and exit with status 2;
``HYDRA_FULL_ERROR=1`` (or ``DIFFINV_DEBUG=1``) shows the full traceback instead. Anything else is a bug and keeps its
traceback.

``UserError`` subclasses ``ValueError`` (and ``UserFileError`` also ``FileNotFoundError``), so callers that catch those
keep working.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A problem the user can fix; the message says what is wrong and how to fix it."""


class UserFileError(UserError, FileNotFoundError):
    """A missing or unreadable input file; the message names the file and what to put there."""


def find_user_error(err: BaseException | None) -> UserError | None:
    """The first :class:`UserError` in ``err``'s chain of causes (Hydra wraps errors raised while instantiating)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def user_message(err: UserError) -> str:
    """The error's message; for an error re-raised from a DataLoader worker (whose message embeds the worker's
    traceback) only the original message, from the traceback's last line."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def debug_tracebacks() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("DIFFINV_DEBUG") == "1"


def report_user_errors(main: F) -> F:
    """Decorate an entry point: a :class:`UserError` anywhere in the raised chain is printed as one line
    (``error: <message>``) on stderr and the process exits with status 2; other errors propagate unchanged."""

    @wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised unless it is the user's to fix
            user = find_user_error(err)
            if user is None or debug_tracebacks():
                raise
            print(f"error: {user_message(user)}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapper  # type: ignore[return-value]
