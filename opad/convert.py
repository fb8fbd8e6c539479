"""``python -m opad.convert`` (``opad convert``): a concept to the files community tools load.

``--to kohya`` writes ``OUT/NAME.safetensors`` (a kohya LoRA: ComfyUI's LoraLoader, A1111 / Forge's
``<lora:NAME:1>``, kohya's scripts) and ``OUT/embeddings/WORD.safetensors`` (the modifier token as an SD
2.x embedding: ``embedding:WORD`` in ComfyUI, ``WORD`` in A1111 / Forge). ``--to diffusers-lora`` writes
an opad lora concept folder, which ``pipe.load_lora_weights(OUT)`` and
``pipe.load_textual_inversion(OUT, weight_name="<new1>.safetensors")`` read. Both factor each
changed weight's delta from the base by SVD; ``OUT/conversion.json`` records each layer's rank and
error, and how to use the files.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from opad.concept.base import check_same_base
from opad.concept.community import (
    WORD,
    common_metadata,
    write_diffusers_lora,
    write_embedding,
    write_kohya,
)
from opad.concept.factor import ConceptDeltas, check_factorable, concept_deltas, factor
from opad.concept.folder import META_NAME, WEIGHTS_NAME, read_description
from opad.concept.tokens import write_token_rows
from opad.errors import OpadError, command_main, warn
from opad.fsutil import check_output_folder, staged_dir
from opad.models.loading import load_models

TARGETS = ("kohya", "diffusers-lora")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
REPORT_NAME = "conversion.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m opad.convert",
        description="Convert a concept folder (custom-diffusion, lora or textual-inversion) to the LoRA and "
        "embedding files ComfyUI, AUTOMATIC1111 / Forge and kohya load (--to kohya), or to diffusers' LoRA "
        "layout (--to diffusers-lora). Each weight the concept changed becomes its delta from the base model, "
        "factored by SVD: --rank full is exact; a lower rank is the best approximation, and each layer's error "
        "is printed and written to OUT/conversion.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("concept", help="concept folder written by opad (a run's concept/, or teacher_concept/ with "
                   "--base TEACHER)")
    p.add_argument("--to", required=True, choices=TARGETS, help="kohya: OUT/NAME.safetensors + "
                   "OUT/embeddings/WORD.safetensors; diffusers-lora: OUT is a concept folder diffusers' "
                   "load_lora_weights reads")
    p.add_argument("--out", required=True, help="output folder (must not exist, or be empty, unless --overwrite)")
    p.add_argument("--base", default=None, help="the model the concept was trained on, a diffusers folder or hub "
                   "id (default: the preset's student, OPAD_PRESET: the mini world or tiny)")
    p.add_argument("--rank", default="full", help="'full' (exact) or the LoRA rank of every layer")
    p.add_argument("--name", default=None, help="the LoRA's name and the prompt word of its embedding (letters, "
                   "digits, _ and -; default: opad_ + the run folder's name)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the kohya files (float16 halves "
                   "them; diffusers-lora is always float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def _rank(text: str) -> int | None:
    """None for 'full', else a positive int."""
    if text == "full":
        return None
    if not text.isdigit() or int(text) < 1:
        raise OpadError(f"--rank must be 'full' or a positive whole number, got {text!r}")
    return int(text)


def default_name(concept: Path) -> str:
    """opad_ + the run's folder name (a run's concept/ is named for what it holds, not for the subject)."""
    folder = concept.resolve()
    stem = folder.parent.name if folder.name in ("concept", "teacher_concept") else folder.name
    stem += "_teacher" if folder.name == "teacher_concept" else ""
    return "opad_" + (re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "concept")[:58]


def _checked_name(name: str) -> str:
    if not WORD.fullmatch(name):
        raise OpadError(f"--name {name!r} must start with a letter and hold only letters, digits, _ and - (at most "
                        "64): it is a file name and a prompt word")
    return name


def _check_concept(concept: Path) -> dict:
    """The concept's description, read before any model is loaded."""
    if not concept.is_dir():
        raise OpadError(f"concept folder not found: {str(concept)!r}")
    if not (concept / META_NAME).is_file() and not (concept / WEIGHTS_NAME).is_file():
        raise OpadError(f"{concept} is not a concept folder: it has neither {META_NAME} nor {WEIGHTS_NAME}")
    description = read_description(concept)
    check_factorable(concept, description["format"])
    return description


def _layer_ranks(concept: ConceptDeltas, rank: int | None) -> dict[str, int]:
    """Each changed layer's rank: its full rank, or ``rank`` (refused where a layer cannot have it)."""
    if rank is None:
        return dict(concept.full_ranks)
    for module, delta in concept.deltas.items():
        if rank > min(delta.shape):
            raise OpadError(f"--rank {rank} is larger than layer {module!r} allows (its weight is "
                            f"{tuple(delta.shape)}, so at most {min(delta.shape)}); use --rank full or a smaller rank")
    return {module: min(rank, full) for module, full in concept.full_ranks.items()}


def factor_all(concept: ConceptDeltas, ranks: dict[str, int], dtype: torch.dtype) -> tuple[dict, dict, float]:
    """Factor every delta; return {module: (up, down)}, {module: {rank, relative_error}} (the error of
    the factors as written, in ``dtype``) and the overall relative error."""
    factors, layers, err2, norm2 = {}, {}, 0.0, 0.0
    for module in tqdm(list(concept.deltas), desc="factoring", unit="layer", disable=None, file=sys.stderr):
        delta = concept.deltas[module]
        f = factor(delta, ranks[module])
        factors[module] = (f.up, f.down)
        written = f.up.to(dtype).double() @ f.down.to(dtype).double()
        error2, total2 = float((delta.double() - written).square().sum()), float(delta.double().square().sum())
        layers[module] = {"rank": ranks[module], "relative_error": (error2 / total2) ** 0.5}
        err2, norm2 = err2 + error2, norm2 + total2
    return factors, layers, (err2 / norm2) ** 0.5 if norm2 > 0 else 0.0


def _print_errors(layers: dict, overall: float, full: bool) -> None:
    if not layers:
        return
    if not full:
        width = max(len(m) for m in layers)
        for module, layer in layers.items():
            print(f"  {module:<{width}}  rank {layer['rank']:>5}  relative error {layer['relative_error']:.2e}",
                  file=sys.stderr)
    worst = max(layer["relative_error"] for layer in layers.values())
    print(f"{len(layers)} layers, overall relative error {overall:.2e} (worst layer {worst:.2e})", file=sys.stderr)


def _usage(to: str, name: str, words: list[str], tokens: list[str], has_lora: bool) -> dict[str, str]:
    """How to use the files in each tool, for conversion.json and the last lines printed."""
    if to == "diffusers-lora":
        token = tokens[0] if tokens else "<new1>"
        lora = "pipe.load_lora_weights(OUT); " if has_lora else ""
        return {"diffusers": f"{lora}pipe.load_textual_inversion(OUT, weight_name='{token}.safetensors'); "
                             f"prompt 'a photo of {token} dog'",
                "opad": "python -m opad.generate --concept OUT --prompt 'a photo of " + token + " dog'"}
    word = words[0] if words else name
    lora_comfy = f"a LoraLoader node with {name}.safetensors (models/loras), " if has_lora else ""
    lora_a1111 = f" <lora:{name}:1>" if has_lora else ""
    return {
        "ComfyUI": f"{lora_comfy}embeddings/{word}.safetensors in models/embeddings, prompt 'a photo of "
                   f"embedding:{word} dog'",
        "AUTOMATIC1111 / Forge": f"{name}.safetensors in models/Lora, embeddings/{word}.safetensors in embeddings/, "
                                 f"prompt 'a photo of {word} dog{lora_a1111}'",
        "diffusers": (f"pipe.load_lora_weights(OUT, weight_name='{name}.safetensors'); " if has_lora else "")
                     + f"pipe.load_textual_inversion(OUT/embeddings/{word}.safetensors, token='{word}')",
    }


def _shareable(base: str) -> str:
    """The base as the files name it: a hub id as is, a local folder by its last two parts (no home paths)."""
    path = Path(base)
    return "/".join(path.parts[-2:]) if path.is_absolute() else base


def run(args: argparse.Namespace) -> Path:
    concept, out = Path(args.concept), Path(args.out)
    rank = _rank(args.rank)
    name = _checked_name(args.name) if args.name else default_name(concept)
    description = _check_concept(concept)
    check_output_folder(out, args.overwrite)
    bundle = load_models(student=args.base, load_teacher=False)
    base = bundle.student_source
    where = f"concept {str(concept)!r}"
    if not check_same_base(description.get("base"), bundle.student_unet, where, base):
        warn(f"{where} does not record which model it was trained on (diffusers' own output, or an older opad): "
             f"only the shapes were checked against {base!r}")
    deltas = concept_deltas(concept, bundle)
    ranks = _layer_ranks(deltas, rank)
    dtype = DTYPES[args.dtype] if args.to == "kohya" else torch.float32
    factors, layers, overall = factor_all(deltas, ranks, dtype)
    _print_errors(layers, overall, rank is None)
    tokens = list(deltas.rows)
    words = [name] if len(tokens) == 1 else [f"{name}_{i + 1}" for i in range(len(tokens))]
    cross = bundle.student_unet.config.cross_attention_dim
    metadata = common_metadata(name=name, base=_shareable(base), base_id=(description.get("base") or {}).get("probe_id"),
                               rank=args.rank, description=description, tokens=tokens, words=words,
                               cross_attention_dim=cross)
    usage = _usage(args.to, name, words, tokens, bool(factors))
    report = {"concept": str(concept.resolve()), "to": args.to, "base": base, "rank": args.rank,
              "dtype": str(dtype).removeprefix("torch."), "name": name, "tokens": tokens,
              "prompt_words": dict(zip(tokens, words)), "overall_relative_error": overall, "layers": layers,
              "usage": usage}
    with staged_dir(out, replace=True) as tmp:
        if args.to == "kohya":
            if factors:
                write_kohya(tmp / f"{name}.safetensors", factors, dtype, metadata)
            (tmp / "embeddings").mkdir()
            for token, word in zip(tokens, words):
                write_embedding(tmp / "embeddings" / f"{word}.safetensors", deltas.rows[token], dtype,
                                {**metadata, "opad_token": token, "name": word})
        else:
            if factors:
                write_diffusers_lora(tmp, factors)
            write_token_rows(tmp, deltas.rows)
            fmt = "lora" if factors else "textual-inversion"
            meta = {"tokens": tokens, "format": fmt, "method": description.get("method", description["format"])}
            if description.get("base"):
                meta["base"] = description["base"]
            (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    if not factors:
        print(f"{concept} changes no UNet weight (a {description['format']} concept): only its embedding is written",
              file=sys.stderr)
    for tool, how in usage.items():
        print(f"{tool}: {how}", file=sys.stderr)
    return out


@command_main()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = run(args)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
