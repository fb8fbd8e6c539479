"""The GPU memory of one full-size OPAD training iteration, estimated without a GPU.

The real trainer (opad.train.loop.Trainer, the paper profile, every phase of OPAD's iteration) runs on fake
tensors (torch's FakeTensorMode: shapes, dtypes and strides, no memory and no compute), built from the
published configurations (the ``--models`` folder's config files, or opad.fullsize's own), with the
full-size backbones (DINO ViT-S/16, DINOv2 ViT-L/14, open_clip ViT-H-14 + IP-Adapter's projection).
opad.fullsize.memory.LiveMemory counts every live tensor storage op by op, rounded as CUDA's caching
allocator rounds blocks, so the peak estimates ``torch.cuda.max_memory_allocated`` (add the CUDA context,
about 0.5 GiB, and the allocator's fragmentation, typically 5-15 %, for nvidia-smi's figure).

Why fake *CPU* tensors: fake CUDA tensors run the forward here, but autograd's engine asks the CUDA driver
for a context before any backward ("hasPrimaryContext expects a valid device index"), so a backward
cannot be traced without a GPU. On the CPU the kernels' memory behaviour matches the GPU's where it
matters: scaled_dot_product_attention takes its flash kernel (saves the output and the log-sum-exp, not
the attention matrix, as CUDA's flash / memory-efficient kernels), bf16 autocast casts the same
matmul/conv inputs. The custom kernels are traced as their torch references (OPAD_KERNELS=reference):
the GPU kernels (SWD, feature pass) hold no more than their references, so this errs high there.

    python benchmarks/studies/estimate_gpu_memory.py [--models DIR] [--resolution 512] [--dtype bf16]
    python benchmarks/studies/estimate_gpu_memory.py --sweep     # the path to <= 24 GB: one row per change

Rows (name fullsize/gpu_memory_estimate, provider fake-tensor) go to benchmarks/results/results.csv and the
breakdowns to --json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
os.environ["OPAD_KERNELS"] = "reference"  # before opad imports a kernel: trace the torch references

import torch  # noqa: E402
from common import write_rows  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from opad.fullsize import writer  # noqa: E402
from opad.fullsize.memory import LiveMemory, MemoryReport  # noqa: E402

GOAL_GB, STRETCH_GB = 40, 24
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# the trainer as it runs on a GPU (without checkpointing, with the UNets' alone as before, with all of it as
# now), then the changes on the way to <= 24 GB, each added to the ones before (name, options)
SWEEP = [
    ("no gradient checkpointing", {"checkpointing": "off"}),
    ("UNets checkpointed (the trainer before)", {"checkpointing": "unets"}),
    ("UNets, VAE decoder, backbones (now)", {}),
    ("+ frozen weights in bf16", {"frozen_dtype": "bf16"}),
    ("+ batch 1 (x2 accumulation)", {"frozen_dtype": "bf16", "batch_size": 1}),
]


# ---------------------------------------------------------------------------- fake models
def _configs(models: str | None) -> dict:
    """The architectures: the models folder's config files, else opad.fullsize's published ones."""
    if models is None:
        return {"teacher_unet": writer.TEACHER_UNET, "student_unet": writer.STUDENT_UNET, "vae": writer.VAE,
                "text_encoder": writer.TEXT_ENCODER}
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    def public(config: dict) -> dict:
        return {k: v for k, v in config.items() if not k.startswith("_")}

    return {"teacher_unet": public(UNet2DConditionModel.load_config(f"{models}/teacher", subfolder="unet")),
            "student_unet": public(UNet2DConditionModel.load_config(f"{models}/student", subfolder="unet")),
            "vae": public(AutoencoderKL.load_config(f"{models}/teacher", subfolder="vae")),
            "text_encoder": CLIPTextConfig.from_pretrained(f"{models}/teacher", subfolder="text_encoder").to_dict()}


def _fake_to(module: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
    """``nn.Module.to`` for modules of fake tensors: torch swaps a fake parameter in place, which the fake
    mode's weak references refuse ("Cannot swap t1 because it has weakref"); here each parameter or buffer
    that changes device or dtype is replaced by a new one, and the others are left as they are."""
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, t in table.items():
                if t is None:
                    continue
                new_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
                new_device = device if device is not None else t.device
                if t.dtype == new_dtype and t.device == torch.device(new_device):
                    continue
                moved = t.detach().to(device=new_device, dtype=new_dtype)
                table[name] = torch.nn.Parameter(moved, t.requires_grad) if table is sub._parameters else moved
    return module


def _fake(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` (built inside the fake mode: fake CPU tensors) with its floats in ``dtype``."""
    return _fake_to(module, dtype)


class FakeModels:
    """Stand-ins for opad's two loaders (load_models, build_backbone), called by the real Trainer."""

    def __init__(self, models: str | None, frozen_dtype: torch.dtype) -> None:
        self.configs, self.dtype = _configs(models), frozen_dtype
        self.models = models
        self.schedulers = self._schedulers()
        self.backbone_modules: dict[str, torch.nn.Module] = {}

    def _schedulers(self):
        if self.models is None:
            return writer._teacher_scheduler(), writer.student_scheduler()
        from diffusers import DDIMScheduler, EulerDiscreteScheduler

        return (DDIMScheduler.from_pretrained(f"{self.models}/teacher", subfolder="scheduler"),
                EulerDiscreteScheduler.from_pretrained(f"{self.models}/student", subfolder="scheduler"))

    def load_models(self, teacher=None, student=None, *, device="cpu", dtype=None, load_teacher=True):
        from transformers import CLIPTextConfig, CLIPTextModel

        from opad.models.loading import ModelBundle, _frozen, _frozen_unet
        from opad.models.tokenizer import build_sd2_tokenizer

        text_encoder = CLIPTextModel(CLIPTextConfig(**self.configs["text_encoder"]))
        vae = writer.build_vae(self.configs["vae"], empty=False)
        unets = [writer.build_unet(self.configs[k], empty=False) for k in ("teacher_unet", "student_unet")]
        teacher_unet, student_unet = (_fake(m, self.dtype) for m in unets)
        return ModelBundle(
            tokenizer=build_sd2_tokenizer(), text_encoder=_frozen(_fake(text_encoder, self.dtype), device),
            vae=_frozen(_fake(vae, self.dtype), device), teacher_unet=_frozen_unet(teacher_unet, device),
            teacher_scheduler=self.schedulers[0], student_unet=_frozen_unet(student_unet, device),
            student_scheduler=self.schedulers[1], teacher_source=str(teacher), student_source=str(student))

    def build_backbone(self, name, source, *, dino_v2_size="large", clip_arch="ViT-H-14", normalize=True,
                       resize="antialias", ip_adapter=None, seed=0):
        import open_clip

        from opad.models.backbones import FrozenBackbone
        from opad.models.towers import IMAGENET_MEAN, IMAGENET_STD

        if not self.backbone_modules:
            self.backbone_modules = {k: _fake(m, self.dtype) for k, m in writer.build_backbones(empty=False).items()}
        encoder = self.backbone_modules[name]
        size, mean, std = {"clip": (224, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
                           "dino_v2": (518, IMAGENET_MEAN, IMAGENET_STD),
                           "dino_v1": (224, IMAGENET_MEAN, IMAGENET_STD)}[name]
        projection = self.backbone_modules["ip_adapter"] if name == "clip" and ip_adapter else None
        return FrozenBackbone(name, encoder, size, mean, std, normalize=normalize, resize=resize,
                              projection=projection)


# ---------------------------------------------------------------------------- the trace
def _label_weights(mem: LiveMemory, trainer) -> None:
    b, m = trainer.bundle, trainer.method
    groups = {"weights: teacher UNet": b.teacher_unet, "weights: student UNet": b.student_unet,
              "weights: text encoder": b.text_encoder, "weights: VAE": b.vae,
              **{f"weights: {name} backbone": bb for name, bb in m.backbones.items()}}
    for label, module in groups.items():
        mem.relabel(module.parameters(), label)
        mem.relabel(module.buffers(), label)
    mem.relabel(m.parameters(), "weights: trainable (K/V, token, heads)")


@contextlib.contextmanager
def _phases(mem: LiveMemory, trainer) -> contextlib.AbstractContextManager:
    """Label what each part of OPAD's iteration allocates."""
    import opad.train.methods.opad as opad_method

    method = trainer.method

    def labelled(label, fn):
        def run(*args, **kwargs):
            with mem.phase(label):
                return fn(*args, **kwargs)
        return run

    step = trainer.context.optimizer_step

    def optimizer_step(opt, params, loss, name, out, clip_groups=None):
        with mem.phase(f"{name} backward"):
            return step(opt, params, loss, name, out, clip_groups)

    def optimizer_state(opt):
        original = opt.step

        def run(*args, **kwargs):
            with mem.phase("optimizer state"):
                return original(*args, **kwargs)
        return run

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(method, "teacher_step", labelled("teacher forward", method.teacher_step)))
        stack.enter_context(mock.patch.object(method, "student_forward",
                                              labelled("student forward + losses", method.student_forward)))
        stack.enter_context(mock.patch.object(method, "discriminator_step",
                                              labelled("discriminator step", method.discriminator_step)))
        stack.enter_context(mock.patch.object(opad_method, "teacher_x0",
                                              labelled("alignment target (teacher CFG)", opad_method.teacher_x0)))
        stack.enter_context(mock.patch.object(trainer.context, "optimizer_step", optimizer_step))
        for opt in trainer.optimizers:
            stack.enter_context(mock.patch.object(opt, "step", optimizer_state(opt)))
        yield


def estimate(models: str | None = None, *, resolution: int = 512, dtype: str = "bf16", batch_size: int = 2,
             checkpointing: str = "all", frozen_dtype: str = "fp32", iterations: int = 2) -> MemoryReport:
    """The peak of ``iterations`` OPAD iterations (the second one holds the optimizer state from the first).

    ``checkpointing``: ``all`` (the trainer's --gradient-checkpointing on: UNets, VAE decoder, backbones),
    ``unets`` (the UNets alone, as the trainer did before), ``off``."""
    from opad.config import TrainConfig
    from opad.presets.example_concept import example_concept_dir
    from opad.train.loop import Trainer

    example_concept_dir()  # written for real, before the fake mode (it draws images)
    fakes = FakeModels(models, DTYPES[frozen_dtype])
    root = models or "fullsize"
    mem = LiveMemory()
    with tempfile.TemporaryDirectory() as out, FakeTensorMode(allow_non_fake_inputs=True), mem, \
            mock.patch("opad.train.loop.load_models", fakes.load_models), \
            mock.patch("opad.train.methods.opad_nets.build_backbone", fakes.build_backbone), \
            mock.patch.object(torch.nn.Module, "to", _fake_to):
        cfg = TrainConfig(teacher=f"{root}/teacher", student=f"{root}/student", output_dir=f"{out}/run",
                          device="cpu", mixed_precision="bf16" if dtype == "bf16" else "no", profile="paper",
                          resolution=resolution, batch_size=batch_size, collab_start=None, max_steps=10,
                          gradient_checkpointing="off" if checkpointing == "off" else "on",
                          backbone_weights=[f"{n}=fake" for n in ("dino_v1", "dino_v2", "clip")],
                          ip_adapter="fake", allow_upscale=True)  # the bundled 128-px example photos
        trainer = Trainer(cfg, progress=False)
        if checkpointing == "unets":
            trainer.bundle.vae.disable_gradient_checkpointing()
            for backbone in trainer.method.backbones.values():
                backbone.set_grad_checkpointing(False)
        for p in trainer.method.parameters():  # trainable weights stay fp32 whatever the frozen ones are
            if p.dtype != torch.float32:
                p.data = p.data.float()
        _label_weights(mem, trainer)
        mem.label_gradients(trainer.method.parameters())
        mem.reset_peak()  # building fake models has its own transients; a real load (from_pretrained) others
        with _phases(mem, trainer):
            for _ in range(iterations):
                outcome = trainer.iteration()
        if outcome.nonfinite:
            raise RuntimeError(f"the traced iteration skipped steps: {outcome.nonfinite}")
    return mem.report()


# ---------------------------------------------------------------------------- the CLI
def _row(report: MemoryReport, shape: str) -> dict:
    return {"name": "fullsize/gpu_memory_estimate", "provider": "fake-tensor", "shape": shape,
            "peak_mem_mb": report.peak / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="a folder of python -m opad.fullsize (only its config files "
                   "are read); default: opad.fullsize's published configurations, no files needed")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES), help="mixed precision of the iteration "
                   "(bf16 autocast, as the trainer on a GPU) or fp32")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--checkpointing", default="all", choices=("all", "unets", "off"),
                   help="all: the trainer's --gradient-checkpointing on (UNets, VAE decoder, backbones); unets: the "
                   "UNets alone (the trainer before); off")
    p.add_argument("--frozen-dtype", default="fp32", choices=tuple(DTYPES),
                   help="the frozen weights' dtype (the trainer loads fp32 today)")
    p.add_argument("--sweep", action="store_true", help="the changes on the way to <= 24 GB, one row each")
    p.add_argument("--json", default=None, help="write the breakdowns here")
    p.add_argument("--no-write", action="store_true", help="print only (no results.csv rows)")
    args = p.parse_args(argv)
    base = dict(resolution=args.resolution, dtype=args.dtype, batch_size=args.batch_size,
                checkpointing=args.checkpointing, frozen_dtype=args.frozen_dtype)
    runs = [(name, {**base, **opts}) for name, opts in SWEEP] if args.sweep else [("as asked", base)]
    rows, results = [], []
    for name, opts in runs:
        start = time.perf_counter()
        report = estimate(args.models, **opts)
        seconds = time.perf_counter() - start
        shape = (f"b{opts['batch_size']}x{opts['resolution']},{opts['dtype']},frozen-{opts['frozen_dtype']},"
                 f"ckpt-{opts['checkpointing']}")
        print(f"\n{name} ({shape}; traced in {seconds:.0f} s)\n{report.table(1e9, 'GB')}", file=sys.stderr)
        rows.append(_row(report, shape))
        results.append({"name": name, "options": opts, "peak_bytes": report.peak, "at_peak": report.at_peak,
                        "phase_peaks": report.phase_peaks})
    print(f"\n{'change':40s} {'peak GB':>8s}  goal <= {GOAL_GB} GB, stretch <= {STRETCH_GB} GB")
    for result in results:
        gb = result["peak_bytes"] / 1e9
        verdict = "meets both" if gb <= STRETCH_GB else f"meets <= {GOAL_GB}" if gb <= GOAL_GB else "over"
        print(f"{result['name']:40s} {gb:8.2f}  {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_write:
        print(write_rows(rows, torch.device("cpu")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
