"""Writing files and folders so that a failure never leaves half of them behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from opad.errors import OpadError


def file_hash(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; on success rename it to ``final``.

    On any exception the temporary folder is removed and ``final`` is untouched. With
    ``replace`` an existing ``final`` is swapped out only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists() and replace:
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)  # fails if final appeared meanwhile: the caller decides
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, data: object) -> None:
    """Write ``data`` as indented JSON to ``path`` whole or not at all (a temporary file, then a rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def check_can_create(path: str | os.PathLike, what: str) -> None:
    """Refuse, in one line, an output folder that cannot be made: under a file, or where nothing can
    be written. Probes by making (and removing) a temporary folder in the nearest existing parent,
    since permission bits do not stop root and read-only or virtual file systems refuse anyway."""
    target = Path(path).absolute()
    parent = next(p for p in (target, *target.parents) if p.exists())
    if not parent.is_dir():
        raise OpadError(f"cannot write {what} {str(path)!r}: {str(parent)!r} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".opad-probe-", dir=parent))
    except OSError as e:
        raise OpadError(f"cannot write {what} {str(path)!r}: {e.strerror or e}") from e


def check_output_folder(path: str | os.PathLike, overwrite: bool, flag: str = "--out") -> None:
    """Refuse, in one line, an output folder that is a file, is not empty (unless ``overwrite``)
    or cannot be made."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OpadError(f"{flag} {str(path)!r} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OpadError(f"{flag} {str(path)!r} is not empty; pass --overwrite to replace it")
    check_can_create(out, flag)
