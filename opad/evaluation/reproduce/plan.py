"""The harness's plan: the arms (a trainer --method or an ablation), the paper's numbers, the
command line, and which (subject, arm, training seed) jobs a run holds."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from opad.config import METHODS
from opad.errors import OpadError
from opad.evaluation.dreambench import DreamBench, read_dreambench

DEFAULT_DREAMBENCH = Path(__file__).resolve().parents[3].parent / "shared" / "datasets" / "dreambooth"
PAPER = {  # CLIP-T, CLIP-I, DINO: Table 5 (SD-Turbo at 1 step; SD 2.1 at 25), Tables 6 and 9 (ablations)
    "opad": (0.252, 0.783, 0.637), "custom-diffusion": (0.207, 0.530, 0.097), "dreambooth": (0.188, 0.536, 0.111),
    "lora": (0.212, 0.585, 0.160), "textual-inversion": (0.252, 0.564, 0.166), "teacher-first": (0.266, 0.725, 0.503),
    "opad-no-discriminators": (0.200, 0.566, 0.105), "opad-no-teacher": (0.240, 0.719, 0.505),
    "custom-diffusion-teacher": (0.264, 0.761, 0.555),
}
METRICS = ("clip_t", "clip_i", "dino")
# the mini world's classifier on the same images (--world): the concept's class, the prompted context
WORLD_METRICS = ("class_acc", "context_acc")
TEACHER_STEPS = 25  # Custom Diffusion's own sampling of SD 2.1 (Table 5's first row)


@dataclass(frozen=True)
class Arm:
    """One row of the table: a trainer --method, its extra flags, and the model its images come from."""

    method: str
    flags: tuple[str, ...] = ()
    samples: str = "student"  # student: 1/2/4 steps (--steps); teacher: TEACHER_STEPS DDIM steps with CFG


ARMS: dict[str, Arm] = {m: Arm(m) for m in METHODS} | {
    "opad-no-discriminators": Arm("opad", ("--discriminators", "none")),  # Table 9: w/o all the discriminators
    "opad-no-teacher": Arm("opad", ("--use-teacher", "false")),  # Table 9: w/o the teacher
    "custom-diffusion-teacher": Arm("custom-diffusion", ("--finetune", "teacher"), samples="teacher"),
}
# the experiment: OPAD, Custom Diffusion on each model, the two ablations and teacher-first
WORLD_ARMS = ("opad", "custom-diffusion", "opad-no-discriminators", "opad-no-teacher", "custom-diffusion-teacher",
              "teacher-first")
WORLD_NOTE = ("Mini world (`--world`): its held-out concepts, models and encoders (DINO = the held-out evaluation "
              "encoder; CLIP-I / CLIP-T = the world clip; class % / context %: how often the world's classifier "
              "names the concept's class, and the context a prompt asks for). Compare the rows with each other, not "
              "with the paper's numbers.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m opad.reproduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the runs, table and grids (resumable)")
    p.add_argument("--world", action="store_true",
                   help="the mini world's experiment: its 6 held-out concepts, its models (OPAD_PRESET=world) and its "
                   "encoders; --methods defaults to the six arms of Tables 5/9 and --train-seeds to 0,1,2")
    p.add_argument("--dreambench", default=None,
                   help=f"the DreamBench folder (default: {DEFAULT_DREAMBENCH}; with --world the world's concepts)")
    p.add_argument("--subjects", default="all", help="comma-separated subject folders, or all")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated arms (default opad; with --world {','.join(WORLD_ARMS)}), from: "
                   f"{', '.join(ARMS)}")
    p.add_argument("--train-seeds", default=None, help="training seeds per (subject, arm), e.g. 0,1,2 (default 0; "
                   "with --world 0,1,2); a subject's score is the mean over them")
    p.add_argument("--teacher", default=None, help="teacher model (default: the preset's, OPAD_PRESET: the mini world or tiny)")
    p.add_argument("--student", default=None, help="student model (default: the preset's)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps per job (default: the trainer's)")
    p.add_argument("--prompts", type=int, default=25, help="the first N of the subject's 25 DreamBench prompts")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt (seeds 0..N-1)")
    p.add_argument("--steps", default="1", help="student step counts to generate and score, e.g. 1 or 1,2,4")
    p.add_argument("--dino-weights", default=None,
                   help="as python -m opad.evaluate (FILE, DIR, hub, world or tiny; default with --world: world)")
    p.add_argument("--clip-weights", default=None,
                   help="as python -m opad.evaluate (FILE, hub[:TAG], world or tiny; default with --world: world)")
    p.add_argument("--clip-arch", default="ViT-B-32", help="open_clip architecture for CLIP-I / CLIP-T")
    p.add_argument("--train-arg", action="append", default=[], help="an extra trainer flag, e.g. --train-arg=--batch-size=4")
    p.add_argument("--gpus", type=int, default=None, help="parallel jobs, one per GPU (default: the visible GPUs)")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run each job as a task on the Ray cluster at ADDRESS ('auto': the one 'ray start' started "
                   "here), with opad jobs' runner: a job whose worker dies is retried and its training resumes; --out "
                   "must be on storage every worker sees (docs/cluster.md)")
    p.add_argument("--retries", type=int, default=2, help="with --ray: times a job whose worker died is retried")
    p.add_argument("--in-process", action="store_true",
                   help="run the jobs one after another in this process (no isolation; saves each job's start-up)")
    p.add_argument("--job", nargs=3, metavar=("SUBJECT", "ARM", "SEED"), help=argparse.SUPPRESS)  # one job, internal
    return p


def _steps(text: str) -> list[int]:
    try:
        steps = sorted({int(s) for s in text.split(",")})
    except ValueError:
        raise OpadError(f"--steps must be step counts like 1 or 1,2,4, got {text!r}") from None
    if not set(steps) <= {1, 2, 4}:
        raise OpadError(f"--steps must be among 1, 2, 4, got {text!r}")
    return steps


def _train_seeds(text: str) -> list[int]:
    try:
        seeds = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise OpadError(f"--train-seeds must be seeds like 0 or 0,1,2, got {text!r}") from None
    if not seeds or seeds[0] < 0:
        raise OpadError(f"--train-seeds must be seeds >= 0 like 0,1,2, got {text!r}")
    return seeds


def apply_world(args: argparse.Namespace) -> None:
    """``--world``: the world's models for every job (this process and the ones it starts) and its
    concepts and encoders wherever the user named none."""
    if not args.world:
        return
    from opad.world.render.concepts import concepts_dir

    os.environ["OPAD_PRESET"] = "world"
    args.dreambench = args.dreambench or str(concepts_dir())
    args.dino_weights = args.dino_weights or "world"
    args.clip_weights = args.clip_weights or "world"
    args.methods = args.methods or ",".join(WORLD_ARMS)
    args.train_seeds = args.train_seeds or "0,1,2"


@dataclass
class Plan:
    """The checked arguments: where the photos are, and every job's subject, arm and seed."""

    root: Path
    bench: DreamBench
    subjects: list[str]
    arms: list[str]
    train_seeds: list[int]
    step_counts: list[int]

    def jobs(self) -> list[tuple[str, str, int]]:
        return [(s, a, seed) for s in self.subjects for a in self.arms for seed in self.train_seeds]

    def sample_steps(self, arm: str) -> list[int]:
        return self.step_counts if ARMS[arm].samples == "student" else [TEACHER_STEPS]


def check_args(args: argparse.Namespace) -> Plan:
    """The DreamBench lists, subjects, arms, seeds and step counts, all checked before any job starts."""
    root = Path(args.dreambench or DEFAULT_DREAMBENCH)
    bench = read_dreambench(root / "prompts_and_classes.txt")
    subjects = sorted(bench.classes) if args.subjects == "all" else [s for s in args.subjects.split(",") if s]
    for s in subjects:
        if s not in bench.classes or not (root / s).is_dir():
            raise OpadError(f"unknown DreamBench subject {s!r}; there are {', '.join(sorted(bench.classes))}")
    arms = [m for m in (args.methods or "opad").split(",") if m]
    for m in arms:
        if m not in ARMS:
            raise OpadError(f"unknown method {m!r}; available: {', '.join(ARMS)}")
    for flag, value, low in (("--prompts", args.prompts, 1), ("--seeds", args.seeds, 1)):
        if value < low:
            raise OpadError(f"{flag} must be at least {low}, got {value}")
    if args.prompts > 25:
        raise OpadError(f"--prompts must be at most 25 (DreamBench has 25 per subject), got {args.prompts}")
    if not (args.dino_weights and args.clip_weights):
        raise OpadError("give --dino-weights and --clip-weights (FILE, hub, world, or tiny for test models)")
    if any(a.split("=")[0] == "--seed" for a in args.train_arg):
        raise OpadError("give training seeds with --train-seeds, not --train-arg=--seed")
    if getattr(args, "ray", None) and args.in_process:
        raise OpadError("--ray runs each job as a task on the cluster; it cannot be combined with --in-process")
    if getattr(args, "retries", 0) < 0:
        raise OpadError(f"--retries must be at least 0, got {args.retries}")
    return Plan(root, bench, subjects, arms, _train_seeds(args.train_seeds or "0"), _steps(args.steps))


def job_dir(out: Path, subject: str, arm: str, seed: int) -> Path:
    return out / "runs" / subject / arm / f"seed{seed}"
