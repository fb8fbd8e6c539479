"""``python -m opad.evaluate``: DINO, CLIP-I and CLIP-T of generated images against a subject's
real photos, as DreamBench papers report them (raw cosines; see :mod:`opad.evaluation.metrics`).

Inputs: ``--generated DIR`` with ``--manifest FILE`` (CSV or JSON lines with ``file``, ``subject``
and optionally ``prompt``, ``seed``, ``prompt_type``; ``file`` relative to DIR) — or without a
manifest every image in DIR against every real image — and ``--real DIR``: DreamBench's layout (a
sub-folder of photos per subject, e.g. ``../shared/datasets/dreambooth``) or one folder of photos.

Writes into ``--out`` (all or nothing): ``per_image.csv``, ``per_subject.json``,
``per_prompt_type.json`` (with prompts), ``summary.json`` (top-level ``dino``, ``clip_i`` and,
with prompts, ``clip_t``: means over subjects, with bootstrap 95% intervals over subjects) and
``manifest.json`` (model ids, file hashes, library versions, seeds, options).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from opad.cache import cache_root
from opad.devices import pick_device
from opad.errors import OpadError, command_main
from opad.evaluation.dreambench import DreamBench, read_dreambench
from opad.evaluation.encoders import CLIP_DEFAULT_ARCH, Encoder, clip_encoder, dino_encoder
from opad.evaluation.metrics import (
    PAIRINGS,
    bootstrap_interval,
    image_scores,
    prompt_type,
    strip_modifiers,
    text_scores,
)
from opad.fsutil import check_output_folder, file_hash, staged_dir
from opad.train.data import image_files, read_image

ALL = "all"  # the subject of images scored without a manifest
METRICS = ("dino", "clip_i", "clip_t")
NOT_COMPARABLE = "tiny random encoders: these numbers are not comparable with any published ones"


@dataclass
class Generated:
    path: Path
    subject: str
    prompt: str | None = None
    seed: int | None = None
    kind: str | None = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m opad.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--generated", required=True, help="folder of generated images")
    p.add_argument("--real", required=True,
                   help="real photos: DreamBench's layout (a folder per subject) or one folder")
    p.add_argument("--out", required=True, help="output folder (all or nothing)")
    p.add_argument("--manifest", default=None, help="CSV or JSON lines: file, subject[, prompt, seed, prompt_type]")
    p.add_argument("--dino-weights", default=None,
                   help="DINO ViT-S/16 weights: FILE (timm/official checkpoint), DIR (a timm model folder "
                   "with its own input size), world (the mini world's held-out evaluation encoder), hub (downloads), "
                   "or tiny (tests)")
    p.add_argument("--clip-weights", default=None,
                   help="CLIP weights: FILE (open_clip checkpoint), hub[:TAG] (downloads; TAG default openai), world "
                   "(the mini world's clip, both towers) or a world clip DIR, or tiny")
    p.add_argument("--clip-arch", default=CLIP_DEFAULT_ARCH, help="open_clip architecture, e.g. ViT-B-32 or ViT-L-14")
    p.add_argument("--pairing", choices=PAIRINGS, default="all",
                   help="all: each image against every real image of its subject; single: against one reference")
    p.add_argument("--reference-index", type=int, default=0, help="with --pairing single: which real photo (sorted)")
    p.add_argument("--keep-modifier", action="store_true", help="score CLIP-T on the prompt with its <token> kept")
    p.add_argument("--modifier-word", action="append", default=[], help="another word to remove, e.g. sks")
    p.add_argument("--extra-columns", action="store_true",
                   help="also write x100 columns and CLIP-S (2.5 * max(CLIP-T, 0)), labelled as such")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over subjects")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the real images' embedding cache")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def real_sets(root: Path) -> dict[str, list[Path]]:
    """subject -> its photos: the folder's own images (one subject named after it) or a sub-folder each."""
    if not root.is_dir():
        raise OpadError(f"--real folder not found: {str(root)!r}")
    own = image_files(root)
    if own:
        return {root.name: own}
    sets = {p.name: image_files(p) for p in sorted(root.iterdir()) if p.is_dir()}
    sets = {name: files for name, files in sets.items() if files}
    if not sets:
        raise OpadError(f"--real folder {str(root)!r} has no images, in itself or in sub-folders")
    return sets


def _manifest_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise OpadError(f"--manifest not found: {str(path)!r}")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".jsonl", ".json"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(text.splitlines()))
    except (ValueError, csv.Error) as e:
        raise OpadError(f"--manifest {str(path)!r} is not valid {'JSON lines' if path.suffix != '.csv' else 'CSV'} "
                        f"({e})") from None
    if not rows or not all(isinstance(r, dict) and r.get("file") and r.get("subject") for r in rows):
        raise OpadError(f"--manifest {str(path)!r}: every row needs 'file' and 'subject'")
    return rows


def generated_images(folder: Path, manifest: Path | None, subjects: dict[str, list[Path]]) -> list[Generated]:
    if not folder.is_dir():
        raise OpadError(f"--generated folder not found: {str(folder)!r}")
    if manifest is None:
        files = image_files(folder)
        if not files:
            raise OpadError(f"--generated folder {str(folder)!r} has no images")
        return [Generated(path, ALL) for path in files]
    items = []
    for i, row in enumerate(_manifest_rows(manifest), start=1):
        path = folder / str(row["file"])
        if not path.is_file():
            raise OpadError(f"--manifest row {i}: {str(path)!r} does not exist")
        if row["subject"] not in subjects:
            raise OpadError(f"--manifest row {i}: subject {row['subject']!r} has no photos in --real "
                            f"(it has {', '.join(sorted(subjects))})")
        seed = row.get("seed")
        try:
            seed = int(seed) if seed not in (None, "") else None
        except ValueError:
            raise OpadError(f"--manifest row {i}: seed {seed!r} is not an integer") from None
        items.append(Generated(path, row["subject"], row.get("prompt") or None, seed, row.get("prompt_type") or None))
    return items


class EmbeddingCache:
    """Real images' embeddings by file hash, per encoder (``$OPAD_CACHE/eval-embeddings``)."""

    def __init__(self, encoder: Encoder, enabled: bool) -> None:
        key = hashlib.sha256(encoder.model_id.encode()).hexdigest()[:16]
        self.folder = cache_root() / "eval-embeddings" / f"{encoder.name}-{key}" if enabled else None
        self.encoder = encoder
        self.hits = 0

    def images(self, paths: list[Path], hashes: dict[Path, str]) -> np.ndarray:
        rows: dict[Path, np.ndarray] = {}
        if self.folder is not None:
            for path in paths:
                cached = self.folder / f"{hashes[path]}.npy"
                if cached.is_file():
                    rows[path] = np.load(cached)
                    self.hits += 1
        missing = [p for p in paths if p not in rows]
        if missing:
            computed = self.encoder.images([read_image(p) for p in missing])
            for path, row in zip(missing, computed):
                rows[path] = row
                if self.folder is not None:
                    self.folder.mkdir(parents=True, exist_ok=True)
                    tmp = self.folder / f".{hashes[path]}.tmp.npy"
                    np.save(tmp, row)
                    tmp.replace(self.folder / f"{hashes[path]}.npy")
        return np.stack([rows[p] for p in paths])


def _encoders(args: argparse.Namespace) -> tuple[Encoder, Encoder]:
    missing = [flag for flag, value in (("--dino-weights", args.dino_weights), ("--clip-weights", args.clip_weights))
               if not value]
    if missing:
        raise OpadError(f"give {' and '.join(missing)}: a weights FILE, hub (downloads them), world (the mini world's), or tiny "
                        "(random test models whose numbers mean nothing)")
    device = pick_device(args.device)
    return dino_encoder(args.dino_weights).to(device), clip_encoder(args.clip_weights, args.clip_arch).to(device)


def _mean_table(rows: list[dict], key: str, metrics: list[str]) -> dict:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return {name: {"images": len(group), **{m: float(np.mean([r[m] for r in group])) for m in metrics}}
            for name, group in sorted(groups.items())}


def evaluate(args: argparse.Namespace) -> Path:
    if args.bootstrap < 1:
        raise OpadError(f"--bootstrap must be at least 1, got {args.bootstrap}")
    check_output_folder(args.out, args.overwrite)
    real_root = Path(args.real)
    subjects = real_sets(real_root)
    items = generated_images(Path(args.generated), Path(args.manifest) if args.manifest else None, subjects)
    if items[0].subject == ALL:
        subjects = {ALL: [p for files in subjects.values() for p in files]}
    else:  # only the subjects the manifest names are embedded (--real may hold all of DreamBench)
        subjects = {name: files for name, files in subjects.items() if any(i.subject == name for i in items)}
    if args.pairing == "single" and not all(0 <= args.reference_index < len(subjects[i.subject]) for i in items):
        raise OpadError(f"--reference-index {args.reference_index} is past the photos of a subject")
    bench: DreamBench | None = None
    if (real_root / "prompts_and_classes.txt").is_file():
        bench = read_dreambench(real_root / "prompts_and_classes.txt")
    dino, clip = _encoders(args)
    caches = [EmbeddingCache(e, not args.no_cache) for e in (dino, clip)]
    real_hashes = {p: file_hash(p) for files in subjects.values() for p in files}
    real = {name: [cache.images(files, real_hashes) for cache in caches] for name, files in subjects.items()}

    with_prompts = all(item.prompt for item in items)
    metrics = list(METRICS if with_prompts else METRICS[:2])
    rows = []
    for item in tqdm(items, desc="scoring", unit="image", disable=len(items) < 8):
        image = read_image(item.path)
        dino_row, clip_row = dino.images([image]), clip.images([image])
        real_dino, real_clip = real[item.subject]
        row = {"file": str(item.path.relative_to(args.generated)), "subject": item.subject,
               "prompt": item.prompt or "", "prompt_type": item.kind or prompt_type(item.prompt or "", bench),
               "seed": "" if item.seed is None else item.seed,
               "dino": float(image_scores(dino_row, real_dino, args.pairing, args.reference_index)[0]),
               "clip_i": float(image_scores(clip_row, real_clip, args.pairing, args.reference_index)[0])}
        if with_prompts:
            scored = item.prompt if args.keep_modifier else strip_modifiers(item.prompt, tuple(args.modifier_word))
            row["clip_t"] = float(text_scores(clip_row, clip.texts([scored]))[0])
        if args.extra_columns:
            row.update({f"{m}_x100": 100 * row[m] for m in metrics})
            if with_prompts:
                row["clip_s"] = 2.5 * max(row["clip_t"], 0.0)
        rows.append(row)

    per_subject = _mean_table(rows, "subject", metrics)
    summary: dict = {m: float(np.mean([s[m] for s in per_subject.values()])) for m in metrics}
    summary["ci95"] = {m: bootstrap_interval([s[m] for s in per_subject.values()], samples=args.bootstrap,
                                             seed=args.seed) for m in metrics}
    summary.update(images=len(rows), subjects=len(per_subject), pairing=args.pairing,
                   averaged="over subjects, each subject's images weighted equally",
                   clip_t_prompt="as given" if args.keep_modifier else "modifier tokens removed",
                   comparable=dino.comparable and clip.comparable)
    if not summary["comparable"]:
        summary["note"] = NOT_COMPARABLE
    record = {"models": {"dino": dino.model_id, "clip": clip.model_id}, "versions": _versions(),
              "seeds": sorted({i.seed for i in items if i.seed is not None}), "options": _options(args),
              "generated": {row["file"]: file_hash(i.path) for row, i in zip(rows, items)},
              "real": {str(p.relative_to(real_root)): h for p, h in real_hashes.items()},
              "real_embeddings_from_cache": sum(c.hits for c in caches)}

    with staged_dir(args.out, replace=args.overwrite) as tmp:
        with (tmp / "per_image.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "per_subject.json").write_text(json.dumps(per_subject, indent=2))
        if with_prompts:
            (tmp / "per_prompt_type.json").write_text(json.dumps(_mean_table(rows, "prompt_type", metrics), indent=2))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        (tmp / "manifest.json").write_text(json.dumps(record, indent=2))
    return Path(args.out)


def _versions() -> dict[str, str]:
    import open_clip
    import timm
    import torch

    from opad import __version__

    return {"opad": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "open_clip": open_clip.__version__}


def _options(args: argparse.Namespace) -> dict:
    keys = ("pairing", "reference_index", "keep_modifier", "modifier_word", "clip_arch", "bootstrap", "seed")
    return {k: getattr(args, k) for k in keys}


@command_main()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = evaluate(args)
    summary = json.loads((out / "summary.json").read_text())
    scores = "  ".join(f"{m} {summary[m]:.3f}" for m in METRICS if m in summary)
    print(f"{scores}  ({summary['images']} images, {summary['subjects']} subjects) -> {out}")
    if not summary["comparable"]:
        print(f"note: {NOT_COMPARABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
