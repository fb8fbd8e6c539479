"""The trainer's typed configuration: one dataclass, read from a JSON/YAML file and/or flags.

Every field is a flag (``--max-steps`` for ``max_steps``) whose help text is the field's
``help`` metadata; ``--config FILE`` fills the same fields and flags override it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from opad.config.profiles import PROFILES, describe_default, profile_defaults
from opad.errors import OpadError
from opad.presets import PRESETS, Preset

DISCRIMINATORS = ("dino_v1", "dino_v2", "clip")
ID_ENCODERS = DISCRIMINATORS
RESIZE_MODES = ("antialias", "area", "bilinear")
MAX_SEED = 2**32 - 1
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# --method: OPAD, its teacher-first variant, and the paper's Table-5 baselines on the student alone
METHODS = ("opad", "teacher-first", "custom-diffusion", "dreambooth", "lora", "textual-inversion")
BASELINES = ("custom-diffusion", "dreambooth", "lora", "textual-inversion")
# Real-model defaults per method: iterations as in the paper's Table 5; learning rates as each
# method's reference script (diffusers' examples: Custom Diffusion's 1e-5 scaled by batch size,
# DreamBooth 5e-6, LoRA 1e-4, textual inversion 5e-4).
METHOD_STEPS = {"opad": 1000, "teacher-first": 1000, "custom-diffusion": 1000, "dreambooth": 1000, "lora": 800,
                "textual-inversion": 4000}
METHOD_LR = {"opad": 1e-5, "teacher-first": 1e-5, "custom-diffusion": 1e-5, "dreambooth": 5e-6, "lora": 1e-4,
             "textual-inversion": 5e-4}
LR_PER_IMAGE = ("opad", "teacher-first", "custom-diffusion")  # their learning rate is per image of the batch
# Unset fields that neither profile decides: these defaults, unless the run's preset sets its own
MODEL_DEFAULTS: dict[str, object] = {"discriminators": list(DISCRIMINATORS)}


class _FromProfile:
    """The default of a field that ``--profile`` decides (see opad/profiles.py)."""

    def __repr__(self) -> str:
        return "<from profile>"


FROM_PROFILE = _FromProfile()


def _f(default, help: str, **kw):
    """A field; ``choices=(...)`` in ``kw`` lists its allowed values (checked by ``validate``)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _p(help: str, **kw):
    """A field whose default comes from the profile; a value the user gives always wins."""
    return field(default=FROM_PROFILE, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    method: str = _f("opad", "training method: opad (the paper's), teacher-first (paper Table 6), or a Table-5 "
                     "baseline on the student alone: custom-diffusion (K/V + token), dreambooth (the whole "
                     "UNet), lora (UNet LoRA through peft), textual-inversion (the token only); the baselines "
                     "use no teacher, discriminators or collaborative stage", choices=METHODS)
    finetune: str = _f("student", "the model a Table-5 baseline personalizes: student (SD-Turbo, sampled at 1 "
                       "step) or teacher (SD 2.1, sampled with DDIM and CFG: Custom Diffusion's own setting, "
                       "Table 5's first row)", choices=("student", "teacher"))
    profile: str = _f("paper", "default set: paper (Algorithm 1 + collaborative stage) or release (the authors' "
                      "train_opad.py, point by point); each flag still overrides it", choices=PROFILES)
    # models and data
    teacher: str | None = _f(None, "teacher diffusers folder or hub id (SD 2.1-like); default: the preset's "
                             "(OPAD_PRESET: the mini world, or tiny)")
    student: str | None = _f(None, "student diffusers folder or hub id (SD-Turbo-like); default: the preset's")
    preset: str | None = _f(None, "models (and concept, backbones, defaults) when neither --teacher nor --student is "
                            "given: world (the mini world's trained models) or tiny (random, for tests); default: "
                            "$OPAD_PRESET, else world")
    instance_dir: str | None = _f(None, "folder of 1-5+ photos of the subject (jpg/png/webp); default: the preset's "
                                  "bundled concept (the world's checkered mug; tiny: a toy robot)")
    class_name: str | None = _f(None, "class word of the subject, e.g. 'dog' (default: the bundled concept's)")
    token: str = _f("<new1>", "modifier token that names the subject in prompts")
    init_word: str | None = _f(None, "single-token word the modifier token starts from (default: the class word)")
    class_dir: str | None = _f(None, "optional folder of class-prior images (teacher prior preservation)")
    prior_loss_weight: float = _f(1.0, "weight of the teacher's class-prior loss (with --class-dir)")
    one_shot: bool = _f(False, "train on the first instance image only (paper Table 8)")
    allow_upscale: bool = _f(False, "accept images smaller than --resolution by upscaling them")
    resolution: int | None = _f(None, "training resolution in pixels (default: the student's native size)")
    flip: bool = _f(True, "random horizontal flip")
    scale_aug: bool = _f(True, "Custom Diffusion's scale augmentation (zoom in/out with prompt hints)")
    crop: str = _p("how a photo becomes square: center (crop) or stretch (resize the whole photo)",
                   choices=("center", "stretch"))
    prompt_style: str = _p("training prompts: custom_diffusion (27 templates, scale hint as a prefix) or release "
                           "(25 templates without 'close-up' when augmenting, hint as the second word)",
                           choices=("custom_diffusion", "release"))
    sampling: str = _p("random (photo and template drawn independently) or epoch (all (photo, template) pairs, "
                       "reshuffled every epoch)", choices=("random", "epoch"))
    output_dir: str = _f("opad-output", "where concept/, samples/, checkpoints/, logs go")
    overwrite: bool = _f(False, "replace the files of a previous run in --output-dir")
    resume: bool = _f(False, "continue from the newest complete checkpoint in --output-dir")
    seed: int = _f(0, "seed of every random draw (data, noise, timesteps, projections, heads)")

    # schedule
    max_steps: int | None = _f(None, "training iterations (default: the paper's per --method: 1000, lora 800, "
                               "textual-inversion 4000; 300 on the mini world, 150 on the tiny preset)")
    batch_size: int = _f(2, "images per iteration")
    teacher_lr: float | None = _f(None, "teacher K/V and token learning rate (default 1e-5; 1e-3 on the mini world)")
    student_lr: float | None = _f(None, "student learning rate (default per --method: opad, teacher-first and "
                                  "custom-diffusion 1e-5 x batch size; dreambooth 5e-6; lora 1e-4; "
                                  "textual-inversion 5e-4; on the mini world 2e-4 for every method)")
    head_lr: float | None = _f(None, "discriminator heads learning rate (default 1e-4)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    weight_decay: float = _f(1e-2, "AdamW weight decay of K/V, heads and the modifier row (other table rows never change)")
    max_grad_norm: float = _f(1.0, "gradient-norm clip of the teacher and of the student (0 disables)")
    head_max_grad_norm: float = _f(0.0, "gradient-norm clip of each discriminator head on its own (0 disables; "
                                   "the release's clip runs before backward, so it never clips)")

    # the algorithm
    use_teacher: bool = _f(True, "train the teacher and use it for alignment (off: 'w/o the teacher')")
    shared_text_encoder: bool = _f(True, "teacher and student share one text encoder (off: 'Remove STE')")
    train_student_token: bool = _p("without the shared text encoder, the student's loss trains its own token "
                                   "(off: the release, where its prompt embeddings stay detached)")
    teacher_loss_channels: str = _p("teacher loss over latent channels: mean, or sum (the release: 4x)",
                                    choices=("mean", "sum"))
    shared_noise: bool = _p("one noise tensor for the teacher step, the student's x_T and the re-noising "
                            "(the release) instead of three draws")
    detach_start_token: bool = _f(True, "no K/V gradient through the start token, as in Custom Diffusion")
    guidance_scale: float = _f(7.5, "teacher classifier-free guidance for the alignment target")
    mse_weight: float = _f(1.0, "latent MSE alignment weight (0: 'w/o MSE loss')")
    id_weight: float = _f(1.0, "identity-feature cosine weight (0: 'w/o identity feature loss')")
    swd_weight: float = _p("MS-SWD weight (0: 'w/o MS-SWD loss'); paper's is the release's 0.1 rescaled "
                           "for [0, 1] input")
    swd_input: str = _p("range of the images MS-SWD sees: unit ([0, 1], what its sRGB->Lab expects) or signed "
                        "([-1, 1], the release)", choices=("unit", "signed"))
    lpips_weight: float = _f(0.0, "LPIPS weight (off by default)")
    lpips_net: str = _p("LPIPS trunk: vgg or alex", choices=("vgg", "alex"))
    id_encoder: str = _f("clip", "frozen image encoder of the identity loss: clip, dino_v1 or dino_v2",
                         choices=ID_ENCODERS)
    swd_scales: int = _f(5, "MS-SWD scales")
    swd_projections: int = _f(128, "MS-SWD random projections per scale")
    swd_patch: int = _f(11, "MS-SWD patch size")
    discriminators: list[str] = _p("discriminator backbones (comma list; 'none' for 'w/o all')")
    disc_weight: float = _f(1.0, "weight of each discriminator's generator loss")
    disc_loss: str = _f("bce", "discriminator loss: bce (non-saturating G) or hinge", choices=("bce", "hinge"))
    disc_real: str = _p("discriminators' real images: photos (flipped, resized) or batch (the augmented teacher "
                        "batch)", choices=("photos", "batch"))
    r1_weight: float = _f(0.0, "R1 penalty weight on real features (0 disables)")
    disc_normalize: bool = _p("feed backbones their own normalisation (off: the release's raw [-1, 1])")
    backbone_resize: str = _p("how backbone inputs are resized: antialias (bilinear), area (the release's "
                              "discriminators) or bilinear", choices=RESIZE_MODES)
    id_resize: str = _p("how identity-encoder inputs are resized (as --backbone-resize)", choices=RESIZE_MODES)
    dino_v2_size: str = _f("large", "DINOv2 backbone: large (ViT-L/14, the paper's: 304M parameters, 1.1 GiB in "
                           "fp32, 1014 GFLOP per 518-px image forward) or small (ViT-S/14: 22M, 0.08 GiB, 93 GFLOP)",
                           choices=("small", "large"))
    clip_arch: str = _f("ViT-H-14", "open_clip architecture of the clip backbone: ViT-H-14 (the paper's, the image "
                        "encoder IP-Adapter ships: 632M parameters, 2.4 GiB in fp32, 335 GFLOP per image forward) or "
                        "a smaller one such as ViT-B-16 (86M, 0.32 GiB, 35 GFLOP)")
    ip_adapter: str = _f("auto", "IP-Adapter image projection on the clip features (identity = per-token cosine): "
                         "FILE, hub, none, or auto (hub when clip=hub with ViT-H-14; tiny on the tiny preset; none "
                         "on the mini world)")
    backbone_weights: list[str] = _f([], "NAME=FILE, NAME=DIR (a timm or, for clip, transformers model folder, "
                                    "e.g. the mini world's) or NAME=hub per backbone (comma list); default on a "
                                    "preset: the mini world's trained ones, or the tiny preset's random ones")

    # collaborative stage
    collab_start: float | None = _p("start of the collaborative stage, as a fraction of max-steps (none: off)")
    collab_buffer: int = _f(16, "student samples kept as training data in the collaborative stage")
    collab_refresh: int = _f(50, "regenerate the sample buffer every N steps")
    collab_mix: float = _f(0.5, "fraction of each batch drawn from the sample buffer")
    collab_disc_real: str = _f("photos", "discriminators' real set in the collaborative stage: photos or mixed",
                               choices=("photos", "mixed"))

    # teacher-first baseline (paper §12, Table 6)
    teacher_first: bool = _f(False, "teacher-first baseline: train the teacher alone, sample it, then train the "
                             "student on those samples with the identity loss (no discriminators, no "
                             "collaborative stage)")
    teacher_first_steps: int | None = _f(None, "teacher-only steps of --teacher-first (default: half of max-steps)")
    teacher_first_samples: int = _f(16, "teacher samples over the training prompts for --teacher-first")
    teacher_first_sample_steps: int = _f(25, "teacher DDIM steps per sample for --teacher-first")

    # baselines
    lora_rank: int = _f(4, "LoRA rank of --method lora (to_q/to_k/to_v/to_out of every attention layer)")
    lora_alpha: float | None = _f(None, "LoRA alpha of --method lora (default: the rank, i.e. scale 1)")

    # outputs and robustness
    preview_every: int = _f(50, "write a preview grid every N steps (and at step 0)")
    preview_prompts: list[str] = _f([], "preview prompts, '{}' is the token + class (default: 2 templates; the mini "
                                   "world: its subject indoors, on the beach and in the snow)")
    preview_teacher_steps: int = _f(25, "teacher DDIM steps in previews")
    checkpoint_every: int = _f(50, "write a checkpoint every N steps")
    keep_checkpoints: int = _f(2, "how many checkpoints to keep")
    max_bad_steps: int = _f(3, "non-finite steps in a row before rolling back to the last checkpoint")
    rollback_lr_factor: float = _f(0.5, "learning-rate factor applied at each rollback")
    max_rollbacks: int = _f(3, "rollbacks before the run stops")
    device: str = _f("auto", "auto, cpu, cuda")
    mixed_precision: str = _f("auto", "auto (bf16 on CUDA, no on CPU), no, bf16")
    gradient_checkpointing: str = _f("auto", "recompute the UNets', the VAE decoder's and the backbones' blocks in "
                                     "backward instead of keeping their activations: auto (on with CUDA), on, off")

    @property
    def concept_folder(self) -> str:
        """The run folder's concept: teacher_concept/ for a baseline that trained the teacher (as OPAD's
        teacher), so that concept/ is always one the student can load."""
        return "teacher_concept" if self.finetune == "teacher" else "concept"

    def with_profile(self) -> "TrainConfig":
        """A copy with every field the user left to the profile filled in from it."""
        defaults = {**MODEL_DEFAULTS, **profile_defaults(self.profile)}
        unset = {f.name: copy.copy(defaults[f.name]) for f in dataclasses.fields(self)
                 if getattr(self, f.name) is FROM_PROFILE}  # a copy: no two configs share one default list
        return dataclasses.replace(self, **unset)

    def resolved(self, preset: Preset | None = None) -> "TrainConfig":
        """A copy with the profile's and the models' defaults filled in (what config.json records):
        ``preset``'s where the run is on a preset's models (no --teacher / --student), else the real ones'."""
        # a preset's value fills each field the user left at its declared default (None, auto, [], the profile's)
        own = preset.train_defaults if preset else {}
        c = dataclasses.replace(self, **{k: copy.copy(v) for k, v in own.items() if getattr(self, k) == declared(k)})
        c = c.with_profile()
        if c.teacher_first:  # --teacher-first is --method teacher-first
            c.method = "teacher-first"
        c.teacher_first = c.method == "teacher-first"
        c.preset = preset.name if preset else None
        c.max_steps = c.max_steps or METHOD_STEPS[c.method]
        if c.student_lr is None:
            c.student_lr = METHOD_LR[c.method] * (c.batch_size if c.method in LR_PER_IMAGE else 1)
        c.teacher_lr = 1e-5 if c.teacher_lr is None else c.teacher_lr
        c.head_lr = 1e-4 if c.head_lr is None else c.head_lr
        if c.method in BASELINES:  # the student alone: OPAD's teacher, heads and stage stay off
            c.use_teacher, c.discriminators, c.collab_start = False, [], None
        if c.lora_alpha is None and c.method == "lora":
            c.lora_alpha = float(c.lora_rank)
        if c.teacher_first:  # the baseline has no discriminators and no collaborative stage
            c.teacher_first_steps = c.teacher_first_steps or c.max_steps // 2
            c.discriminators, c.collab_start = [], None
        return c

    def validate(self) -> None:
        """Refuse a value outside its field's domain, naming the flag (after the profile is applied)."""
        if self.profile not in PROFILES:
            raise OpadError(f"--profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        c = self.with_profile()
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(c):
            value, flag = getattr(c, f.name), "--" + f.name.replace("_", "-")
            check_type(flag, value, hints[f.name], "")
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and not (math.isfinite(value) and value >= 0):  # no field takes a negative or NaN
                raise OpadError(f"{flag} must be a finite number >= 0, got {value}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise OpadError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
        if c.preset is not None and c.preset not in PRESETS:
            raise OpadError(f"--preset must be one of {', '.join(PRESETS)}, got {c.preset!r}")
        if c.preset is not None and (c.teacher or c.student):  # a preset's models and a named one would mix
            raise OpadError("--preset picks the models only when neither --teacher nor --student is given; "
                            "drop --preset, or the model flags")
        bad = [d for d in c.discriminators if d not in DISCRIMINATORS]
        if bad:
            raise OpadError(f"unknown discriminator {bad[0]!r}; choose from {', '.join(DISCRIMINATORS)} (or 'none')")
        if c.mixed_precision not in ("auto", "no", "bf16"):
            raise OpadError(f"--mixed-precision must be auto, no or bf16 (fp16 would need loss scaling), "
                            f"got {c.mixed_precision!r}")
        if c.gradient_checkpointing not in ("auto", "on", "off"):
            raise OpadError(f"--gradient-checkpointing must be auto, on or off, got {c.gradient_checkpointing!r}")
        if c.collab_start is not None and not 0 <= c.collab_start <= 1:
            raise OpadError(f"--collab-start must be a fraction in [0, 1] or none, got {c.collab_start}")
        if not 0 <= c.collab_mix <= 1:
            raise OpadError(f"--collab-mix must be in [0, 1], got {c.collab_mix}")
        for name in ("batch_size", "preview_every", "checkpoint_every", "keep_checkpoints", "collab_refresh",
                     "collab_buffer", "swd_scales", "swd_projections", "swd_patch", "max_bad_steps",
                     "teacher_first_samples", "teacher_first_sample_steps", "preview_teacher_steps"):
            if getattr(c, name) < 1:
                raise OpadError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(c, name)}")
        if c.max_steps is not None and c.max_steps < 1:
            raise OpadError(f"--max-steps must be at least 1, got {c.max_steps}")
        for name in ("adam_beta1", "adam_beta2"):
            if not getattr(c, name) < 1:
                raise OpadError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(c, name)}")
        if not 0 < c.rollback_lr_factor <= 1:
            raise OpadError(f"--rollback-lr-factor must be in (0, 1], got {c.rollback_lr_factor}")
        if c.seed > MAX_SEED:
            raise OpadError(f"--seed must be in 0..{MAX_SEED}, got {c.seed}")
        if c.resolution is not None and c.resolution < 8:
            raise OpadError(f"--resolution must be a positive multiple of 8, got {c.resolution}")
        if c.swd_patch % 2 == 0:
            raise OpadError(f"--swd-patch must be odd (a patch centred on each pixel), got {c.swd_patch}")
        if not DEVICE_PATTERN.match(c.device):
            raise OpadError(f"--device must be auto, cpu, cuda or cuda:N, got {c.device!r}")
        if c.teacher_first and c.method not in ("opad", "teacher-first"):
            raise OpadError(f"--teacher-first is --method teacher-first; it cannot be combined with "
                            f"--method {c.method}")
        if c.finetune == "teacher" and c.method not in BASELINES:
            raise OpadError(f"--finetune teacher is for the baselines ({', '.join(BASELINES)}); "
                            f"--method {c.method} trains both models")
        if c.lora_rank < 1:
            raise OpadError(f"--lora-rank must be at least 1, got {c.lora_rank}")
        if c.teacher_first or c.method == "teacher-first":
            if not c.use_teacher:
                raise OpadError("--teacher-first needs the teacher; it cannot be combined with --use-teacher false")
            if c.teacher_first_steps is not None and c.teacher_first_steps < 1:
                raise OpadError(f"--teacher-first-steps must be at least 1, got {c.teacher_first_steps}")
            if c.max_steps is not None and c.teacher_first_steps is not None and c.teacher_first_steps >= c.max_steps:
                raise OpadError(f"--teacher-first-steps ({c.teacher_first_steps}) must be below --max-steps "
                                f"({c.max_steps}): the student trains in the steps after it")
        for entry in c.backbone_weights:
            name, _, value = entry.partition("=")
            if name not in DISCRIMINATORS or not value:
                raise OpadError(f"--backbone-weights entry {entry!r} must be NAME=FILE, NAME=DIR or NAME=hub, NAME in "
                                f"{DISCRIMINATORS}")

    def backbone_sources(self) -> dict[str, str]:
        return dict(entry.split("=", 1) for entry in self.backbone_weights)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=repr) + "\n"


def _none_or(cast):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else cast(text)

    return parse


def _list(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    return [] if items == ["none"] else items


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_parser(tp) -> typing.Callable:
    args = typing.get_args(tp)
    if type(None) in args:
        return _none_or(_field_parser(next(a for a in args if a is not type(None))))
    if tp is bool:
        return _bool
    if typing.get_origin(tp) is list or tp is list:
        return _list
    return tp


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def check_type(name: str, value, tp, where: str):
    """``value`` as field type ``tp`` (an int for a float, a comma string for a list), or an OpadError
    naming the field. ``FROM_PROFILE`` passes: the profile fills it in later."""
    if value is FROM_PROFILE:
        return value
    args = typing.get_args(tp)
    if type(None) in args:
        return None if value is None else check_type(name, value, next(a for a in args if a is not type(None)), where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (bool, str) and isinstance(value, tp) or tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            return _list(value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    kind = _KINDS.get(tp, "a list of strings (or one comma-separated string)")
    raise OpadError(f"{where}{name} must be {kind}, got {value!r:.80}")


def declared(name: str):
    """The default a TrainConfig field declares (FROM_PROFILE for the fields a profile fills)."""
    f = TrainConfig.__dataclass_fields__[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _show_list(value) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per field; flags not given stay absent so a config file's value survives."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = declared(f.name)
        shown = ",".join(default) if isinstance(default, list) else default
        if default is FROM_PROFILE:
            shown = describe_default(f.name) or _show_list(MODEL_DEFAULTS[f.name]) + " (a preset may set its own)"
        extra = dict(nargs="?", const=True, metavar="BOOL") if hints[f.name] is bool else {}  # --resume == --resume true
        parser.add_argument(flag, dest=f.name, type=_field_parser(hints[f.name]), default=argparse.SUPPRESS,
                            help=f"{f.metadata['help']} (default: {shown})", **extra)


def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise OpadError(f"config file not found: {path!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OpadError(f"config file {path!r} could not be read: {e}") from e
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise OpadError(f"config file {path!r} could not be parsed: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise OpadError(f"config file {path!r} must hold a mapping of field names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise OpadError(f"config file {path!r}: unknown field(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(TrainConfig)
    return {name: check_type(name, value, hints[name], f"config file {path!r}: ") for name, value in data.items()}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """File values first (``args.config``), then every flag the user gave."""
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
