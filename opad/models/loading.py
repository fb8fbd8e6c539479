"""Load a teacher (SD 2.1-like) and a student (SD-Turbo-like) as one frozen bundle.

The bundle holds one text encoder + tokenizer and one VAE, both the teacher's: OPAD shares them
between the two UNets, as SD 2.1 and SD-Turbo ship identical copies. Only a hub id may download;
a local folder is read with ``local_files_only``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from diffusers.schedulers import DDIMScheduler, EulerDiscreteScheduler
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from opad.errors import OpadError
from opad.models.attention import install_fused_kv
from opad.models.quiet import no_transformers_bars

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SHARED_PARTS = ("text_encoder", "tokenizer", "vae")
TEACHER_PARTS = ("unet", "scheduler", *SHARED_PARTS)
STUDENT_PARTS = ("unet", "scheduler")


@dataclass
class ModelSource:
    """Where one pipeline comes from: a local diffusers folder or a hub id."""

    spec: str
    is_local: bool

    def load_kwargs(self) -> dict:
        return {"local_files_only": True} if self.is_local else {}

    @property
    def path(self) -> str:
        return str(Path(self.spec).resolve()) if self.is_local else self.spec


@dataclass
class ModelBundle:
    """Everything OPAD runs on; all modules frozen (``requires_grad=False``) and in eval mode.

    ``teacher_unet`` / ``teacher_scheduler`` are None in a student-only bundle (generation).
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    teacher_unet: UNet2DConditionModel | None
    teacher_scheduler: SchedulerMixin | None
    student_unet: UNet2DConditionModel
    student_scheduler: SchedulerMixin
    teacher_source: str | None
    student_source: str

    @property
    def device(self) -> torch.device:
        return self.student_unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.student_unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        return self.student_unet.config.sample_size * self.vae_scale_factor


def resolve_source(spec: str, role: str, parts: tuple[str, ...]) -> ModelSource:
    """Check a model argument: an existing diffusers pipeline folder, or else a hub id."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise OpadError(f"{role} model {spec!r} is a file; expected a diffusers pipeline folder")
        index = path / "model_index.json"
        if not index.is_file():
            raise OpadError(
                f"{role} model folder {spec!r} is not a diffusers pipeline: it has no model_index.json"
            )
        try:
            json.loads(index.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise OpadError(f"{role} model folder {spec!r}: model_index.json is not valid JSON ({e})") from e
        missing = [p for p in parts if not (path / p).is_dir()]
        if missing:
            raise OpadError(
                f"{role} model folder {spec!r} is not a complete diffusers pipeline: "
                f"missing {', '.join(missing)}/"
            )
        return ModelSource(str(path), is_local=True)
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return ModelSource(spec, is_local=False)
    raise OpadError(f"{role} model folder not found: {spec!r} (and it is not a hub id like 'org/name')")


def _check_widths(teacher: ModelSource, student: ModelSource) -> None:
    """Teacher text encoder, teacher UNet and student UNet must agree on the text width."""
    try:
        text_width = CLIPTextConfig.from_pretrained(teacher.path, subfolder="text_encoder", **teacher.load_kwargs()).hidden_size
        t_cross = UNet2DConditionModel.load_config(teacher.path, subfolder="unet", **teacher.load_kwargs())["cross_attention_dim"]
        s_cross = UNet2DConditionModel.load_config(student.path, subfolder="unet", **student.load_kwargs())["cross_attention_dim"]
    except OSError as e:
        raise OpadError(f"could not read model configs: {e}") from e
    if t_cross != text_width:
        raise OpadError(
            f"teacher UNet cross_attention_dim {t_cross} does not match its text encoder width {text_width}"
        )
    if s_cross != text_width:
        raise OpadError(
            f"text encoder width mismatch: the teacher's text encoder is {text_width} wide but the student "
            f"UNet expects {s_cross}; teacher and student must share one text encoder (SD 2.1 + SD-Turbo do)"
        )
    if student.is_local and (Path(student.path) / "text_encoder").is_dir():
        s_text = CLIPTextConfig.from_pretrained(student.path, subfolder="text_encoder", local_files_only=True).hidden_size
        if s_text != text_width:
            raise OpadError(
                f"text encoder width mismatch: teacher {text_width}, student {s_text}; "
                "teacher and student must share one text encoder"
            )


def _check_weight_files(src: ModelSource, parts: tuple[str, ...]) -> None:
    """Name a damaged weights file before the loaders fail on it without saying which: opening a
    safetensors file reads only its header, which also tells a truncated file from a whole one."""
    if not src.is_local:
        return
    for part in parts:
        for path in sorted((Path(src.path) / part).glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except (SafetensorError, OSError) as e:
                raise OpadError(f"{path} is damaged or not a safetensors file ({e}); download or copy it again") from e


def _frozen(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.to(device=device).eval()


def _frozen_unet(unet: UNet2DConditionModel, device: torch.device | str) -> UNet2DConditionModel:
    install_fused_kv(unet)  # all cross-attention K/V in one launch per context (training and sampling)
    return _frozen(unet, device)


def _load_pipeline_parts(src: ModelSource, dtype: torch.dtype, with_shared: bool) -> dict:
    kw = src.load_kwargs()
    parts = {
        "unet": UNet2DConditionModel.from_pretrained(src.path, subfolder="unet", torch_dtype=dtype, **kw),
    }
    if with_shared:
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(src.path, subfolder="tokenizer", **kw)
        with no_transformers_bars():  # its warnings (a weight missing or unused) still show
            parts["text_encoder"] = CLIPTextModel.from_pretrained(src.path, subfolder="text_encoder", dtype=dtype, **kw)
        parts["vae"] = AutoencoderKL.from_pretrained(src.path, subfolder="vae", torch_dtype=dtype, **kw)
    return parts


def load_models(
    teacher: str | None = None,
    student: str | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    load_teacher: bool = True,
) -> ModelBundle:
    """Load teacher and student (default: the preset's, ``OPAD_PRESET``: the mini world or the tiny
    one) as a frozen :class:`ModelBundle`.

    With ``load_teacher=False`` only the student folder is read (it must then hold its own text
    encoder, tokenizer and VAE), for generation.
    """
    if student is None or (load_teacher and teacher is None):
        from opad.presets import default_preset

        preset = default_preset().folder()
        teacher = teacher or str(preset / "teacher")
        student = student or str(preset / "student")
    s_src = resolve_source(student, "student", STUDENT_PARTS if load_teacher else TEACHER_PARTS)
    t_src = resolve_source(teacher, "teacher", TEACHER_PARTS) if load_teacher else None
    _check_widths(t_src or s_src, s_src)
    _check_weight_files(s_src, STUDENT_PARTS if load_teacher else TEACHER_PARTS)
    if t_src is not None:
        _check_weight_files(t_src, TEACHER_PARTS)
    try:
        student_parts = _load_pipeline_parts(s_src, dtype, with_shared=not load_teacher)
        student_scheduler = EulerDiscreteScheduler.from_pretrained(s_src.path, subfolder="scheduler", **s_src.load_kwargs())
        teacher_parts, teacher_scheduler = {}, None
        if t_src is not None:
            teacher_parts = _load_pipeline_parts(t_src, dtype, with_shared=True)
            teacher_scheduler = DDIMScheduler.from_pretrained(t_src.path, subfolder="scheduler", **t_src.load_kwargs())
    except (OSError, ValueError, SafetensorError) as e:
        names = f"teacher {t_src.spec!r}, student {s_src.spec!r}" if t_src else f"student {s_src.spec!r}"
        raise OpadError(f"could not load models ({names}): {e}") from e
    shared = teacher_parts if t_src is not None else student_parts
    return ModelBundle(
        tokenizer=shared["tokenizer"],
        text_encoder=_frozen(shared["text_encoder"], device),
        vae=_frozen(shared["vae"], device),
        teacher_unet=_frozen_unet(teacher_parts["unet"], device) if t_src else None,
        teacher_scheduler=teacher_scheduler,
        student_unet=_frozen_unet(student_parts["unet"], device),
        student_scheduler=student_scheduler,
        teacher_source=t_src.spec if t_src else None,
        student_source=s_src.spec,
    )


def teacher_view(bundle: ModelBundle) -> ModelBundle:
    """A student-only bundle whose model is a teacher (``--finetune teacher``) seen as one: its UNet
    in the teacher's seat with the folder's own DDIM scheduler, for :func:`opad.diffusion.sampling.sample_teacher`."""
    src = resolve_source(bundle.student_source, "teacher", TEACHER_PARTS)
    try:
        scheduler = DDIMScheduler.from_pretrained(src.path, subfolder="scheduler", **src.load_kwargs())
    except (OSError, ValueError) as e:
        raise OpadError(f"could not load the teacher scheduler of {src.spec!r}: {e}") from e
    return dataclasses.replace(bundle, teacher_unet=bundle.student_unet, teacher_scheduler=scheduler,
                               teacher_source=bundle.student_source)

