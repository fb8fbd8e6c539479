"""The sidecar JSON beside every export: what it was made from and how, so a folder that does not
match the concept, precision or student asked for is refused instead of giving wrong images."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path

import opad
from opad.errors import OpadError
from opad.fsutil import file_hash

SIDECAR = "export.json"
FORMAT = 1
LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxscript", "diffusers", "transformers")
_HASHED = (".safetensors", ".bin", ".json", ".txt")  # weights, configs, vocab/merges


def folder_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every weight/config file under ``folder``, by relative path."""
    root = Path(folder)
    return {str(p.relative_to(root)): file_hash(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in _HASHED}


def concept_id(concept_dir: str | Path | None) -> str:
    """A concept's identity: a hash over its files (the base student is ``base``)."""
    if concept_dir is None:
        return "base"
    digest = hashlib.sha256(json.dumps(folder_hashes(concept_dir), sort_keys=True).encode())
    return f"{Path(concept_dir).resolve().name}-{digest.hexdigest()[:12]}"


def library_versions() -> dict[str, str]:
    versions = {"opad": opad.__version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_sidecar(folder: Path, record: dict) -> Path:
    path = folder / SIDECAR
    path.write_text(json.dumps({"format": FORMAT, **record}, indent=2) + "\n")
    return path


def read_sidecar(folder: str | Path) -> dict:
    path = Path(folder) / SIDECAR
    if not path.is_file():
        raise OpadError(f"{folder} is not an opad ONNX export: it has no {SIDECAR}")
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise OpadError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise OpadError(f"{path} is not an opad export sidecar of format {FORMAT}")
    return record


def check_matches(record: dict, folder: str | Path, *, concept_dir: str | Path | None = None,
                  precision: str | None = None) -> None:
    """Refuse an export made from another concept or in another precision than asked for."""
    if concept_dir is not None and record.get("concept_id") != concept_id(concept_dir):
        raise OpadError(f"{folder} was exported for concept {record.get('concept_id')!r}, not for "
                        f"{concept_id(concept_dir)!r} ({concept_dir}); export that concept")
    if precision is not None and record.get("precision") != precision:
        raise OpadError(f"{folder} is a {record.get('precision')} export, not {precision}")
