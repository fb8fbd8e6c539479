"""The tiny offline preset: a random SD 2.1-shaped teacher and SD-Turbo-shaped student.

``python -m opad.tiny OUT_DIR`` writes ``OUT_DIR/teacher`` and ``OUT_DIR/student``, each a complete
diffusers ``StableDiffusionPipeline`` folder (same classes and config structure as the real models,
tiny sizes, fixed seed). Teacher and student share identical text-encoder and VAE weights, as SD 2.1
and SD-Turbo do. ``--preset tiny`` (or ``OPAD_PRESET=tiny``) selects it; the tests use it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from opad.cache import cache_root
from opad.diffusion.schedulers import student_scheduler, teacher_scheduler
from opad.errors import OpadError, command_main
from opad.fsutil import check_can_create, staged_dir
from opad.models.quiet import no_transformers_bars
from opad.models.tokenizer import MAX_LENGTH, VOCAB_SIZE, build_sd2_tokenizer

PRESET_VERSION = "tiny-v1"  # bump when the preset's content changes, so caches are rebuilt
SEED = 20260

TEXT_WIDTH = 16


def _text_encoder() -> CLIPTextModel:
    # SD 2.1's text_encoder/config.json with tiny widths (it keeps the quirky bos/eos/pad ids).
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=TEXT_WIDTH,
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )


def _unet(*, upcast_attention: bool) -> UNet2DConditionModel:
    # SD 2.1 / SD-Turbo UNet structure: 3 cross-attention down blocks, linear projections,
    # 2 layers per block (so 16 cross-attention layers, as in the real models).
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        attention_head_dim=(2, 2, 4, 4),
        cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=8,
        use_linear_projection=True,
        upcast_attention=upcast_attention,
    )


def write_tiny_preset(out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/teacher`` and ``out_dir/student``; ``out_dir`` must not exist yet.

    The folder appears complete or not at all.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise OpadError(f"{out_dir} already exists; choose a new folder for the tiny preset")
    check_can_create(out_dir, "the tiny preset to")
    torch.manual_seed(SEED)
    text_encoder = _text_encoder()
    vae = _vae()
    teacher_unet = _unet(upcast_attention=True)
    student_unet = _unet(upcast_attention=False)
    tokenizer = build_sd2_tokenizer()
    with staged_dir(out_dir) as tmp:
        for name, unet, scheduler in (
            ("teacher", teacher_unet, teacher_scheduler()),
            ("student", student_unet, student_scheduler()),
        ):
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            with no_transformers_bars():
                pipe.save_pretrained(tmp / name, safe_serialization=True)
            _compact_json(tmp / name / "tokenizer" / "tokenizer.json")
        (tmp / "VERSION").write_text(PRESET_VERSION + "\n")
    return out_dir


def _compact_json(path: Path) -> None:
    # transformers pretty-prints tokenizer.json (3.6 MB); the compact form is half that.
    path.write_text(json.dumps(json.loads(path.read_text()), separators=(",", ":"), ensure_ascii=False))


def tiny_preset_dir() -> Path:
    """The cached tiny preset, written on first use."""
    path = cache_root() / PRESET_VERSION
    if not (path / "VERSION").is_file():
        try:
            write_tiny_preset(path)
        except OSError:
            if not (path / "VERSION").is_file():  # another process may have won the race
                raise
    return path


@command_main()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opad.tiny",
        description="Write the tiny offline preset: OUT_DIR/teacher (SD 2.1-shaped) and "
        "OUT_DIR/student (SD-Turbo-shaped), each a diffusers StableDiffusionPipeline folder "
        "with random weights, a few MB in all. No network is used.",
    )
    parser.add_argument("out_dir", help="folder to create (must not exist)")
    args = parser.parse_args(argv)
    path = write_tiny_preset(args.out_dir)
    print(f"wrote {path / 'teacher'} and {path / 'student'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
