"""Running the jobs: one (subject, arm, training seed) trains, generates and scores in its own folder
and process; the harness runs them all (one per GPU when there are several) and writes the tables."""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from opad.errors import OpadError, cause_line
from opad.evaluation.reproduce.plan import ARMS, METRICS, WORLD_NOTE, Arm, check_args, job_dir
from opad.evaluation.reproduce.tables import write_grids, write_table
from opad.presets import run_teacher


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


def _job_process(job: Path, argv: list[str], env: dict[str, str]) -> tuple[int, str | None]:
    """Run one job's process (its log in the job folder); (exit code, None on success else its error line,
    also in failed.json)."""
    with (job / "log.txt").open("a") as log:
        code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    if code == 0 and (job / "done.json").is_file():
        return code, None
    error = cause_line((job / "log.txt").read_text(errors="replace").splitlines())
    (job / "failed.json").write_text(json.dumps({"exit_code": code, "error": error, "log": str(job / "log.txt")}))
    return code, error


def _spawn(args: argparse.Namespace, argv: list[str], subject: str, arm: str, seed: int, gpu: int | None) -> str | None:
    """One job in its own process; None on success, else its error line (also in failed.json)."""
    job = _fresh_job(Path(args.out), subject, arm, seed)
    (job / "log.txt").unlink(missing_ok=True)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return _job_process(job, _job_argv(argv, subject, arm, seed), env)[1]


def ray_job(payload: dict) -> dict:
    """One job as a Ray task (``opad.reproduce --ray``): the job's own process, as without Ray. A process
    killed by a signal (its worker lost or preempted) raises JobLost, so Ray retries it, and the retry's
    training resumes from the job's checkpoints; any other failure is recorded, not retried."""
    from opad.jobs.runner import JobLost

    job = Path(payload["job_dir"])
    if not job.is_dir():
        return {"error": f"error: the worker on {socket.gethostname()} cannot see {job}: --out must be on storage "
                         "every worker sees (a shared path, the same on every node)"}
    code, error = _job_process(job, payload["argv"], {**os.environ, **payload["env"]})
    if code < 0:
        raise JobLost(f"the job's process was killed by signal {-code} on {socket.gethostname()}")
    return {"error": error}


def _without_ray(argv: list[str]) -> list[str]:
    """The harness's arguments less --ray: a job's own process runs one job, not a cluster."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--ray":
            skip = True
        elif not token.startswith("--ray="):
            kept.append(token)
    return kept


def _on_ray(args: argparse.Namespace, argv: list[str], todo: list[tuple[str, str, int]]) -> None:
    """Every job a task on the Ray cluster at ``args.ray`` (the runner of ``opad jobs --ray``)."""
    from opad.cache import forwarded_env
    from opad.jobs.runner import RayRunner

    runner = RayRunner(args.ray, retries=args.retries, cpus=1.0, work=ray_job)
    print(f"running {len(todo)} jobs {runner.describe()}", file=sys.stderr)
    argv = _without_ray(argv)
    payloads = []
    for index, job in enumerate(todo, start=1):
        payloads.append({"index": index, "job": job, "job_dir": str(_fresh_job(Path(args.out), *job)),
                         "argv": _job_argv(argv, *job), "env": forwarded_env()})
        (Path(payloads[-1]["job_dir"]) / "log.txt").unlink(missing_ok=True)

    def finished(payload: dict, result: dict) -> None:
        subject, arm, seed = payload["job"]
        error = result.get("error")
        print(f"[{payload['index']}/{len(todo)}] {subject} / {arm} / seed {seed}: "
              + ("done" if error is None else f"FAILED: {error}"), file=sys.stderr)

    runner.run(payloads, poll=lambda: None, finished=finished)


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


def run_harness(args: argparse.Namespace, argv: list[str]) -> Path:
    plan = check_args(args)
    out = Path(args.out)
    jobs = plan.jobs()
    todo = [j for j in jobs if not (job_dir(out, *j) / "done.json").is_file()]
    print(f"{len(jobs)} jobs ({len(plan.subjects)} subjects x {len(plan.arms)} methods x {len(plan.train_seeds)} "
          f"training seeds); {len(jobs) - len(todo)} done before, {len(todo)} to run", file=sys.stderr)
    from opad.devices import visible_gpus  # torch only when it is needed

    gpus = args.gpus if args.gpus is not None else visible_gpus()
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

    if args.ray:
        _on_ray(args, argv, todo)
    elif args.in_process:  # on this (the main) thread: torch's thread pool and Ctrl-C stay where they belong
        for index, job in enumerate(todo, start=1):
            one(job, index)
    else:
        with ThreadPoolExecutor(len(slots)) as pool:
            list(pool.map(one, todo, range(1, len(todo) + 1)))
    write_table(out, plan, WORLD_NOTE if args.world else None)
    write_grids(out, plan, args.prompts)
    return out
