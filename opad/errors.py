"""The one exception type users see, and the one-line forms of problems and warnings."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

Main = Callable[[list[str] | None], int]


class OpadError(Exception):
    """A problem with the user's input or environment, reported without a traceback by the CLIs."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message cut to one line (libraries' messages often run to several)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def cause_line(lines: list[str]) -> str:
    """The line that says why a command failed, from its output: its first ``error:`` line (the cause;
    later ones only say which step failed), else its last line."""
    lines = [ln.strip() for ln in lines if ln.strip()]
    return next((ln for ln in lines if ln.startswith("error:")), lines[-1] if lines else "no output")


def warn(message: str) -> None:
    """One ``warning:`` line on stderr: the run goes on."""
    print(f"warning: {message}", file=sys.stderr)


def command_main(*, extra: str | None = None, interrupted: str | None = None) -> Callable[[Main], Main]:
    """Wrap a command's ``main(argv) -> int`` so that what the user can fix never shows a traceback.

    An ``OpadError``, or an ``OSError`` from the user's environment (disk full, permissions), becomes
    one ``error:`` line on stderr and exit code 2. ``extra``: a missing optional package
    (``ImportError``) is named with the pip extra that installs it. ``interrupted``: Ctrl-C prints
    this line and exits 130. argparse's own exits pass through.
    """

    def wrap(main: Main) -> Main:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except (OpadError, OSError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            except ImportError as e:
                if extra is None:
                    raise
                print(f"error: {first_line(e)}; install the {extra} extra: pip install -e '.[{extra}]'", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                if interrupted is None:
                    raise
                print(f"\n{interrupted}", file=sys.stderr)
                return 130

        return run

    return wrap
