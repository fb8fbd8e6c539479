"""``python -m opad.jobs`` (``opad jobs``): train every concept of a jobs file, locally or on a Ray cluster."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from pathlib import Path

from opad.errors import OpadError, command_main
from opad.fsutil import write_json
from opad.jobs import state
from opad.jobs.spec import Job, read_jobs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m opad.jobs",
        description="Train many concepts from one jobs file (YAML or CSV: one row per concept, its columns "
        "python -m opad.train flags: instance_dir, class, output_dir, method, max_steps, ...). Without --ray the "
        "jobs run here as subprocesses; with --ray each job is a Ray task. A finished job (done.json in its "
        "output folder) is skipped when the command runs again; a job whose worker dies is retried and resumes "
        "from its last checkpoint; a job that fails by itself (the trainer's error: line) is recorded, not "
        "retried; a job whose recorded config differs from its row is flagged, not reused. See docs/cluster.md.",
    )
    p.add_argument("jobs_file", help="the jobs file (.yaml, .yml or .csv); relative paths in it are relative to it")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run each job as a task on the Ray cluster at ADDRESS ('auto': the one 'ray start' "
                   "started on this machine); output folders must be on storage every worker sees")
    p.add_argument("--parallel", type=int, default=None,
                   help="without --ray: jobs at a time (default: one per visible GPU, else 1)")
    p.add_argument("--retries", type=int, default=2,
                   help="times a job whose worker died or was preempted is retried, each resuming (default: 2)")
    p.add_argument("--cpus-per-job", type=float, default=1.0,
                   help="with --ray on a cluster without GPUs: the CPUs each job reserves (default: 1; with GPUs "
                   "each job reserves one GPU)")
    p.add_argument("--rerun-changed", action="store_true",
                   help="train again, from the start, the jobs whose recorded config differs from their row "
                   "(default: flag them and leave their folders as they are)")
    p.add_argument("--dry-run", action="store_true", help="check the jobs file and say what would run; run nothing")
    p.add_argument("--json", action="store_true",
                   help="stdout: one JSON object per job state change, then a summary object")
    return p


class Progress:
    """One line per job state change (stderr; with --json also a JSON object on stdout) and the summary."""

    def __init__(self, jobs: list[Job], as_json: bool) -> None:
        self.jobs, self.as_json = jobs, as_json
        self.rows = {j.name: {"name": j.name, "output_dir": j.output_dir, "state": "queued", "attempts": 0,
                              "resumed_from": 0, "seconds": None, "note": ""} for j in jobs}
        self.lock = threading.Lock()
        self.start = time.time()

    def event(self, name: str, new_state: str, note: str = "", **fields) -> None:
        with self.lock:
            row = self.rows[name]
            row.update(state=new_state, **fields)
            if note:
                row["note"] = note
            index = next(i for i, j in enumerate(self.jobs, start=1) if j.name == name)
            print(f"[{index}/{len(self.jobs)}] {name}: {new_state}" + (f" ({note})" if note else ""), file=sys.stderr,
                  flush=True)
            if self.as_json:
                print(json.dumps({"event": new_state, "job": name, "note": note, **fields}), flush=True)

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for row in self.rows.values():
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        retried = sum(1 for r in self.rows.values() if r["attempts"] > 1)
        return {"jobs": len(self.rows), "done": counts.get("done", 0), "skipped": counts.get("done before", 0),
                "running": counts.get("running", 0) + counts.get("retried", 0), "retried": retried,
                "failed": counts.get("failed", 0), "changed": counts.get("changed", 0),
                "seconds": round(time.time() - self.start, 1)}

    def print_table(self) -> dict:
        s = self.summary()
        head = ("job", "state", "attempts", "resumed from", "time", "note")
        table = [head] + [(r["name"], r["state"], str(r["attempts"]), str(r["resumed_from"] or "-"),
                           "-" if r["seconds"] is None else f"{r['seconds']:.0f} s", r["note"][:100])
                          for r in self.rows.values()]
        widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
        for row in table:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1], file=sys.stderr)
        print(f"{s['jobs']} jobs: {s['done']} done, {s['skipped']} done before, {s['retried']} retried, "
              f"{s['failed']} failed, {s['changed']} changed (flagged), {s['seconds']:.0f} s", file=sys.stderr)
        if self.as_json:
            print(json.dumps({"summary": s, "jobs": list(self.rows.values())}), flush=True)
        return s


def _make_runner(args: argparse.Namespace):
    from opad.jobs.runner import LocalRunner, RayRunner

    if args.ray is not None:
        return RayRunner(args.ray, args.retries, args.cpus_per_job)
    from opad.devices import visible_gpus  # torch only when it is needed

    gpus = visible_gpus()
    return LocalRunner(args.parallel or max(1, gpus), args.retries, gpus)


def run(args: argparse.Namespace) -> dict:
    if args.retries < 0 or (args.parallel is not None and args.parallel < 1) or args.cpus_per_job <= 0:
        raise OpadError("--retries must be >= 0, --parallel >= 1 and --cpus-per-job > 0")
    jobs = read_jobs(args.jobs_file)
    progress = Progress(jobs, args.json)
    todo: list[Job] = []
    fresh: set[str] = set()
    for job in jobs:
        where = state.inspect(Path(job.output_dir), job.config)
        if where.kind == "done":
            done = state.read_json(Path(job.output_dir) / state.DONE) or {}
            progress.event(job.name, "done before", attempts=done.get("attempts", 0),
                           resumed_from=done.get("resumed_from", 0), seconds=done.get("seconds"))
        elif where.kind == "changed" and not args.rerun_changed:
            progress.event(job.name, "changed", f"{where.detail}; not rerun: --rerun-changed trains it again")
        elif where.kind == "foreign":
            progress.event(job.name, "failed", where.detail)
        else:
            if where.kind == "changed":
                fresh.add(job.name)
            todo.append(job)
    if args.dry_run or not todo:
        for job in todo:
            where = state.inspect(Path(job.output_dir), job.config)
            progress.event(job.name, "would run", f"resuming from step {where.step}" if where.kind == "resume"
                           else "from the start")
        return progress.print_table()
    runner = _make_runner(args)
    print(f"{len(jobs)} jobs: {len(jobs) - len(todo)} not to run, {len(todo)} to run {runner.describe()}",
          file=sys.stderr)
    token = uuid.uuid4().hex
    from opad.cache import forwarded_env

    env = forwarded_env()
    payloads = []
    for job in todo:
        out = Path(job.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if job.name in fresh:
            for name in (state.DONE, state.FAILED):
                (out / name).unlink(missing_ok=True)
            import shutil

            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the trainer's --overwrite clears the rest
        write_json(out / state.MARK, {"token": token, "name": job.name, "row": job.row, "flags": list(job.flags),
                                      "jobs_file": str(Path(args.jobs_file).resolve()), "written": time.time()})
        payloads.append({"job": job.to_dict(), "token": token, "env": env})
    seen: dict[str, int] = {}

    def poll() -> None:
        for payload in payloads:
            name = payload["job"]["name"]
            if progress.rows[name]["state"] in ("done", "failed"):
                continue
            for record in state.attempts(Path(payload["job"]["output_dir"]), token)[seen.get(name, 0):]:
                seen[name] = record["attempt"]
                where = (f"resuming from step {record['resume_step']}" if record["resume_step"]
                         else "from the start")
                first = record["attempt"] == 1
                progress.event(name, "running" if first else "retried",
                               ("" if first else f"attempt {record['attempt']}, ") + f"{where} on {record['host']}",
                               attempts=record["attempt"], resumed_from=record["resume_step"])

    def finished(payload: dict, result: dict) -> None:
        name = payload["job"]["name"]
        row = progress.rows[name]
        if result["status"] == "done":
            progress.event(name, "done", f"{result.get('steps')} steps", seconds=result.get("seconds"),
                           attempts=result.get("attempts", row["attempts"]))
        else:
            progress.event(name, "failed", result["error"].removeprefix("error: "))

    runner.run(payloads, poll, finished)
    return progress.print_table()


@command_main(interrupted="interrupted: running jobs stop (the trainer writes a checkpoint at Ctrl-C); run the same "
              "command again to resume them")
def main(argv: list[str] | None = None) -> int:
    summary = run(build_parser().parse_args(argv))
    return 1 if summary["failed"] or summary["changed"] else 0


if __name__ == "__main__":
    sys.exit(main())
