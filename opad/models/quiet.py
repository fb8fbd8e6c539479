"""transformers' loading and saving, without its load report and its per-model progress bars."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from transformers.utils import logging as transformers_logging


@contextlib.contextmanager
def no_transformers_bars() -> Iterator[None]:
    """No per-model "Loading weights" / "Writing model shards" bar: this package's models load and save in
    well under a second (the real ones in a few), and each bar is a line of noise between its own
    progress bars and logs."""
    bar = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar:
            transformers_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' logging at errors only, for loading one tower of a two-tower ``CLIPModel`` folder,
    which would otherwise print a table of every weight of the other tower as unused; and no load bar."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with no_transformers_bars():
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)
