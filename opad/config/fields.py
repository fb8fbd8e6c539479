"""The trainer's typed configuration: the TrainConfig dataclass and its fields.

Every field is a flag (``--max-steps`` for ``max_steps``, :mod:`opad.config.flags`) whose help text is the
field's ``help`` metadata; its default there is quoted from :mod:`opad.config.defaults`, which also fills it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from opad.config.checks import validate
from opad.config.choices import ID_ENCODERS, METHODS, RESIZE_MODES
from opad.config.defaults import FROM_PROFILE, declared_default, fill_profile, resolve
from opad.config.profiles import PROFILES
from opad.presets import Preset


def _f(default, help: str, **kw):
    """A field; ``choices=(...)`` in ``kw`` lists its allowed values (checked by ``validate``), ``shown="..."``
    words --help shows for a default that is a rule rather than a value (resolved in opad.config.defaults)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _p(help: str, **kw):
    """A field whose default comes from the profile; a value the user gives always wins."""
    return field(default=FROM_PROFILE, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every setting of a training run; ``resolved()`` fills the defaults, ``to_json()`` is its config.json."""

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
    max_steps: int | None = _f(None, "training iterations (per --method: the paper's Table 5)")
    batch_size: int = _f(2, "images per iteration")
    teacher_lr: float | None = _f(None, "teacher K/V and token learning rate")
    student_lr: float | None = _f(None, "student learning rate (per --method: its reference "
                                  "script's; a preset's is for every method)")
    head_lr: float | None = _f(None, "discriminator heads learning rate")
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
    swd_weight: float = _p("MS-SWD weight (0: 'w/o MS-SWD loss'); paper's is the release's rescaled "
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
                         "FILE, hub, none, or auto (hub when clip=hub with ViT-H-14; tiny on the tiny preset)")
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

    # --method teacher-first (paper §12, Table 6; the --teacher-first flag, opad.config.flags)
    teacher_first_steps: int | None = _f(None, "teacher-only steps of --teacher-first", shown="half of max-steps")
    teacher_first_samples: int = _f(16, "teacher samples over the training prompts for --teacher-first")
    teacher_first_sample_steps: int = _f(25, "teacher DDIM steps per sample for --teacher-first")

    # baselines
    lora_rank: int = _f(4, "LoRA rank of --method lora (to_q/to_k/to_v/to_out of every attention layer)")
    lora_alpha: float | None = _f(None, "LoRA alpha of --method lora", shown="the rank, i.e. scale 1")

    # outputs and robustness
    preview_every: int = _f(50, "write a preview grid every N steps (and at step 0)")
    preview_prompts: list[str] = _f([], "preview prompts, '{}' is the token + class", shown="2 templates")
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

    def with_profile(self) -> TrainConfig:
        """A copy with every field the user left to the profile filled in from it."""
        return fill_profile(self)

    def resolved(self, preset: Preset | None = None) -> TrainConfig:
        """A copy with the profile's and the models' defaults filled in (what config.json records):
        ``preset``'s where the run is on a preset's models (no --teacher / --student), else the real ones'."""
        return resolve(self, preset)

    def validate(self) -> None:
        """Refuse a value outside its field's domain, naming the flag (after the profile is applied)."""
        validate(self)

    def backbone_sources(self) -> dict[str, str]:
        """--backbone-weights as backbone name -> its source."""
        return dict(entry.split("=", 1) for entry in self.backbone_weights)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=repr) + "\n"


def declared(name: str):
    """The default a TrainConfig field declares (FROM_PROFILE for the fields a profile fills)."""
    return declared_default(TrainConfig.__dataclass_fields__[name])
