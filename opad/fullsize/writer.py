"""The full-size offline preset: random weights in exactly the published SD 2.1 / SD-Turbo architectures.

``python -m opad.fullsize OUT`` writes, with no download:

- ``OUT/teacher``: a diffusers ``StableDiffusionPipeline`` folder with stabilityai/stable-diffusion-2-1's
  configuration (UNet 865.9 M parameters, VAE 83.7 M, the OpenCLIP ViT-H/14 text encoder cut at its
  penultimate layer, 340.4 M, DDIM v-prediction scheduler, the SD 2 tokenizer);
- ``OUT/student``: stabilityai/sd-turbo's (the same UNet at 512 px without attention upcasting, the same
  text encoder and VAE -- the same weights, hard-linked where the file system allows --, Euler);
- ``OUT/backbones``: the paper's frozen backbones as the files ``--backbone-weights`` / ``--ip-adapter`` read:
  open_clip ViT-H-14's visual tower, IP-Adapter SD1.5's image projection, timm DINOv2 ViT-L/14 (518 px) and
  DINO ViT-S/16.

The weights are random (what the models draw is noise) but sized, shaped and typed as the real ones, so
every code path -- loading, training, export, the runners -- meets the real memory and compute. Models are
built on the meta device (no default initialisation of 3.1 B parameters) and each tensor is filled from its
own seeded generator: Linear/Conv weights N(0, 1/fan_in) (activations keep their scale layer after layer),
norms 1 and 0, biases 0, layer scales 1, embeddings and tokens N(0, 0.02). The same seed writes the same files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import safetensors.torch
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from opad.diffusion.schedulers import student_scheduler, teacher_scheduler
from opad.errors import OpadError, command_main
from opad.fsutil import check_can_create, staged_dir
from opad.models.quiet import no_transformers_bars
from opad.models.tokenizer import build_sd2_tokenizer
from opad.presets.tiny import _compact_json

SEED = 20261
PARTS = ("teacher", "student", "backbones")
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}

# stabilityai/stable-diffusion-2-1 unet/config.json (every architectural key)
TEACHER_UNET: dict = dict(
    act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, num_class_embeds=None,
    only_cross_attention=False, out_channels=4, sample_size=96,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    use_linear_projection=True, upcast_attention=True,
)
# stabilityai/sd-turbo: the same UNet, native 512 px, no attention upcasting
STUDENT_UNET: dict = {**TEACHER_UNET, "sample_size": 64, "upcast_attention": False}
# vae/config.json of both
VAE: dict = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    norm_num_groups=32, sample_size=768, scaling_factor=0.18215,
)
# text_encoder/config.json of both: OpenCLIP ViT-H/14's text tower up to its penultimate layer (23 of 24)
TEXT_ENCODER: dict = dict(
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, projection_dim=512,
    hidden_act="gelu", vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-05, bos_token_id=0,
    eos_token_id=2, pad_token_id=1,
)
# scheduler_config.json keys the published files hold beyond the tiny preset's (SD 2.1 keeps PNDM's flag)
TEACHER_SCHEDULER_EXTRA = {"skip_prk_steps": True}

# Parameter counts: the published models' (each counted from the real checkpoints' shapes) and this writer's.
PUBLISHED_PARAMETERS = {
    "unet": 865_910_724,
    "vae": 83_653_863,
    "text_encoder": 340_387_840,
    "clip": 632_076_800,  # open_clip ViT-H-14 visual tower (with its 1280 -> 1024 projection)
    "ip_adapter": 3_150_336,  # Linear(1024, 4 * 768) + LayerNorm(768)
    "dino_v2": 304_367_616,  # timm vit_large_patch14_dinov2 at 518 px, no head
    "dino_v1": 21_665_664,  # timm vit_small_patch16_224.dino, no head
}

CLIP_ARCH = "ViT-H-14"
DINO_V2 = "vit_large_patch14_dinov2.lvd142m"
DINO_V1 = "vit_small_patch16_224.dino"
IP_TOKENS, IP_TOKEN_DIM = 4, 768  # IP-Adapter SD1.5: 4 tokens of SD 1.5's 768-wide context
BACKBONE_FILES = {
    "clip": "open_clip_vit_h14_visual.safetensors",
    "ip_adapter": "ip-adapter_sd15.safetensors",
    "dino_v2": "dinov2_vitl14.safetensors",
    "dino_v1": "dino_vits16.safetensors",
}


# ---------------------------------------------------------------------------- the models, on the meta device
def _empty(empty: bool):
    """Parameters on the meta device (no memory, no initialisation) unless ``empty`` is False (then the
    modules' own initialisation runs: under a FakeTensorMode, fake tensors)."""
    return init_empty_weights() if empty else nullcontext()


def build_unet(config: dict, *, empty: bool = True) -> UNet2DConditionModel:
    with _empty(empty):
        return UNet2DConditionModel(**config)


def build_vae(config: dict | None = None, *, empty: bool = True) -> AutoencoderKL:
    with _empty(empty):
        return AutoencoderKL(**(config or VAE))


def build_text_encoder(config: dict | None = None, *, empty: bool = True) -> CLIPTextModel:
    with _empty(empty), no_transformers_bars():
        return CLIPTextModel(CLIPTextConfig(**(config or TEXT_ENCODER)))


def build_backbones(*, empty: bool = True) -> dict[str, nn.Module]:
    """The paper's backbones by ``BACKBONE_FILES`` key."""
    import timm

    from opad.models.towers import ImageProjection, clip_vision_tower

    with _empty(empty):
        clip = clip_vision_tower(CLIP_ARCH)
        return {
            "clip": clip,
            "ip_adapter": ImageProjection(clip.output_dim, IP_TOKENS, IP_TOKEN_DIM),
            "dino_v2": timm.create_model(DINO_V2, pretrained=False, num_classes=0),
            "dino_v1": timm.create_model(DINO_V1, pretrained=False, num_classes=0),
        }


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------- filling
def _std(module: nn.Module, name: str, shape: torch.Size) -> float | None:
    """The fill of one parameter: a standard deviation, or None for a constant (norms, biases)."""
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and name == "weight":
        return (shape[1:].numel()) ** -0.5  # fan_in: keeps each layer's output at its input's scale
    if name in ("bias", "gamma") or "norm" in type(module).__name__.lower():
        return None  # biases 0; norms and layer scales (DINOv2's) 1: each residual branch at full weight
    if len(shape) == 2 and type(module).__name__ == "VisionTransformer" and name == "proj":
        return shape[0] ** -0.5  # open_clip's output projection, applied as x @ proj
    return 0.02  # embeddings, class tokens, positional embeddings


def _constant(module: nn.Module, name: str) -> float:
    return 0.0 if name == "bias" else 1.0


def fill(module: nn.Module, *, seed: int, dtype: torch.dtype, prefix: str = "") -> nn.Module:
    """Give every meta parameter of ``module`` real values, each from its own generator (seeded by
    ``seed`` and the parameter's name, so one tensor's values never depend on another's)."""
    for module_name, sub in module.named_modules():
        for name, param in list(sub._parameters.items()):
            if param is None or not param.is_meta:
                continue
            full = prefix + ".".join(filter(None, (module_name, name)))
            value = torch.empty(param.shape, dtype=dtype)
            std = _std(sub, name, param.shape)
            if std is None:
                value.fill_(_constant(sub, name))
            else:
                value.normal_(0.0, std, generator=torch.Generator().manual_seed(zlib.crc32(f"{seed}:{full}".encode())))
            sub._parameters[name] = nn.Parameter(value, requires_grad=False)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"left on the meta device: {', '.join(left[:3])}")
    for sub in module.modules():  # float buffers in the weights' dtype (module.to would warn on diffusers models)
        for name, buffer in sub._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                sub._buffers[name] = buffer.to(dtype)
    return module


# ---------------------------------------------------------------------------- writing
def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


@contextmanager
def _progress(what: str, count: int) -> Iterator[Callable[[Path], None]]:
    """One line per component: its parameters, bytes on disk and seconds."""
    start = time.perf_counter()
    written: list[Path] = []
    yield written.append
    size = sum(_size(p) for p in written)
    print(f"  {what:<22} {count:>13,} parameters  {size / 2**30:6.2f} GiB  {time.perf_counter() - start:6.1f} s",
          file=sys.stderr, flush=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    """The same files in a second place: hard links (no second copy on disk), else copies."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def _write_pipeline(folder: Path, unet_config: dict, scheduler, *, dtype: torch.dtype, seed: int,
                    shared_from: Path | None) -> None:
    """One pipeline folder: model_index.json, the scheduler, the tokenizer and the three models, one model
    in memory at a time (peak: the UNet's weights). ``shared_from``: an earlier folder whose text encoder
    and VAE this one shares."""
    tokenizer = build_sd2_tokenizer()
    models = {"unet": build_unet(unet_config), "text_encoder": build_text_encoder(), "vae": build_vae()}
    pipe = StableDiffusionPipeline(**models, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    folder.mkdir(parents=True)
    pipe.save_config(folder)  # model_index.json: the components' classes (the models are still on meta)
    del pipe
    scheduler.save_pretrained(folder / "scheduler")
    tokenizer.save_pretrained(folder / "tokenizer")
    _compact_json(folder / "tokenizer" / "tokenizer.json")
    for name in ("text_encoder", "vae", "unet"):
        model = models.pop(name)
        with _progress(f"{folder.name}/{name}", parameter_count(model)) as done:
            if name != "unet" and shared_from is not None:
                _link_or_copy(shared_from / name, folder / name)
            else:  # the shared parts are seeded by name alone: SD-Turbo ships SD 2.1's text encoder and VAE
                fill(model, seed=seed, dtype=dtype, prefix=f"{folder.name}.unet." if name == "unet" else f"{name}.")
                with no_transformers_bars():
                    model.save_pretrained(folder / name, safe_serialization=True)
            done(folder / name)
        del model


def write_backbones(folder: Path, *, dtype: torch.dtype, seed: int) -> dict[str, Path]:
    """The backbone files (``BACKBONE_FILES``) in ``folder``: name -> path."""
    folder.mkdir(parents=True)
    paths = {}
    for name, module in build_backbones().items():
        path = paths[name] = folder / BACKBONE_FILES[name]
        with _progress(f"backbones/{name}", parameter_count(module)) as done:
            state = fill(module, seed=seed, dtype=dtype, prefix=f"{name}.").state_dict()
            # open_clip's layout (a whole CLIP's keys; the loader reads the visual. ones), IP-Adapter's
            # image_proj. keys, timm's own keys
            key_prefix = {"clip": "visual.", "ip_adapter": "image_proj."}.get(name, "")
            safetensors.torch.save_file({key_prefix + k: v.contiguous() for k, v in state.items()}, str(path))
            done(path)
        del state, module
    return paths


def training_flags(out: Path) -> str:
    """The ``python -m opad.train`` flags that train on this folder with the paper's backbones."""
    bb = out / "backbones"
    weights = ",".join(f"{name}={bb / BACKBONE_FILES[name]}" for name in ("dino_v1", "dino_v2", "clip"))
    return (f"--teacher {out / 'teacher'} --student {out / 'student'} --backbone-weights {weights} "
            f"--ip-adapter {bb / BACKBONE_FILES['ip_adapter']} --dino-v2-size large --clip-arch {CLIP_ARCH}")


def write_fullsize(out: str | os.PathLike, *, dtype: str = "fp16", only: tuple[str, ...] = PARTS,
                   seed: int = SEED) -> Path:
    """Write the parts in ``only`` under ``out`` (which must not exist), all of them or nothing."""
    out = Path(out)
    if dtype not in DTYPES:
        raise OpadError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    bad = [p for p in only if p not in PARTS]
    if bad or not only:
        raise OpadError(f"--only takes a comma list of {', '.join(PARTS)}, got {','.join(only)!r}")
    if out.exists():
        raise OpadError(f"{out} already exists; choose a new folder for the full-size preset")
    check_can_create(out, "the full-size preset to")
    torch_dtype = DTYPES[dtype]
    with staged_dir(out) as tmp:
        written: Path | None = None
        for role, config, scheduler in (("teacher", TEACHER_UNET, _teacher_scheduler()),
                                        ("student", STUDENT_UNET, student_scheduler())):
            if role in only:
                _write_pipeline(tmp / role, config, scheduler, dtype=torch_dtype, seed=seed, shared_from=written)
                written = tmp / role
        if "backbones" in only:
            write_backbones(tmp / "backbones", dtype=torch_dtype, seed=seed)
    return out


def _teacher_scheduler():
    scheduler = teacher_scheduler()
    scheduler.register_to_config(**TEACHER_SCHEDULER_EXTRA)
    return scheduler


@command_main()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opad.fullsize",
        description="Write random-weight models with exactly the published architectures, no download: "
        "OUT/teacher (stabilityai/stable-diffusion-2-1), OUT/student (stabilityai/sd-turbo), each a diffusers "
        "StableDiffusionPipeline folder, and OUT/backbones (open_clip ViT-H-14 visual tower, IP-Adapter SD1.5 "
        "image projection, DINOv2 ViT-L/14, DINO ViT-S/16). About 7 GiB in fp16 (the published repositories "
        "ship fp32 files and an fp16 variant; --dtype fp32 doubles it).",
    )
    parser.add_argument("out_dir", help="folder to create (must not exist)")
    parser.add_argument("--dtype", default="fp16", choices=tuple(DTYPES), help="weights' precision (default fp16)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of the random weights (default {SEED})")
    args = parser.parse_args(argv)
    only = tuple(p.strip() for p in args.only.split(",") if p.strip())
    start = time.perf_counter()
    print(f"writing the full-size preset to {args.out_dir} ({args.dtype})", file=sys.stderr)
    out = write_fullsize(args.out_dir, dtype=args.dtype, only=only, seed=args.seed)
    print(f"wrote {', '.join(only)} under {out} ({_size(out) / 2**30:.2f} GiB, "
          f"{time.perf_counter() - start:.0f} s)")
    if "backbones" in only:
        print(f"train on them with: python -m opad.train --profile paper {training_flags(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
