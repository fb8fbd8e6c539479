"""The one exception type users see, and the one-line forms of problems and warnings."""

from __future__ import annotations

import sys


class OpadError(Exception):
    """A problem with the user's input or environment, reported without a traceback by the CLIs."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message cut to one line (libraries' messages often run to several)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def warn(message: str) -> None:
    """One ``warning:`` line on stderr: the run goes on."""
    print(f"warning: {message}", file=sys.stderr)
