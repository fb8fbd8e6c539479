"""``python -m opad.reproduce``: the paper's Table 5 on DreamBench, one command.

For every (subject, method) job: train on the subject's photos, generate the 25 DreamBench prompts
x ``--seeds`` seeds at 1 step (``--steps 1,2,4`` for more), score them with ``opad.evaluate``, and
record train time, iterations and per-image inference time. Then write ``table.md`` /
``table.csv`` (Table 5's shape: CLIP-T, CLIP-I, DINO with 95% intervals over subjects, train s,
inference s), ``results.csv`` (per subject) and ``grids/SUBJECT.png`` (method x prompt).

Each job runs in its own process and folder (``runs/SUBJECT/METHOD/``): a finished job
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from opad.config import METHODS
from opad.dreambench import read_dreambench
from opad.errors import OpadError
from opad.eval_metrics import bootstrap_interval

DEFAULT_DREAMBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "dreambooth"
PAPER = {  # Table 5 (SD-Turbo, 1 step): CLIP-T, CLIP-I, DINO
    "opad": (0.252, 0.783, 0.637), "custom-diffusion": (0.207, 0.530, 0.097), "dreambooth": (0.188, 0.536, 0.111),
    "lora": (0.212, 0.585, 0.160), "textual-inversion": (0.252, 0.564, 0.166), "teacher-first": (0.266, 0.725, 0.503),
}
METRICS = ("clip_t", "clip_i", "dino")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m opad.reproduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the runs, table and grids (resumable)")
    p.add_argument("--dreambench", default=str(DEFAULT_DREAMBENCH), help="the DreamBench folder")
    p.add_argument("--subjects", default="all", help="comma-separated subject folders, or all (30)")
    p.add_argument("--methods", default="opad", help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--teacher", default=None, help="teacher model (default: the preset's, OPAD_PRESET: the mini world or tiny)")
    p.add_argument("--student", default=None, help="student model (default: the preset's)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps per job (default: the trainer's)")
    p.add_argument("--prompts", type=int, default=25, help="the first N of the subject's 25 DreamBench prompts")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt (seeds 0..N-1)")
    p.add_argument("--steps", default="1", help="student step counts to generate and score, e.g. 1 or 1,2,4")
    p.add_argument("--dino-weights", default=None, help="as python -m opad.evaluate (FILE, DIR, hub or tiny)")
    p.add_argument("--clip-weights", default=None, help="as python -m opad.evaluate (FILE, hub[:TAG] or tiny)")
    p.add_argument("--clip-arch", default="ViT-B-32", help="open_clip architecture for CLIP-I / CLIP-T")
    p.add_argument("--train-arg", action="append", default=[], help="an extra trainer flag, e.g. --train-arg=--seed=3")
    p.add_argument("--gpus", type=int, default=None, help="parallel jobs, one per GPU (default: the visible GPUs)")
    p.add_argument("--in-process", action="store_true",
                   help="run the jobs one after another in this process (no isolation; saves each job's start-up)")
    p.add_argument("--job", nargs=2, metavar=("SUBJECT", "METHOD"), help=argparse.SUPPRESS)  # one job, internal
    return p


def _steps(text: str) -> list[int]:
    try:
        steps = sorted({int(s) for s in text.split(",")})
    except ValueError:
        raise OpadError(f"--steps must be step counts like 1 or 1,2,4, got {text!r}") from None
    if not set(steps) <= {1, 2, 4}:
        raise OpadError(f"--steps must be among 1, 2, 4, got {text!r}")
    return steps


def check_args(args: argparse.Namespace):
    """The DreamBench lists, subjects, methods and step counts, all checked before any job starts."""
    root = Path(args.dreambench)
    bench = read_dreambench(root / "prompts_and_classes.txt")
    subjects = sorted(bench.classes) if args.subjects == "all" else [s for s in args.subjects.split(",") if s]
    for s in subjects:
        if s not in bench.classes or not (root / s).is_dir():
            raise OpadError(f"unknown DreamBench subject {s!r}; there are {', '.join(sorted(bench.classes))}")
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise OpadError(f"unknown method {m!r}; available: {', '.join(METHODS)}")
    for flag, value, low in (("--prompts", args.prompts, 1), ("--seeds", args.seeds, 1)):
        if value < low:
            raise OpadError(f"{flag} must be at least {low}, got {value}")
    if args.prompts > 25:
        raise OpadError(f"--prompts must be at most 25 (DreamBench has 25 per subject), got {args.prompts}")
    if not (args.dino_weights and args.clip_weights):
        raise OpadError("give --dino-weights and --clip-weights (FILE, hub, or tiny for test models)")
    return root, bench, subjects, methods, _steps(args.steps)


# ---------------------------------------------------------------------------------------- one job
def run_job(args: argparse.Namespace, subject: str, method: str) -> dict:
    """Train, generate and score one (subject, method); writes and returns its done.json."""
    from opad import evaluate, train

    root, bench, _, _, step_counts = check_args(args)
    job = Path(args.out) / "runs" / subject / method
    train_dir = job / "train"
    trained = job / "trained.json"
    if not trained.is_file():
        argv = ["--instance-dir", str(root / subject), "--class-name", bench.classes[subject],
                "--output-dir", str(train_dir), "--method", method, *args.train_arg]
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
            raise OpadError(f"training {subject} / {method}: {e}") from e
        if trainer.step < trainer.cfg.max_steps:
            raise OpadError(f"training {subject} / {method} was interrupted at step {trainer.step}; "
                            "run again to resume")
        config = json.loads((train_dir / "config.json").read_text())
        # every segment of a resumed job, not only the last one
        trained.write_text(json.dumps({"train_s": trainer.train_seconds, "iterations": config["max_steps"],
                                       "token": config["token"]}))
    record = json.loads(trained.read_text())
    prompts = bench.prompts_for(subject, record["token"])[:args.prompts]
    scores, infer = {}, {}
    for steps in step_counts:
        images = job / "images" / f"steps{steps}"
        infer[steps] = _generate(args, train_dir / "concept", subject, prompts, steps, images)
        out = job / "scores" / f"steps{steps}"
        code = evaluate.main(["--generated", str(images), "--real", str(root), "--manifest",
                              str(images / "manifest.csv"), "--out", str(out), "--overwrite",
                              "--dino-weights", args.dino_weights, "--clip-weights", args.clip_weights,
                              "--clip-arch", args.clip_arch])
        if code != 0:
            raise OpadError(f"scoring {subject} / {method} failed")
        scores[steps] = json.loads((out / "summary.json").read_text())
    done = {"subject": subject, "method": method, **record, "infer_s_per_image": infer,
            "scores": {s: {m: v[m] for m in METRICS} for s, v in scores.items()},
            "comparable": all(v["comparable"] for v in scores.values())}
    (job / "done.json").write_text(json.dumps(done, indent=2))
    return done


def _generate(args, concept: Path, subject: str, prompts: list[str], steps: int, folder: Path) -> float:
    """Every prompt x seed as NN_seedS.png with a manifest, one image at a time as
    ``opad.generate --seed S`` makes it (any concept format); returns the mean seconds per image."""
    from opad.fsutil import staged_dir
    from opad.generate import load_student, timed_image

    bundle, _ = load_student(args.student, str(concept))
    timed_image(bundle, prompts[0], 0, steps)  # warm-up, not timed
    seconds = 0.0
    with staged_dir(folder, replace=True) as tmp:
        rows = []
        for i, prompt in enumerate(prompts):
            for seed in range(args.seeds):
                picture, took = timed_image(bundle, prompt, seed, steps)
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
def _job_argv(argv: list[str], subject: str, method: str) -> list[str]:
    return [sys.executable, "-m", "opad.reproduce", *argv, "--job", subject, method]


def _fresh_job(out: Path, subject: str, method: str) -> Path:
    job = out / "runs" / subject / method
    job.mkdir(parents=True, exist_ok=True)
    (job / "failed.json").unlink(missing_ok=True)
    return job


def _spawn(args: argparse.Namespace, argv: list[str], subject: str, method: str, gpu: int | None) -> str | None:
    """One job in its own process; None on success, else its error line (also in failed.json)."""
    job = _fresh_job(Path(args.out), subject, method)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    with (job / "log.txt").open("w") as log:
        code = subprocess.call(_job_argv(argv, subject, method), stdout=log, stderr=subprocess.STDOUT, env=env)
    if code == 0 and (job / "done.json").is_file():
        return None
    lines = (job / "log.txt").read_text(errors="replace").splitlines()
    # the first error line is the cause (the job's own line that follows only says which step failed)
    error = next((ln for ln in lines if ln.startswith("error:")), lines[-1] if lines else "no output")
    (job / "failed.json").write_text(json.dumps({"exit_code": code, "error": error, "log": str(job / "log.txt")}))
    return error


def _in_process(args: argparse.Namespace, subject: str, method: str) -> str | None:
    """One job in this process; None on success, else its error line (also in failed.json)."""
    job = _fresh_job(Path(args.out), subject, method)
    try:
        run_job(args, subject, method)
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
    root, bench, subjects, methods, step_counts = check_args(args)
    out = Path(args.out)
    jobs = [(s, m) for s in subjects for m in methods]
    todo = [(s, m) for s, m in jobs if not (out / "runs" / s / m / "done.json").is_file()]
    print(f"{len(jobs)} jobs ({len(subjects)} subjects x {len(methods)} methods); {len(jobs) - len(todo)} done "
          f"before, {len(todo)} to run", file=sys.stderr)
    gpus = args.gpus if args.gpus is not None else _visible_gpus()
    slots = list(range(gpus)) if gpus > 1 else [None]
    free = list(slots)

    def one(job: tuple[str, str], index: int) -> None:
        gpu = free.pop()
        tag = f"[{index}/{len(todo)}] {job[0]} / {job[1]}"
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
    write_table(out, subjects, methods, step_counts)
    write_grids(out, subjects, methods, args.prompts)
    return out


def write_table(out: Path, subjects: list[str], methods: list[str], step_counts: list[int]) -> None:
    done = {}
    for s in subjects:
        for m in methods:
            path = out / "runs" / s / m / "done.json"
            if path.is_file():
                done[s, m] = json.loads(path.read_text())
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "method", "steps", *METRICS, "train_s", "iterations", "infer_s_per_image"])
        for (s, m), d in sorted(done.items()):
            for steps, sc in d["scores"].items():
                writer.writerow([s, m, steps, *(f"{sc[k]:.4f}" for k in METRICS), f"{d['train_s']:.1f}",
                                 d["iterations"], f"{d['infer_s_per_image'][steps]:.4f}"])
    rows = []
    for m in methods:
        for steps in step_counts:
            runs = [d for (s, mm), d in done.items() if mm == m and str(steps) in d["scores"]]
            failed = [s for s in subjects if (out / "runs" / s / m / "failed.json").is_file()]
            if not runs:
                rows.append({"method": m, "steps": steps, "subjects": 0, "failed": len(failed)})
                continue
            row = {"method": m, "steps": steps, "subjects": len(runs), "failed": len(failed),
                   "comparable": all(d["comparable"] for d in runs)}
            for k in METRICS:
                values = [d["scores"][str(steps)][k] for d in runs]
                row[k], row[f"{k}_ci95"] = float(np.mean(values)), bootstrap_interval(values)
            row["train_s"] = float(np.mean([d["train_s"] for d in runs]))
            row["iterations"] = runs[0]["iterations"]
            row["infer_s_per_image"] = float(np.mean([d["infer_s_per_image"][str(steps)] for d in runs]))
            rows.append(row)
    with (out / "table.csv").open("w", newline="") as f:
        fields = ["method", "steps", "subjects", "failed", *METRICS, *(f"{k}_ci95" for k in METRICS), "train_s",
                  "iterations", "infer_s_per_image", "comparable"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / "table.md").write_text(_markdown(rows))


def _markdown(rows: list[dict]) -> str:
    lines = ["| method | steps | CLIP-T | CLIP-I | DINO | train s | iterations | inference s/image | subjects |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["subjects"]:
            lines.append(f"| {r['method']} | {r['steps']} | – | – | – | – | – | – | 0 ({r['failed']} failed) |")
            continue
        cells = [f"{r[k]:.3f} [{r[f'{k}_ci95'][0]:.3f}, {r[f'{k}_ci95'][1]:.3f}]" for k in METRICS]
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        lines.append(f"| {r['method']} | {r['steps']} | {' | '.join(cells)} | {r['train_s']:.0f} | {r['iterations']} | "
                     f"{r['infer_s_per_image']:.3f} | {r['subjects']}{failed} |")
    lines += ["", "Means over subjects with bootstrap 95% intervals; raw cosines (`python -m opad.evaluate`).",
              "Paper, Table 5 (SD-Turbo, 1 step; CLIP-T / CLIP-I / DINO): "
              + "; ".join(f"{m} {t:.3f} / {i:.3f} / {d:.3f}" for m, (t, i, d) in PAPER.items()) + "."]
    if any(r.get("comparable") is False for r in rows):
        lines += ["", "**Not comparable with the paper:** these runs used tiny models or tiny random encoders."]
    return "\n".join(lines) + "\n"


def write_grids(out: Path, subjects: list[str], methods: list[str], prompts: int) -> None:
    """grids/SUBJECT.png: a row per method (its seed-0 image of each prompt at 1 step), thumbnails."""
    (out / "grids").mkdir(parents=True, exist_ok=True)
    side, label_w = 96, 120
    for s in subjects:
        rows = [(m, out / "runs" / s / m / "images" / "steps1") for m in methods]
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
        if args.job:
            run_job(args, *args.job)
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
