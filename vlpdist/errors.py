"""User-facing errors: one clear line on stderr and exit code 2, never a traceback.

Library code raises `UserError` for anything the user can fix (bad config, bad URL list, missing
file). Entry points wrap their `main` with `exit_on_user_error`, which turns it into the one-line
message and the exit code. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

USER_ERROR_EXIT_CODE = 2

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """An error caused by the user's input; its message is a single line that says what to fix."""

    def __init__(self, message: str):
        # Keep the contract: one line, whatever the caller passed.
        super().__init__(" ".join(str(message).split()))


def exit_on_user_error(main: F) -> F:
    """Decorate a CLI `main(argv)`: a `UserError` becomes `error: <message>` and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(USER_ERROR_EXIT_CODE) from None

    return wrapper  # type: ignore[return-value]
