"""``python -m opad.generate``: images from the one-step student, with or without a concept."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import opad
from opad.concept.folder import load_concept
from opad.config import MAX_SEED
from opad.devices import pick_device, pick_dtype
from opad.diffusion.sampling import STUDENT_STEPS, sample_student
from opad.errors import OpadError, command_main, warn
from opad.fsutil import check_output_folder, staged_dir
from opad.models.loading import ModelBundle, load_models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m opad.generate",
        description="Generate images with the one-step student (SD-Turbo-like), optionally with a "
        "trained concept. Writes NNN_seedS.png files and generation.json (every parameter and "
        "the time of each image) into --out. With no model arguments it uses the preset (OPAD_PRESET: the mini world by default, or tiny).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--student", default=None, help="student diffusers folder or hub id (default: the preset's, OPAD_PRESET: the mini world or tiny)")
    p.add_argument("--concept", default=None, help="concept folder written by opad.train.cli (any of its formats: "
                   "custom-diffusion, lora, unet, textual-inversion)")
    p.add_argument("--prompt", default="a photo of a dog", help="text prompt; use the concept's token, e.g. '<new1>'")
    p.add_argument("--steps", type=int, choices=STUDENT_STEPS, default=1, help="student sampling steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--num-images", type=int, default=4, help="how many images to write")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: the model's)")
    p.add_argument("--out", default="opad-samples", help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, else float32), float32, float16, bfloat16")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise OpadError("--prompt is empty")
    if args.num_images < 1:
        raise OpadError(f"--num-images must be at least 1, got {args.num_images}")
    if not 0 <= args.seed <= MAX_SEED - (args.num_images - 1):
        raise OpadError(f"--seed must be in 0..{MAX_SEED} (image i uses seed + i), got {args.seed}")
    check_output_options(args)


def check_output_options(args: argparse.Namespace) -> None:
    """``--resolution``, ``--out`` (with ``--overwrite``) and ``--concept``, as generate and the export take them."""
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise OpadError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    check_output_folder(args.out, args.overwrite)
    if args.concept is not None and not Path(args.concept).is_dir():
        raise OpadError(f"concept folder not found: {args.concept!r}")


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[0, 1] float images (B, 3, H, W) to PIL, rounded as diffusers does."""
    arr = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def load_student(student: str | None, concept: str | None, device: str = "auto",
                 dtype: str = "auto") -> tuple[ModelBundle, list[str]]:
    """The student bundle with ``concept`` (any format) applied, and the concept's tokens."""
    dev = pick_device(device)
    bundle = load_models(student=student, device=dev, dtype=pick_dtype(dtype, dev), load_teacher=False)
    tokens = []
    if concept is not None:
        tokens = load_concept(concept, bundle.student_unet, bundle.tokenizer, bundle.text_encoder)
    return bundle, tokens


def timed_image(bundle: ModelBundle, prompt: str, seed: int, steps: int,
                resolution: int | None = None) -> tuple[Image.Image, float]:
    """One image (``seed``'s noise) and the seconds it took (synchronised on a GPU)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start = time.perf_counter()
    images = sample_student(bundle, [prompt], steps=steps, generator=generator, resolution=resolution)
    if bundle.device.type == "cuda":
        torch.cuda.synchronize(bundle.device)
    seconds = time.perf_counter() - start
    return to_pil(images)[0], seconds


def run(args: argparse.Namespace) -> Path:
    _check_args(args)
    t0 = time.perf_counter()
    bundle, tokens = load_student(args.student, args.concept, args.device, args.dtype)
    if args.concept is not None:
        if not any(t in args.prompt for t in tokens):
            warn(f"the prompt does not use the concept's token(s) {tokens}")
    load_seconds = time.perf_counter() - t0
    resolution = args.resolution or bundle.default_resolution
    out = Path(args.out)
    records = []
    with staged_dir(out, replace=True) as tmp:
        for i in range(args.num_images):
            seed = args.seed + i
            image, seconds = timed_image(bundle, args.prompt, seed, args.steps, resolution)
            name = f"{i:03d}_seed{seed}.png"
            image.save(tmp / name)
            records.append({"file": name, "seed": seed, "seconds": round(seconds, 4)})
            print(f"[{i + 1}/{args.num_images}] {name} ({seconds:.2f} s)", file=sys.stderr)
        meta = {
            "prompt": args.prompt,
            "student": bundle.student_source,
            "concept": str(Path(args.concept).resolve()) if args.concept else None,
            "concept_tokens": tokens,
            "steps": args.steps,
            "seed": args.seed,
            "num_images": args.num_images,
            "resolution": resolution,
            "device": str(bundle.device),
            "dtype": str(bundle.dtype).removeprefix("torch."),
            "model_load_seconds": round(load_seconds, 3),
            "images": records,
            "opad_version": opad.__version__,
            "torch_version": torch.__version__,
            "python": platform.python_version(),
        }
        (tmp / "generation.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


@command_main()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = run(args)
    print(f"wrote {args.num_images} image(s) and generation.json to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
