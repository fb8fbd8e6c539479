"""One OPAD training iteration on the full-size models: time per phase and peak memory.

The real trainer (opad.train.loop.Trainer, --profile paper) on a folder of python -m opad.fullsize: the SD 2.1
teacher and SD-Turbo student at their published size and the paper's backbones (DINO ViT-S/16, DINOv2
ViT-L/14 at 518 px, open_clip ViT-H-14 + IP-Adapter's projection for the identity loss). One iteration
(after --warmup untimed ones) is timed phase by phase, each phase's own time (nested phases subtracted,
CUDA-synchronised on a GPU):

- teacher forward (encode + noise-prediction loss) | teacher backward + optimizer;
- student UNet (the one step) | VAE decode (the student's image with gradients, and the teacher's);
- alignment target (the teacher's CFG x0 of the re-noised latent);
- backbone features of the student image | identity loss | MS-SWD | other losses;
- student backward + optimizer;
- discriminator step (backbones on real photos + heads) | heads backward + optimizer.

Peak memory: the process's peak RSS on the CPU, CUDA's max allocated on a GPU. Rows (name
fullsize/train/PHASE, shape bNxRES,...) go to benchmarks/results/results.csv.

    python benchmarks/bench_fullsize_train.py --models DIR [--resolution 512] [--batch-size 2]
    python benchmarks/bench_fullsize_train.py --write-models --resolution 256 --batch-size 1   # this CPU
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from common import write_rows

NAME = "fullsize/train"


class PhaseTimer:
    """Exclusive wall time per phase: a phase inside another is subtracted from the outer one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}
        self._stack: list[list] = []  # [name, start, time in nested phases]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        self._sync()
        self._stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            self._sync()
            _, start, nested = self._stack.pop()
            elapsed = time.perf_counter() - start
            self.times[name] = self.times.get(name, 0.0) + elapsed - nested
            if self._stack:
                self._stack[-1][2] += elapsed

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed


@contextlib.contextmanager
def timed_phases(timer: PhaseTimer, trainer):
    """Time the parts of OPAD's iteration (opad.train.methods.opad) by wrapping the functions each one calls."""
    import opad.train.methods.opad as opad_method

    method = trainer.method
    step = trainer.context.optimizer_step

    def optimizer_step(opt, params, loss, name, out, clip_groups=None):
        with timer.phase(f"{name} backward + optimizer"):
            return step(opt, params, loss, name, out, clip_groups)

    patches = [
        mock.patch.object(method, "teacher_step", timer.wrap("teacher forward", method.teacher_step)),
        mock.patch.object(method, "student_forward", timer.wrap("other losses", method.student_forward)),
        mock.patch.object(method, "student_one_step", timer.wrap("student UNet", method.student_one_step)),
        mock.patch.object(method, "_student_features", timer.wrap("backbone features (student image)",
                                                                   method._student_features)),
        mock.patch.object(method, "_id_loss", timer.wrap("identity loss", method._id_loss)),
        mock.patch.object(method, "discriminator_step", timer.wrap("discriminator step", method.discriminator_step)),
        mock.patch.object(opad_method, "teacher_x0", timer.wrap("alignment target (teacher CFG)",
                                                                opad_method.teacher_x0)),
        mock.patch.object(opad_method, "decode_latents", timer.wrap("VAE decode", opad_method.decode_latents)),
        mock.patch.object(opad_method.losses, "ms_swd", timer.wrap("MS-SWD", opad_method.losses.ms_swd)),
        mock.patch.object(trainer.context, "optimizer_step", optimizer_step),
    ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def build_trainer(models: Path, args, out: str):
    from opad.config import TrainConfig
    from opad.fullsize.writer import BACKBONE_FILES
    from opad.train.loop import Trainer

    bb = models / "backbones"
    mp = {"auto": "auto", "fp32": "no", "bf16": "bf16"}[args.dtype]
    cfg = TrainConfig(teacher=str(models / "teacher"), student=str(models / "student"), output_dir=out,
                      profile="paper", device=args.device, mixed_precision=mp, resolution=args.resolution,
                      batch_size=args.batch_size, collab_start=None, max_steps=10, allow_upscale=True,
                      gradient_checkpointing="on" if args.gradient_checkpointing else "off",
                      backbone_weights=[f"{n}={bb / BACKBONE_FILES[n]}" for n in ("dino_v1", "dino_v2", "clip")],
                      ip_adapter=str(bb / BACKBONE_FILES["ip_adapter"]), dino_v2_size=args.dino_v2_size,
                      clip_arch=args.clip_arch)
    return Trainer(cfg, progress=False)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="a folder of python -m opad.fullsize (all three parts)")
    p.add_argument("--write-models", action="store_true", help="without --models: write opad.fullsize to a "
                   "temporary folder first (about 7 GiB, a minute)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2, help="images per iteration (the paper's: 2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="mixed precision: auto (bf16 on a GPU, fp32 on the CPU), fp32 or bf16")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="checkpoint the UNets' blocks, the VAE decoder and the backbones (default on)")
    p.add_argument("--dino-v2-size", default="large", help="as the trainer's flag (the paper's: large)")
    p.add_argument("--clip-arch", default="ViT-H-14", help="as the trainer's flag (the paper's: ViT-H-14)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: 1 on a GPU, "
                   "0 on the CPU)")
    p.add_argument("--no-write", action="store_true", help="print only (no results.csv rows)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from opad.devices import pick_device

    device = pick_device(args.device)
    tmp = None
    if args.models:
        models = Path(args.models)
    elif args.write_models:
        from opad.fullsize.writer import write_fullsize

        tmp = tempfile.TemporaryDirectory()
        models = write_fullsize(Path(tmp.name) / "fs")
    else:
        parser.error("pass --models DIR (python -m opad.fullsize DIR writes it) or --write-models")
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            trainer = build_trainer(models, args, f"{out}/run")
            load_s = time.perf_counter() - start
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            loaded_mb = _peak_mb(device)
            for _ in range(args.warmup if args.warmup is not None else int(device.type == "cuda")):
                trainer.iteration()
            timer = PhaseTimer(device)
            with timed_phases(timer, trainer), timer.phase("iteration"):
                outcome = trainer.iteration()
            peak_mb = _peak_mb(device)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if outcome.nonfinite:
        print(f"warning: the iteration skipped non-finite steps: {outcome.nonfinite}", file=sys.stderr)
    total = sum(timer.times.values())
    ckpt = "ckpt" if args.gradient_checkpointing else "no-ckpt"
    shape = f"b{args.batch_size}x{trainer.resolution},paper,{ckpt},{trainer.accelerator.mixed_precision}"
    mem = "CUDA max allocated" if device.type == "cuda" else "peak RSS"
    print(f"\none OPAD iteration, full-size models, {shape} ({device}); models loaded in {load_s:.0f} s "
          f"({mem} after loading {loaded_mb / 1024:.2f} GiB)")
    print("| phase | seconds | share |\n|---|---|---|")
    rows = []
    for name, seconds in sorted(timer.times.items(), key=lambda kv: -kv[1]):
        label = "iteration (rest)" if name == "iteration" else name
        print(f"| {label} | {seconds:.2f} | {seconds / total:.0%} |")
        rows.append({"name": f"{NAME}/{label}", "provider": "torch", "shape": shape, "median_ms": seconds * 1000,
                     "p20_ms": seconds * 1000, "p80_ms": seconds * 1000, "p95_ms": seconds * 1000})
    print(f"| **iteration** | **{total:.2f}** | |\n\n{mem}: {peak_mb / 1024:.2f} GiB")
    rows.append({"name": f"{NAME}/iteration", "provider": "torch", "shape": shape, "median_ms": total * 1000,
                 "p20_ms": total * 1000, "p80_ms": total * 1000, "p95_ms": total * 1000, "peak_mem_mb": peak_mb})
    if not args.no_write:
        print(write_rows(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
