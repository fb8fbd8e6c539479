"""python -m opad.jobs: the jobs file, the folder states, and (with Ray installed) a real local cluster on which
a worker is killed mid-job and the job resumes from its checkpoint to the same result as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest

from opad.jobs import state
from opad.jobs.cli import main
from opad.jobs.spec import read_jobs, resolved_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a cheap, deterministic trainer run on the tiny preset (the student alone)
TINY = {"method": "textual-inversion", "checkpoint_every": 2, "preview_every": 1000, "seed": 3}


def _yaml(path, rows) -> str:
    import yaml

    path.write_text(yaml.safe_dump(rows))
    return str(path)


# ---------------------------------------------------------------------------------------- the jobs file
def test_yaml_and_csv_rows_become_checked_trainer_flags(tmp_path):
    (tmp_path / "photos").mkdir()
    a = read_jobs(_yaml(tmp_path / "jobs.yaml", [{"instance_dir": "photos", "class": "dog", "output_dir": "out/dog",
                                                  "max_steps": 4, "one_shot": True, "discriminators": ["clip"]}]))
    (tmp_path / "jobs.csv").write_text("name,instance-dir,class,output_dir,max_steps,one_shot,seed\n"
                                       "dog,photos,dog,out/dog,4,true,\n")
    b = read_jobs(tmp_path / "jobs.csv")
    assert a[0].name == "dog" and b[0].name == "dog"
    assert a[0].output_dir == str(tmp_path / "out" / "dog")  # relative to the jobs file
    assert a[0].config["instance_dir"] == str(tmp_path / "photos") and a[0].config["class_name"] == "dog"
    assert a[0].config["one_shot"] is True and a[0].config["max_steps"] == 4
    assert a[0].config["discriminators"] == ["clip"]
    assert b[0].config["one_shot"] is True and "--seed" not in b[0].flags  # an empty cell leaves the flag out


@pytest.mark.parametrize("rows, message", [
    ([{"output_dir": "a"}, {"output_dir": "b", "max_stepz": 3}], r"row 2: unrecognized arguments: --max-stepz 3"),
    ([{"output_dir": "a"}, {"output_dir": "a"}], r"rows 1 and 2 have the same output_dir"),
    ([{"method": "lora"}], r"row 1: no output_dir"),
    ([{"output_dir": "a", "resume": True}], r"row 1: 'resume' is set by opad.jobs itself"),
    ([{"output_dir": "a", "method": "nope"}], r"row 1: .*nope"),
])
def test_a_bad_row_is_one_line_naming_it(tmp_path, capsys, rows, message):
    import re

    code = main([_yaml(tmp_path / "jobs.yaml", rows), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: jobs file"), err
    assert re.search(message, err), err


def test_resume_rule_matches_the_trainer():
    from opad.train.loop import RESUME_MAY_CHANGE

    assert state.RESUME_MAY_CHANGE == RESUME_MAY_CHANGE


def _fake_finished(out, config: dict) -> None:
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config))
    (out / state.DONE).write_text(json.dumps({"attempts": 1, "seconds": 5.0}))


def test_finished_jobs_are_skipped_and_changed_ones_flagged(tmp_path, capsys):
    path = _yaml(tmp_path / "jobs.yaml", [{"output_dir": "same", **TINY, "max_steps": 4},
                                          {"output_dir": "changed", **TINY, "max_steps": 6}])
    jobs = read_jobs(path)
    _fake_finished(tmp_path / "same", jobs[0].config)
    _fake_finished(tmp_path / "changed", {**jobs[1].config, "max_steps": 4})
    assert resolved_config(jobs[1].flags) == jobs[1].config
    code = main([path, "--json"])  # nothing to run: no runner starts
    out, err = capsys.readouterr()
    assert code == 1
    assert "same: done before" in err and "changed: changed (finished with another config (max_steps: run 4, now 6)" in err
    summary = json.loads(out.splitlines()[-1])["summary"]
    assert (summary["skipped"], summary["changed"], summary["done"]) == (1, 1, 0)


def test_ray_flag_without_ray_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    code = main([_yaml(tmp_path / "jobs.yaml", [{"output_dir": "a", **TINY}]), "--ray", "auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: --ray needs Ray, which is not installed"), err


def test_locally_a_killed_trainer_is_retried_and_resumes(tiny_dir, tmp_path, capsys):
    """Without Ray: the trainer of a job is SIGKILLed after a checkpoint; the local runner retries the job,
    which resumes from that checkpoint and finishes."""
    path = _yaml(tmp_path / "jobs.yaml", [{"name": "killed", "output_dir": "out/killed", **TINY, "max_steps": 16}])
    killed: dict = {}
    killer = threading.Thread(target=_kill_worker_after_a_checkpoint,
                              args=(tmp_path / "out" / "killed", killed, "trainer_pid"))
    killer.start()
    code = main([path, "--json", "--retries", "1"])
    killer.join()
    out, err = capsys.readouterr()
    assert killed and code == 0, err[-3000:]
    attempts = state.attempts(tmp_path / "out" / "killed")
    assert [a["attempt"] for a in attempts] == [1, 2] and attempts[1]["resume_step"] >= killed["step"] > 0
    assert json.loads(out.splitlines()[-1])["summary"]["retried"] == 1
    assert "killed: retried (attempt 2, resuming from step" in err
    assert json.loads((tmp_path / "out" / "killed" / state.DONE).read_text())["attempts"] == 2


# ---------------------------------------------------------------------------------------- a real Ray cluster
@pytest.fixture(scope="module")
def cluster(tiny_dir):
    ray = pytest.importorskip("ray")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = REPO + (os.pathsep + old if old else "")  # workers import this checkout's opad
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def _kill_worker_after_a_checkpoint(out, killed: dict, key: str = "pid") -> None:
    """SIGKILL job ``out``'s Ray worker (``key`` "pid"; "trainer_pid": its trainer) once the trainer wrote a
    checkpoint after step 0."""
    from opad.train.checkpoint import latest_checkpoint

    deadline = time.time() + 120
    while time.time() < deadline:
        found = latest_checkpoint(out)
        records = state.attempts(out)
        if found and found[0] >= 2 and records:
            killed.update(records[0], step=found[0])
            os.kill(records[0][key], signal.SIGKILL)
            return
        time.sleep(0.05)


def _result(out) -> dict:
    """What a run produced: its final checkpoint, concept and per-step losses. Left out: the wall time and the
    global torch RNG state, which differs after any resume (tests/test_train.py's bit-exact resume test leaves it
    out too); training draws from its own generators, which are compared."""
    from safetensors.torch import load_file

    from opad.train.checkpoint import latest_checkpoint, load_checkpoint
    from opad.train.runlog import read_log

    final = load_checkpoint(latest_checkpoint(out)[1])
    for key in ("train_seconds", "torch_rng"):
        final.pop(key)
    concept = {p.name: load_file(p) for p in sorted((out / "concept").glob("*.safetensors"))}
    losses = [{k: v for k, v in r.items() if k.startswith("loss/")} for r in read_log(out / "log.csv")]
    return {"checkpoint": final, "concept": concept, "losses": losses}


def _assert_equal(a, b, where="state"):
    import torch

    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_killed_worker_is_retried_and_resumes_to_the_uninterrupted_result(cluster, tmp_path, capsys):
    path = _yaml(tmp_path / "jobs.yaml", [
        {"name": "killed", "output_dir": "out/killed", **TINY, "max_steps": 24},
        {"name": "straight", "output_dir": "out/straight", **TINY, "max_steps": 24},
        {"name": "short", "output_dir": "out/short", **TINY, "max_steps": 4, "method": "custom-diffusion"},
        {"name": "bad", "output_dir": "out/bad", **TINY, "max_steps": 24, "instance_dir": "missing", "class": "dog"},
    ])
    killed: dict = {}
    killer = threading.Thread(target=_kill_worker_after_a_checkpoint, args=(tmp_path / "out" / "killed", killed))
    killer.start()
    code = main([path, "--ray", "auto", "--json", "--retries", "2"])
    killer.join()
    out, err = capsys.readouterr()
    assert killed, err[-3000:]
    assert code == 1, err[-3000:]  # the bad job failed
    summary = json.loads(out.splitlines()[-1])
    rows = {r["name"]: r for r in summary["jobs"]}
    assert (summary["summary"]["done"], summary["summary"]["failed"], summary["summary"]["retried"]) == (3, 1, 1)
    assert rows["short"]["state"] == "done" and (tmp_path / "out" / "short" / "concept").is_dir()

    # the killed job: a second attempt that resumed from a checkpoint, its first trainer gone with its worker
    attempts = state.attempts(tmp_path / "out" / "killed")
    assert [a["attempt"] for a in attempts] == [1, 2] and attempts[0]["resume_step"] == 0
    assert attempts[1]["resume_step"] >= killed["step"] > 0
    assert rows["killed"]["state"] == "done" and rows["killed"]["attempts"] == 2
    assert "killed: retried (attempt 2, resuming from step" in err
    log = (tmp_path / "out" / "killed" / "job.log").read_text()
    assert f"resuming from {tmp_path / 'out' / 'killed'}" in log
    with pytest.raises(ProcessLookupError):
        os.kill(killed["trainer_pid"], 0)
    # the same result as the uninterrupted run (the trainer is deterministic on the CPU)
    _assert_equal(_result(tmp_path / "out" / "killed"), _result(tmp_path / "out" / "straight"))

    # the job that failed by itself: one attempt, its one-line reason recorded
    failed = json.loads((tmp_path / "out" / "bad" / state.FAILED).read_text())
    assert failed["error"].startswith("error: ") and "missing" in failed["error"], failed
    assert len(state.attempts(tmp_path / "out" / "bad")) == 1 and rows["bad"]["state"] == "failed"

    # run again: nothing finished is rerun
    code = main([path, "--ray", "auto", "--json", "--retries", "2"])
    out, err = capsys.readouterr()
    again = json.loads(out.splitlines()[-1])["summary"]
    assert (again["skipped"], again["done"], again["failed"]) == (3, 0, 1), err[-2000:]
    assert len(state.attempts(tmp_path / "out" / "killed")) == 2 and len(state.attempts(tmp_path / "out" / "bad")) == 2


# ---------------------------------------------------------------------------------------- opad.reproduce --ray
def test_reproduce_job_on_ray_records_lost_and_unseen_jobs(tmp_path):
    """A reproduce job's process killed by a signal is lost (Ray retries it; its training resumes from the
    job's checkpoints); a job folder the worker cannot see fails in one line."""
    from opad.evaluation.reproduce.jobs import ray_job
    from opad.jobs.runner import JobLost

    job = tmp_path / "job"
    job.mkdir()
    kill = [sys.executable, "-c", "import os, signal; print('started'); os.kill(os.getpid(), signal.SIGKILL)"]
    with pytest.raises(JobLost, match="killed by signal 9"):
        ray_job({"job_dir": str(job), "argv": kill, "env": {}})
    assert "started" in (job / "log.txt").read_text()
    fail = [sys.executable, "-c", "import sys; print('error: no photos in /x'); sys.exit(2)"]
    assert ray_job({"job_dir": str(job), "argv": fail, "env": {}}) == {"error": "error: no photos in /x"}
    unseen = ray_job({"job_dir": str(tmp_path / "elsewhere"), "argv": fail, "env": {}})
    assert "cannot see" in unseen["error"] and "storage every worker sees" in unseen["error"]


def test_reproduce_runs_its_jobs_as_ray_tasks(cluster, dreambench_dir, tmp_path, capsys):
    import shutil

    from opad.evaluation import reproduce

    root = tmp_path / "dreambench"
    shutil.copytree(dreambench_dir / "can", root / "can")
    shutil.copy(dreambench_dir / "prompts_and_classes.txt", root / "prompts_and_classes.txt")
    argv = ["--out", str(tmp_path / "repro"), "--dreambench", str(root), "--subjects", "can", "--max-steps", "2",
            "--prompts", "1", "--seeds", "1", "--dino-weights", "tiny", "--clip-weights", "tiny",
            "--train-arg=--preview-teacher-steps=2", "--methods", "textual-inversion", "--ray", "auto"]
    assert reproduce.main(argv) == 0
    err = capsys.readouterr().err
    assert "running 1 jobs on Ray" in err and err.count(": done") == 1, err[-2000:]
    job = tmp_path / "repro" / "runs" / "can" / "textual-inversion" / "seed0"
    assert json.loads((job / "done.json").read_text())["method"] == "textual-inversion"
    assert "| textual-inversion | 1 |" in (tmp_path / "repro" / "table.md").read_text()
    assert reproduce.main(argv) == 0  # run again: done before, nothing runs
    assert "1 done before, 0 to run" in capsys.readouterr().err
