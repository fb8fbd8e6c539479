"""The jobs file: one row per concept, each row a training run's flags (``python -m opad.train``).

YAML: a list of mappings (or a mapping with a ``jobs:`` list). CSV: a header row of column names,
then one row per job; an empty cell leaves that flag out. A row's keys are trainer flags without the
dashes (``instance_dir`` or ``instance-dir``, ``max_steps``, ...); ``class`` is ``class_name``; ``name``
names the job (default: the output folder's name). ``output_dir`` is required. Relative paths are
relative to the jobs file's folder. Every row is checked up front with the trainer's own parser and
config checks; the first bad row stops the command with one line naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
from pathlib import Path

from opad.errors import OpadError, first_line

ALIASES = {"class": "class_name"}
PATH_KEYS = ("instance_dir", "class_dir", "output_dir", "config")
# the jobs runner decides these per attempt
RESERVED = ("resume", "overwrite")


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    row: int  # 1-based row of the jobs file (CSV: the data row, not counting the header)
    output_dir: str  # absolute
    flags: tuple[str, ...]  # trainer flags, without --resume / --overwrite
    config: dict  # the resolved trainer config this job runs (what config.json records), JSON-normalized

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise OpadError(f"jobs file {str(path)!r} not found")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise OpadError(f"jobs file {str(path)!r} is not valid YAML: {first_line(e)}") from e
        if isinstance(data, dict) and "jobs" in data:
            data = data["jobs"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise OpadError(f"jobs file {str(path)!r}: expected a list of jobs (one mapping of flags per job)")
        return data
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        for i, row in enumerate(rows, start=1):
            if None in row:
                raise OpadError(f"jobs file {str(path)!r} row {i}: more cells than header columns")
        return [{k.strip(): v.strip() for k, v in row.items() if v is not None and v.strip() != ""} for row in rows]
    raise OpadError(f"jobs file {str(path)!r}: use a .yaml, .yml or .csv file")


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _parse(flags: list[str]) -> argparse.Namespace:
    """The trainer's parser on ``flags``; its error as one line (OpadError), not an exit."""
    from opad.train.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(flags)
    except SystemExit as e:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        raise OpadError(lines[-1].split("error: ", 1)[-1] if lines else "invalid flags") from e


def resolved_config(flags: list[str] | tuple[str, ...]) -> dict:
    """The config the trainer would record in config.json for ``flags`` (defaults filled in)."""
    from opad.config import config_from_args
    from opad.presets import default_preset

    cfg = config_from_args(_parse(list(flags)))
    preset = default_preset(cfg.preset) if cfg.teacher is None and cfg.student is None else None
    return json.loads(cfg.resolved(preset).to_json())


def _job(row: dict, index: int, base: Path) -> Job:
    values = {}
    for key, value in row.items():
        name = ALIASES.get(str(key).strip(), str(key).strip()).replace("-", "_")
        if name in RESERVED:
            raise OpadError(f"{name!r} is set by opad.jobs itself (finished jobs are skipped, interrupted "
                            "ones resumed); leave it out")
        if name in values:
            raise OpadError(f"{key!r} given twice")
        values[name] = value
    name = str(values.pop("name", "")).strip()
    if not values.get("output_dir"):
        raise OpadError("no output_dir (every job needs its own output folder)")
    for key in PATH_KEYS:
        if values.get(key) not in (None, ""):
            values[key] = str((base / str(values[key])).resolve())
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        flags += ["--" + key.replace("_", "-"), _value(value)]
    config = resolved_config(flags)
    return Job(name=name or Path(values["output_dir"]).name, row=index, output_dir=values["output_dir"],
               flags=tuple(flags), config=config)


def read_jobs(path: str | Path) -> list[Job]:
    """Every job of the file, each checked; one OpadError line naming the first bad row."""
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise OpadError(f"jobs file {str(path)!r} lists no jobs")
    jobs: list[Job] = []
    for index, row in enumerate(rows, start=1):
        try:
            jobs.append(_job(row, index, path.resolve().parent))
        except OpadError as e:
            raise OpadError(f"jobs file {str(path)!r} row {index}: {e}") from e
    seen: dict[str, Job] = {}
    for job in jobs:
        for key, what in ((job.output_dir, "output_dir"), (job.name, "name")):
            other = seen.get(what + ":" + key)
            if other is not None:
                raise OpadError(f"jobs file {str(path)!r} rows {other.row} and {job.row} have the same {what} "
                                f"{key!r}; every job needs its own")
            seen[what + ":" + key] = job
    return jobs
