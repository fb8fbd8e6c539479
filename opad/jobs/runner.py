"""Running jobs: one attempt of a job (:func:`attempt`, the same code locally and in a Ray task) and
the two runners. An attempt runs ``python -m opad.train`` as a subprocess on the job's output folder,
with ``--resume`` when the folder has a complete checkpoint, so a retried job continues, not restarts.

- The trainer exits 0: the job is done (``done.json``).
- It is killed (a signal), or stops at SIGTERM / Ctrl-C with a checkpoint (exit 130): the worker was
  lost or preempted; :class:`JobLost` is raised and the job is retried (locally by the runner, on Ray
  by Ray, which also retries a task whose worker process or node died).
- Any other exit (the trainer's one-line ``error:``: bad photos, a config error): the job failed by
  itself; ``failed.json`` records the line and it is not retried.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from opad.errors import OpadError, cause_line, first_line
from opad.fsutil import write_json
from opad.jobs import state


class JobLost(Exception):
    """The attempt's trainer was killed or preempted: retry the job (it resumes from its checkpoint)."""


try:  # bound here, in the parent: the child only makes the one call
    _PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except OSError:  # not Linux / glibc: a lost worker's trainer is not killed with it
    _PRCTL = None


def _die_with_parent() -> None:
    """In the trainer's process: be killed when the attempt's process dies (a lost Ray worker must not
    leave a trainer writing into the folder the retry resumes from)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _error_line(log: Path, start: int) -> str:
    """The first ``error:`` line this attempt wrote to the log (the cause), else its last line."""
    with log.open("rb") as f:
        f.seek(start)
        return cause_line(f.read().decode(errors="replace").replace("\r", "\n").splitlines())


def attempt(payload: dict, gpu: int | None = None) -> dict:
    """One attempt at one job; returns its result ({"status": "done" | "failed", ...}) or raises JobLost."""
    job, token = payload["job"], payload["token"]
    out = Path(job["output_dir"])
    host = socket.gethostname()
    mark = state.read_json(out / state.MARK)
    if mark is None or mark.get("token") != token:
        return {"status": "failed", "retry": False,
                "error": f"error: the worker on {host} cannot see {out / state.MARK}, which the command wrote: output "
                         "folders must be on storage every worker sees (a shared path, the same on every node)"}
    where = state.inspect(out, job["config"])
    if where.kind == "done":
        return {"status": "done", "host": host, **(state.read_json(out / state.DONE) or {})}
    if where.kind in ("changed", "foreign"):
        return {"status": "failed", "error": f"error: {where.detail}"}
    flags = [*job["flags"], "--resume"] if where.kind == "resume" else [*job["flags"], "--overwrite"]
    env = {**os.environ, **payload.get("env", {}), "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    log = out / state.LOG
    number = len(state.attempts(out, token)) + 1
    started = time.time()
    with log.open("ab") as f:
        how = f"resuming from step {where.step}" if where.kind == "resume" else "from the start"
        f.write(f"\n=== opad.jobs attempt {number} on {host} ({how})\n".encode())
        start = f.tell()
        f.flush()
        proc = subprocess.Popen([sys.executable, "-m", "opad.train", *flags], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env,
                                # only the prctl call runs in the child (no lock a thread could hold)
                                preexec_fn=_die_with_parent)  # noqa: PLW1509
    record = {"token": token, "attempt": number, "host": host, "pid": os.getpid(), "trainer_pid": proc.pid,
              "resume_step": where.step if where.kind == "resume" else 0, "started": started}
    with (out / state.ATTEMPTS).open("a") as f:
        f.write(json.dumps(record) + "\n")
    code = proc.wait()
    seconds = time.time() - started
    if code == 0:
        done = {"name": job["name"], "steps": job["config"].get("max_steps"), "host": host, "attempts": number,
                "resumed_from": record["resume_step"], "seconds": round(seconds, 1)}
        write_json(out / state.DONE, done)
        (out / state.FAILED).unlink(missing_ok=True)
        return {"status": "done", **done}
    if code < 0 or code == 130:
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else "stopped (SIGTERM / Ctrl-C) at a checkpoint"
        raise JobLost(f"attempt {number}: the trainer was {how} on {host}")
    error = _error_line(log, start)
    write_json(out / state.FAILED, {"name": job["name"], "exit_code": code, "error": error, "host": host,
                                   "log": str(log)})
    return {"status": "failed", "error": error, "exit_code": code}


def _lost_result(error: str) -> dict:
    return {"status": "failed", "error": f"error: {error}", "lost": True}


# ---------------------------------------------------------------------------------------- local
class LocalRunner:
    """Jobs as subprocesses on this machine, ``parallel`` at a time (one per GPU when there are GPUs)."""

    def __init__(self, parallel: int, retries: int, gpus: int) -> None:
        self.parallel, self.retries, self.gpus = max(1, parallel), retries, gpus

    def describe(self) -> str:
        return f"locally, {self.parallel} at a time" + (f" on {self.gpus} GPU(s)" if self.gpus else "")

    def run(self, payloads: list[dict], poll: Callable[[], None], finished: Callable[[dict, dict], None]) -> None:
        slots = list(range(self.parallel))

        def one(payload: dict) -> None:
            slot = slots.pop()
            gpu = slot % self.gpus if self.gpus else None
            try:
                for tries in range(self.retries + 1):
                    try:
                        result = attempt(payload, gpu)
                        break
                    except JobLost as e:
                        result = _lost_result(f"{e}; gave up after {tries + 1} attempt(s)")
                    except Exception as e:  # noqa: BLE001 - one job's failure is recorded, the others go on
                        result = {"status": "failed", "error": f"error: {type(e).__name__}: {first_line(e)}"}
                        break
                poll()
                finished(payload, result)
            finally:
                slots.append(slot)

        with ThreadPoolExecutor(self.parallel) as pool:
            futures = [pool.submit(one, p) for p in payloads]
            while not all(f.done() for f in futures):
                poll()
                time.sleep(0.5)
            for f in futures:
                f.result()


# ---------------------------------------------------------------------------------------- Ray
class RayRunner:
    """Each job a Ray task (``num_gpus=1`` where the cluster has GPUs, else ``cpus`` CPUs); Ray retries a
    task whose worker died (or whose trainer was killed or preempted: ``work`` raised :class:`JobLost`) up to
    ``retries`` times. ``work(payload) -> result`` is one attempt: a trainer run (:func:`attempt`), or another
    command's job (``opad.reproduce --ray``)."""

    def __init__(self, address: str, retries: int, cpus: float, work: Callable[[dict], dict] = attempt) -> None:
        self.work = work
        try:
            import ray
        except ImportError as e:
            raise OpadError("--ray needs Ray, which is not installed: pip install -e '.[ray]' "
                            "(or pip install 'ray[default]')") from e
        self.ray = ray
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise OpadError(f"--ray {address}: no Ray cluster to join ({first_line(e)}); start one with "
                                "'ray start --head' (see docs/cluster.md)") from e
        self.retries = retries
        self.gpus = int(ray.cluster_resources().get("GPU", 0))
        self.resources = {"num_gpus": 1} if self.gpus else {"num_cpus": cpus}

    def describe(self) -> str:
        res = self.ray.cluster_resources()
        return (f"on Ray ({len(self.ray.nodes())} node(s), {res.get('CPU', 0):g} CPUs, {self.gpus} GPUs), "
                + ("1 GPU per job" if self.gpus else f"{self.resources['num_cpus']:g} CPU(s) per job"))

    def run(self, payloads: list[dict], poll: Callable[[], None], finished: Callable[[dict, dict], None]) -> None:
        ray = self.ray
        task = ray.remote(self.work).options(max_retries=self.retries, retry_exceptions=[JobLost], **self.resources)
        refs = {task.remote(p): p for p in payloads}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            poll()
            for ref in ready:
                try:
                    result = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a lost job (retries spent) or a task error: recorded
                    cause = getattr(e, "cause", None) or e
                    result = _lost_result(f"{type(cause).__name__}: {first_line(cause)}; gave up after "
                                          f"{self.retries + 1} attempt(s)")
                finished(refs[ref], result)
