"""The served concepts: the sub-folders of ``--concepts``, scanned again whenever asked.

A concept id is a plain name (letters, digits, ``.``, ``_``, ``-``; no ``..``): anything else is
refused before the file system is touched. ``DIR/NAME/`` holds a concept in the trainer's format
(or is a whole trainer output folder with the concept in ``DIR/NAME/concept/``). A folder that
holds a pickle file, or whose files do not load, is skipped with one log line and retried only
when its files change; the others keep serving. So is a lora or unet concept: it changes UNet
weights outside the cross-attention K/V the served concepts share (export it alone instead).
The store is not thread-safe: the server calls it on the model thread, which also owns the runner.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from opad.export.runtime import Runner

from opad.concept.folder import META_NAME, WEIGHTS_NAME
from opad.errors import OpadError

BASE = "base"  # the student without a concept
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}

log = logging.getLogger("opad.serve")


def is_plain_name(name: str) -> bool:
    return bool(NAME.fullmatch(name)) and ".." not in name


def _signature(folder: Path) -> tuple:
    """What changes when a concept is rewritten: its files' names, sizes and modification times."""
    stats = [(p.name, p.stat()) for p in folder.iterdir() if p.is_file()]
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats))


class ConceptStore:
    def __init__(self, root: str | Path | None, runner: Runner) -> None:
        self.root = Path(root).resolve() if root else None
        self.runner = runner
        self.served: dict[str, tuple] = {}  # name -> signature of the files it was loaded from
        self.refused: dict[str, tuple] = {}  # name -> signature of the files that failed

    def names(self) -> list[str]:
        return [BASE, *sorted(self.served)]

    def _folder(self, name: str) -> Path | None:
        here = self.root / name
        if not here.is_dir():
            return None
        inner = here / "concept"
        folder = inner if (inner / META_NAME).is_file() or (inner / WEIGHTS_NAME).is_file() else here
        if not folder.resolve().is_relative_to(self.root):  # a link leading out of --concepts
            raise OpadError(f"{here} leads outside {self.root}")
        return folder

    def refresh(self, name: str) -> bool:
        """Load, reload or drop one concept to match its folder now; True when it is served."""
        if self.root is None or not is_plain_name(name) or name == BASE:
            return False
        try:
            folder = self._folder(name)
            signature = _signature(folder) if folder else None
        except (OpadError, OSError) as e:
            if self.refused.get(name) != ("unreadable", str(e)):
                self._refuse(name, ("unreadable", str(e)), str(e))
            return False
        if folder is None:
            if self.served.pop(name, None) is not None:
                self.runner.remove_concept(name)
                log.info("concept %r removed (its folder is gone)", name)
            return False
        if self.served.get(name) == signature:
            return True
        if self.refused.get(name) == signature:
            return False  # already logged; tried again when its files change
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            self._refuse(name, signature,
                         f"{folder / pickles[0]} is a pickle file; concepts load from safetensors only")
            return False
        try:
            self.runner.add_concept(name, str(folder))
        except OpadError as e:
            self._refuse(name, signature, str(e))
            return False
        log.info("concept %r %s from %s", name, "reloaded" if name in self.served else "loaded", folder)
        self.refused.pop(name, None)
        self.served[name] = signature
        return True

    def _refuse(self, name: str, signature: tuple, why: str) -> None:
        if self.served.pop(name, None) is not None:
            self.runner.remove_concept(name)
        self.refused[name] = signature
        log.warning("concept %r skipped: %s", name, why)

    def scan(self) -> list[str]:
        """Every sub-folder again (new ones load, changed ones reload, gone ones drop); the served ids."""
        if self.root is not None:
            try:
                present = {p.name for p in self.root.iterdir() if p.is_dir()}
            except OSError as e:  # the folder went away or became unreadable: serve what is loaded
                log.warning("cannot list %s (%s); concepts not rescanned", self.root, e.strerror or e)
                return self.names()
            for name in sorted(present | set(self.served)):
                if name == BASE:
                    if name not in self.refused:
                        self._refuse(name, (), f"{BASE!r} is the id of the student without a concept")
                elif not is_plain_name(name):
                    if name not in self.refused:
                        self._refuse(name, (), "its name is not a plain concept id (letters, digits, '.', '_', '-')")
                else:
                    self.refresh(name)
        return self.names()
