"""What a job's output folder says, read the same way by the command and by each attempt.

Besides the trainer's own files the folder holds the runner's: ``job.json`` (written by the command
before a job is sent: marks the folder as this job's and proves a worker sees the same storage),
``attempts.jsonl`` (one line per attempt: host, pids, the step it resumed from), ``job.log`` (the
trainer's output, every attempt appended), ``done.json`` (a finished job: never rerun) and
``failed.json`` (the one-line reason of a job that failed by itself).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

MARK, ATTEMPTS, LOG, DONE, FAILED = "job.json", "attempts.jsonl", "job.log", "done.json", "failed.json"
OWN_FILES = {MARK, ATTEMPTS, LOG, DONE, FAILED}
# fields a resumed run may change (opad.train.loop.RESUME_MAY_CHANGE; a test keeps the two equal)
RESUME_MAY_CHANGE = {"max_steps", "preview_every", "checkpoint_every", "keep_checkpoints", "device",
                     "mixed_precision", "gradient_checkpointing", "resume", "overwrite", "output_dir",
                     "preview_teacher_steps", "preview_prompts"}
# fields that leave a finished run's trained concept as it is (where and how often it wrote files)
DONE_MAY_CHANGE = {"preview_every", "checkpoint_every", "keep_checkpoints", "device", "gradient_checkpointing",
                   "resume", "overwrite", "output_dir", "preview_teacher_steps", "preview_prompts"}


@dataclasses.dataclass
class FolderState:
    kind: str  # new | done | resume | restart | changed | foreign
    step: int = 0  # resume: the newest complete checkpoint's step
    detail: str = ""


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def config_changes(saved: dict, now: dict, may_change: set[str]) -> list[str]:
    """'field: run X, now Y' for each field that differs (a field newer than the run's config.json is no change)."""
    return [f"{k}: run {saved[k]!r}, now {now[k]!r}" for k in sorted(now)
            if k not in may_change and k in saved and saved[k] != now[k]]


def newest_checkpoint(out: Path) -> int | None:
    from opad.train.checkpoint import latest_checkpoint

    found = latest_checkpoint(out)
    return None if found is None else found[0]


def inspect(out: Path, config: dict) -> FolderState:
    """The folder of a job that would run ``config`` now: what running it again should do."""
    if not out.is_dir() or not any(out.iterdir()):
        return FolderState("new")
    saved = read_json(out / "config.json")
    if (out / DONE).is_file():
        changed = config_changes(saved or {}, config, DONE_MAY_CHANGE)
        if changed:
            return FolderState("changed", detail="finished with another config (" + "; ".join(changed) + ")")
        return FolderState("done")
    step = newest_checkpoint(out)
    if step is not None:
        changed = config_changes(saved or {}, config, RESUME_MAY_CHANGE)
        if changed:
            return FolderState("changed", step, "its checkpoints are of another config (" + "; ".join(changed) + ")")
        return FolderState("resume", step)
    if (out / MARK).is_file():
        return FolderState("restart")  # this runner's folder, stopped before its first checkpoint
    others = sorted(p.name for p in out.iterdir() if p.name not in OWN_FILES)
    return FolderState("foreign", detail=f"the output folder already holds other files ({', '.join(others[:3])}"
                                         f"{', ...' if len(others) > 3 else ''}) and no checkpoint to resume")


def attempts(out: Path, token: str | None = None) -> list[dict]:
    """The attempts recorded in the folder (only this command's when ``token`` is given)."""
    try:
        lines = (out / ATTEMPTS).read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed worker
        if token is None or record.get("token") == token:
            found.append(record)
    return found
