"""``python -m opad.reproduce``: the paper's Table 5 on DreamBench (or Tables 5 and 9 on the mini
world's held-out concepts, ``--world``), one command.

For every (subject, arm, training seed) job: train on the subject's photos, generate the 25 prompts
x ``--seeds`` image seeds (the student at 1 step, ``--steps 1,2,4`` for more; an arm that fine-tunes
the teacher at 25 DDIM steps with CFG), score them with ``opad.evaluation.evaluate``, and record train time,
iterations and per-image inference time. An arm is a trainer ``--method`` or one of the ablations
(``opad-no-discriminators``, ``opad-no-teacher``, ``custom-diffusion-teacher``). Then write
``table.md`` / ``table.csv`` (Table 5's shape: CLIP-T, CLIP-I, DINO with 95% intervals over subjects,
each subject's value the mean over its training seeds; train s, inference s), ``results.csv`` (per
job) and ``grids/SUBJECT.png`` (arm x prompt).

Each job runs in its own process and folder (``runs/SUBJECT/ARM/seedN/``): a finished job
(``done.json``) is skipped when the command runs again, an interrupted one resumes its training
from its checkpoint, and a failed one is recorded (``failed.json``, the error line) while the
others go on. With several GPUs visible, jobs run one per GPU in parallel.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from opad.config import METHODS
from opad.errors import OpadError
from opad.evaluation.dreambench import DreamBench, read_dreambench
from opad.evaluation.metrics import bootstrap_interval
from opad.presets import run_teacher

DEFAULT_DREAMBENCH = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "dreambooth"
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
    return Plan(root, bench, subjects, arms, _train_seeds(args.train_seeds or "0"), _steps(args.steps))


def job_dir(out: Path, subject: str, arm: str, seed: int) -> Path:
    return out / "runs" / subject / arm / f"seed{seed}"


# ---------------------------------------------------------------------------------------- one job
def run_job(args: argparse.Namespace, subject: str, arm: str, seed: int) -> dict:
    """Train, generate and score one (subject, arm, training seed); writes and returns its done.json."""
    from opad.evaluation import evaluate
    from opad.train import cli as train

    plan = check_args(args)
    spec = ARMS[arm]
    job = job_dir(Path(args.out), subject, arm, seed)
    train_dir = job / "train"
    trained = job / "trained.json"
    if not trained.is_file():
        argv = ["--instance-dir", str(plan.root / subject), "--class-name", plan.bench.classes[subject],
                "--output-dir", str(train_dir), "--method", spec.method, *spec.flags, *args.train_arg,
                "--seed", str(seed)]
        argv += ["--teacher", args.teacher] if args.teacher else []
        argv += ["--student", args.student] if args.student else []
        argv += ["--max-steps", str(args.max_steps)] if args.max_steps else []
        if (train_dir / "checkpoints").is_dir():
            argv.append("--resume")  # an interrupted job continues where it stopped
        elif train_dir.exists():
            argv.append("--overwrite")
        try:
            trainer = train.run(argv)
        except OSError as e:  # disk full, permissions: the job fails, the others go on
            raise OpadError(f"training {subject} / {arm}: {e}") from e
        if trainer.step < trainer.cfg.max_steps:
            raise OpadError(f"training {subject} / {arm} was interrupted at step {trainer.step}; "
                            "run again to resume")
        config = json.loads((train_dir / "config.json").read_text())
        # every segment of a resumed job, not only the last one
        trained.write_text(json.dumps({"train_s": trainer.train_seconds, "iterations": config["max_steps"],
                                       "token": config["token"]}))
    record = json.loads(trained.read_text())
    prompts = plan.bench.prompts_for(subject, record["token"])[:args.prompts]
    scores, infer, comparable = {}, {}, True
    for steps in plan.sample_steps(arm):
        images = job / "images" / f"steps{steps}"
        infer[steps] = _generate(args, spec, train_dir, subject, prompts, steps, images)
        out = job / "scores" / f"steps{steps}"
        code = evaluate.main(["--generated", str(images), "--real", str(plan.root), "--manifest",
                              str(images / "manifest.csv"), "--out", str(out), "--overwrite",
                              "--dino-weights", args.dino_weights, "--clip-weights", args.clip_weights,
                              "--clip-arch", args.clip_arch])
        if code != 0:
            raise OpadError(f"scoring {subject} / {arm} failed")
        summary = json.loads((out / "summary.json").read_text())
        scores[steps] = {m: summary[m] for m in METRICS}
        comparable &= summary["comparable"]
        if args.world:  # what the world's classifier sees: the concept's class, the prompted context
            from opad.world.fidelity import classifier_scores

            scores[steps].update(classifier_scores(images, plan.bench.classes[subject]))
    done = {"subject": subject, "method": arm, "seed": seed, **record, "infer_s_per_image": infer,
            "scores": scores, "comparable": comparable}
    (job / "done.json").write_text(json.dumps(done, indent=2))
    return done


def _sampler(args: argparse.Namespace, spec: Arm, train_dir: Path, steps: int):
    """(prompt, seed) -> (image, seconds): the trained student at ``steps``, or the fine-tuned teacher
    with Custom Diffusion's DDIM + CFG, one image at a time as ``opad.generate --seed S`` makes it."""
    import torch

    from opad.diffusion.sampling import sample_teacher
    from opad.generate import load_student, timed_image, to_pil
    from opad.models.loading import teacher_view

    if spec.samples == "student":
        bundle, _ = load_student(args.student, str(train_dir / "concept"))
        return lambda prompt, seed: timed_image(bundle, prompt, seed, steps)
    config = json.loads((train_dir / "config.json").read_text())
    teacher = run_teacher(config["teacher"], config["preset"])
    bundle = teacher_view(load_student(teacher, str(train_dir / "teacher_concept"))[0])

    def sample(prompt: str, seed: int):
        start = time.perf_counter()
        image = sample_teacher(bundle, [prompt], steps=steps, guidance_scale=config["guidance_scale"],
                               generator=torch.Generator().manual_seed(seed))
        if bundle.device.type == "cuda":
            torch.cuda.synchronize(bundle.device)
        return to_pil(image)[0], time.perf_counter() - start

    return sample


def _generate(args, spec: Arm, train_dir: Path, subject: str, prompts: list[str], steps: int, folder: Path) -> float:
    """Every prompt x seed as NN_seedS.png with a manifest; returns the mean seconds per image."""
    from opad.fsutil import staged_dir

    sample = _sampler(args, spec, train_dir, steps)
    sample(prompts[0], 0)  # warm-up, not timed
    seconds = 0.0
    with staged_dir(folder, replace=True) as tmp:
        rows = []
        for i, prompt in enumerate(prompts):
            for seed in range(args.seeds):
                picture, took = sample(prompt, seed)
                seconds += took
                name = f"{i:02d}_seed{seed}.png"
                picture.save(tmp / name)
                rows.append({"file": name, "subject": subject, "prompt": prompt, "seed": seed})
        with (tmp / "manifest.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "subject", "prompt", "seed"])
            writer.writeheader()
            writer.writerows(rows)
    return seconds / (len(prompts) * args.seeds)


# ---------------------------------------------------------------------------------------- the harness
def _job_argv(argv: list[str], subject: str, arm: str, seed: int) -> list[str]:
    return [sys.executable, "-m", "opad.reproduce", *argv, "--job", subject, arm, str(seed)]


def _fresh_job(out: Path, subject: str, arm: str, seed: int) -> Path:
    job = job_dir(out, subject, arm, seed)
    job.mkdir(parents=True, exist_ok=True)
    (job / "failed.json").unlink(missing_ok=True)
    return job


def _spawn(args: argparse.Namespace, argv: list[str], subject: str, arm: str, seed: int, gpu: int | None) -> str | None:
    """One job in its own process; None on success, else its error line (also in failed.json)."""
    job = _fresh_job(Path(args.out), subject, arm, seed)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    with (job / "log.txt").open("w") as log:
        code = subprocess.call(_job_argv(argv, subject, arm, seed), stdout=log, stderr=subprocess.STDOUT, env=env)
    if code == 0 and (job / "done.json").is_file():
        return None
    lines = (job / "log.txt").read_text(errors="replace").splitlines()
    # the first error line is the cause (the job's own line that follows only says which step failed)
    error = next((ln for ln in lines if ln.startswith("error:")), lines[-1] if lines else "no output")
    (job / "failed.json").write_text(json.dumps({"exit_code": code, "error": error, "log": str(job / "log.txt")}))
    return error


def _in_process(args: argparse.Namespace, subject: str, arm: str, seed: int) -> str | None:
    """One job in this process; None on success, else its error line (also in failed.json)."""
    job = _fresh_job(Path(args.out), subject, arm, seed)
    try:
        run_job(args, subject, arm, seed)
    except Exception as e:  # noqa: BLE001 - one failure is recorded and the other jobs go on
        error = (f"error: {e}" if isinstance(e, OpadError) else f"error: {type(e).__name__}: {e}").splitlines()[0]
        (job / "failed.json").write_text(json.dumps({"error": error}))
        return error
    return None


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA: run on one device
        return 0


def run_harness(args: argparse.Namespace, argv: list[str]) -> Path:
    plan = check_args(args)
    out = Path(args.out)
    jobs = plan.jobs()
    todo = [j for j in jobs if not (job_dir(out, *j) / "done.json").is_file()]
    print(f"{len(jobs)} jobs ({len(plan.subjects)} subjects x {len(plan.arms)} methods x {len(plan.train_seeds)} "
          f"training seeds); {len(jobs) - len(todo)} done before, {len(todo)} to run", file=sys.stderr)
    gpus = args.gpus if args.gpus is not None else _visible_gpus()
    slots = list(range(gpus)) if gpus > 1 else [None]
    free = list(slots)

    def one(job: tuple[str, str, int], index: int) -> None:
        gpu = free.pop()
        tag = f"[{index}/{len(todo)}] {job[0]} / {job[1]} / seed {job[2]}"
        try:
            print(f"{tag}: running" + (f" on GPU {gpu}" if gpu is not None else ""), file=sys.stderr)
            error = _in_process(args, *job) if args.in_process else _spawn(args, argv, *job, gpu)
            print(f"{tag}: " + ("done" if error is None else f"FAILED: {error}"), file=sys.stderr)
        finally:
            free.append(gpu)

    if args.in_process:  # on this (the main) thread: torch's thread pool and Ctrl-C stay where they belong
        for index, job in enumerate(todo, start=1):
            one(job, index)
    else:
        with ThreadPoolExecutor(len(slots)) as pool:
            list(pool.map(one, todo, range(1, len(todo) + 1)))
    write_table(out, plan, WORLD_NOTE if args.world else None)
    write_grids(out, plan, args.prompts)
    return out


def write_table(out: Path, plan: Plan, note: str | None = None) -> None:
    done = {j: json.loads(p.read_text()) for j in plan.jobs() if (p := job_dir(out, *j) / "done.json").is_file()}
    metrics = [*METRICS, *(k for k in WORLD_METRICS
                           if done and all(k in sc for d in done.values() for sc in d["scores"].values()))]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "method", "seed", "steps", *metrics, "train_s", "iterations", "infer_s_per_image"])
        for (s, m, seed), d in sorted(done.items()):
            for steps, sc in d["scores"].items():
                writer.writerow([s, m, seed, steps, *(f"{sc[k]:.4f}" for k in metrics), f"{d['train_s']:.1f}",
                                 d["iterations"], f"{d['infer_s_per_image'][steps]:.4f}"])
    rows = []
    for m in plan.arms:
        failed = sum((job_dir(out, *j) / "failed.json").is_file() for j in plan.jobs() if j[1] == m)
        for steps in map(str, plan.sample_steps(m)):
            runs = {j: d for j, d in done.items() if j[1] == m and steps in d["scores"]}
            # a subject's value: the mean over its training seeds; the interval is over subjects
            by_subject: dict[str, list[dict]] = {}
            for (s, _, _), d in runs.items():
                by_subject.setdefault(s, []).append(d)
            row = {"method": m, "steps": int(steps), "subjects": len(by_subject), "runs": len(runs), "failed": failed}
            if runs:
                row["comparable"] = all(d["comparable"] for d in runs.values())
                for k in metrics:
                    values = [float(np.nanmean([d["scores"][steps][k] for d in ds])) for ds in by_subject.values()]
                    row[k], row[f"{k}_ci95"] = float(np.mean(values)), bootstrap_interval(values)
                row["train_s"] = float(np.mean([d["train_s"] for d in runs.values()]))
                row["iterations"] = next(iter(runs.values()))["iterations"]
                row["infer_s_per_image"] = float(np.mean([d["infer_s_per_image"][steps] for d in runs.values()]))
            rows.append(row)
    with (out / "table.csv").open("w", newline="") as f:
        fields = ["method", "steps", "subjects", "runs", "failed", *metrics, *(f"{k}_ci95" for k in metrics),
                  "train_s", "iterations", "infer_s_per_image", "comparable"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / "table.md").write_text(_markdown(rows, metrics, note) + _paired(done, plan, metrics))


def _paired(done: dict, plan: Plan, metrics: list[str]) -> str:
    """The first arm minus each other one, subject by subject (each the mean over its training seeds):
    the mean difference with a bootstrap 95% interval over subjects, and in how many subjects it is > 0."""
    def per_subject(arm: str) -> dict[str, dict[str, float]]:
        steps = str(plan.sample_steps(arm)[0])
        by: dict[str, list[dict]] = {}
        for (s, a, _), d in done.items():
            if a == arm and steps in d["scores"]:
                by.setdefault(s, []).append(d["scores"][steps])
        return {s: {k: float(np.nanmean([sc[k] for sc in group])) for k in metrics} for s, group in by.items()}

    first, *others = plan.arms
    base = per_subject(first)
    lines = []
    for arm in others:
        theirs = per_subject(arm)
        common = sorted(set(base) & set(theirs))
        if len(common) < 2:
            continue
        cells = []
        for k in metrics:
            diff = [base[s][k] - theirs[s][k] for s in common]
            low, high = bootstrap_interval(diff)
            cells.append(f"{np.mean(diff):+.3f} [{low:+.3f}, {high:+.3f}] ({sum(d > 0 for d in diff)}/{len(diff)})")
        lines.append(f"| {first} − {arm} | {' | '.join(cells)} |")
    if not lines:
        return ""
    return "\n".join(["", f"Paired by subject: {first} minus each arm (mean difference, bootstrap 95% interval over "
                                "subjects, subjects where it is above 0):", "",
                       "| pair | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics), *lines]) + "\n"


def _markdown(rows: list[dict], metrics: list[str], note: str | None = None) -> str:
    names = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO", "class_acc": "class %", "context_acc": "context %"}
    head = " | ".join(names[k] for k in metrics)
    lines = [f"| method | steps | {head} | train s | iterations | inference s/image | subjects (runs) |",
             "|---|---|" + "---|" * len(metrics) + "---|---|---|---|"]

    def cell(r: dict, k: str) -> str:
        scale, fmt = (100, ".0f") if k in WORLD_METRICS else (1, ".3f")
        low, high = r[f"{k}_ci95"]
        return f"{scale * r[k]:{fmt}} [{scale * low:{fmt}}, {scale * high:{fmt}}]"

    for r in rows:
        failed = f", {r['failed']} failed" if r["failed"] else ""
        if not r["runs"]:
            lines.append(f"| {r['method']} | {r['steps']} | " + "– | " * (len(metrics) + 3) + f"0 (0{failed}) |")
            continue
        cells = " | ".join(cell(r, k) for k in metrics)
        lines.append(f"| {r['method']} | {r['steps']} | {cells} | {r['train_s']:.0f} | {r['iterations']} | "
                     f"{r['infer_s_per_image']:.3f} | {r['subjects']} ({r['runs']}{failed}) |")
    shown = [r["method"] for r in rows if r["method"] in PAPER]
    paper = "; ".join(f"{m} {t:.3f} / {i:.3f} / {d:.3f}" for m, (t, i, d) in PAPER.items() if m in shown)
    lines += ["", ("Means over subjects (each the mean over its training seeds) with bootstrap 95% intervals over "
                   "subjects; raw cosines (`python -m opad.evaluate`)."),
              f"Paper (Tables 5, 9; CLIP-T / CLIP-I / DINO): {paper}."]
    if note:
        lines += ["", note]
    if any(r.get("comparable") is False for r in rows):
        lines += ["", "**Not comparable with the paper:** these runs used tiny models or tiny random encoders."]
    return "\n".join(lines) + "\n"


def write_grids(out: Path, plan: Plan, prompts: int) -> None:
    """grids/SUBJECT.png: a row per arm (the first training seed's image seed 0 of each prompt, at the
    arm's fewest steps), thumbnails."""
    (out / "grids").mkdir(parents=True, exist_ok=True)
    side, label_w = 96, 170
    seed = plan.train_seeds[0]
    for s in plan.subjects:
        rows = [(m, job_dir(out, s, m, seed) / "images" / f"steps{plan.sample_steps(m)[0]}") for m in plan.arms]
        rows = [(m, folder) for m, folder in rows if folder.is_dir()]
        if not rows:
            continue
        sheet = Image.new("RGB", (label_w + side * prompts, side * len(rows)), "white")
        draw = ImageDraw.Draw(sheet)
        for r, (m, folder) in enumerate(rows):
            draw.text((4, r * side + side // 2 - 6), m, fill="black")
            for c in range(prompts):
                path = folder / f"{c:02d}_seed0.png"
                if path.is_file():
                    sheet.paste(Image.open(path).convert("RGB").resize((side, side)), (label_w + c * side, r * side))
        sheet.save(out / "grids" / f"{s}.png")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        apply_world(args)
        if args.job:
            subject, arm, seed = args.job
            run_job(args, subject, arm, int(seed))
            return 0
        out = run_harness(args, argv)
    except OpadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out / "table.md").read_text())
    print(f"table, per-subject results and grids in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
