"""Where the trainer's defaults come from: ``resolved()`` for every method x profile x preset, against a table
written by the code before the config split (tests/data/resolved_configs.json); ``--help`` quoting the tables;
``--teacher-first`` (flag, config file, an old config.json) as ``--method teacher-first``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from opad.config import FALLBACKS, METHOD_DEFAULTS, METHODS, TrainConfig, config_from_args
from opad.config.profiles import POINTS, PROFILES
from opad.errors import OpadError
from opad.presets import PRESETS
from opad.train.cli import build_parser
from opad.train.methods import METHOD_CLASSES

TABLE = Path(__file__).parent / "data" / "resolved_configs.json"
# beyond the grid: the flags that change how a default resolves (batch-scaled rates, a user's value over a
# preset's, --teacher-first and its steps, the LoRA alpha, a profile field set by hand)
EXTRA = (
    ["--teacher-first"], ["--teacher-first", "--method", "opad"], ["--teacher-first", "false", "--method", "lora"],
    ["--teacher-first", "--max-steps", "10", "--teacher-first-steps", "3"],
    ["--batch-size", "4"], ["--batch-size", "4", "--method", "dreambooth"], ["--batch-size", "3", "--method", "lora"],
    ["--max-steps", "7", "--student-lr", "3e-5", "--teacher-lr", "1e-5", "--ip-adapter", "tiny"],
    ["--method", "lora", "--lora-rank", "8"], ["--method", "lora", "--lora-alpha", "2"],
    ["--profile", "release", "--crop", "center", "--swd-weight", "0.3"], ["--discriminators", "none"],
    ["--preview-prompts", "a {}", "--head-lr", "0"],
)


def _cases() -> dict[str, list[str]]:
    grid = {f"{m} {p}": ["--method", m, "--profile", p] for m in METHODS for p in PROFILES}
    return {**grid, **{" ".join(argv): argv for argv in EXTRA}}


def resolve_all() -> dict[str, dict]:
    """'argv | preset' -> the resolved config as config.json records it (less the old ``teacher_first`` key)."""
    table = {}
    for name, argv in _cases().items():
        cfg = config_from_args(build_parser().parse_args(argv))
        for preset in ("real", *PRESETS):
            values = json.loads(cfg.resolved(PRESETS.get(preset)).to_json())
            values.pop("teacher_first", None)
            table[f"{name} | {preset}"] = values
    return table


def _write(table: dict[str, dict]) -> None:
    """The first case in full, then each case's values that differ from it, one line a case."""
    base = next(iter(table.values()))
    cases = {n: {k: v for k, v in t.items() if base.get(k, ...) != v} for n, t in table.items()}
    lines = ",\n".join(f"  {json.dumps(n)}: {json.dumps(c, sort_keys=True)}" for n, c in cases.items())
    TABLE.write_text(f'{{"base": {json.dumps(base, sort_keys=True)},\n "cases": {{\n{lines}\n}}}}\n')


def test_resolved_defaults_are_the_tables_before_the_split():
    stored = json.loads(TABLE.read_text())
    expected = {n: {**stored["base"], **values} for n, values in stored["cases"].items()}
    assert resolve_all() == expected


def _help_entries() -> dict[str, str]:
    """``python -m opad.train --help``, one entry per flag (wide enough that no line wraps)."""
    env = {**os.environ, "COLUMNS": "100000"}
    text = subprocess.run([sys.executable, "-m", "opad.train", "--help"], capture_output=True, text=True, env=env,
                          check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    entries = re.split(r"\n  (?=--)", text.split("\noptions:\n", 1)[1])
    return {e.split()[0]: " ".join(e.split()) for e in entries if e.startswith("--")}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_help_quotes_every_default_table():
    entries = _help_entries()
    for method, d in METHOD_DEFAULTS.items():
        assert f"{method} {d.steps}" in entries["--max-steps"], method
        assert f"{method} {d.student_lr}" in entries["--student-lr"], method
    for point in POINTS:
        shown = [str(v).lower() if isinstance(v, bool) else "none" if v is None else str(v)
                 for v in (point.paper, point.release)]
        assert f"paper: {shown[0]}, release: {shown[1]}" in entries[_flag(point.field)], point.field
    for name, value in FALLBACKS.items():
        assert f"(default: {','.join(value) if isinstance(value, list) else value}" in entries[_flag(name)], name
    for preset in PRESETS.values():
        for name, value in preset.train_defaults.items():
            value = ",".join(value) if isinstance(value, list) else value
            assert f"{preset.name} preset: {value}" in entries[_flag(name)], (preset.name, name)


def test_no_help_string_repeats_a_default_by_hand():
    numbers = {float(d.steps) for d in METHOD_DEFAULTS.values()} | {d.student_lr for d in METHOD_DEFAULTS.values()}
    numbers |= {float(v) for v in FALLBACKS.values() if isinstance(v, float)}
    numbers |= {float(v) for p in POINTS for v in (p.paper, p.release) if type(v) in (int, float)}
    numbers |= {float(v) for p in PRESETS.values() for v in p.train_defaults.values() if type(v) in (int, float)}
    for f in dataclasses.fields(TrainConfig):
        written = {float(n) for n in re.findall(r"(?<![\w.-])\d+(?:\.\d+)?(?:e-?\d+)?", f.metadata["help"])}
        assert not written & numbers, (f.name, written & numbers)


def test_method_names_are_the_registry():
    assert METHODS == tuple(METHOD_CLASSES) and set(METHOD_DEFAULTS) == set(METHOD_CLASSES)
    assert "teacher_first" not in {f.name for f in dataclasses.fields(TrainConfig)}


def _parse(*argv: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_teacher_first_flag_and_config_key_are_the_method(tmp_path):
    assert _parse("--teacher-first").method == "teacher-first"
    assert _parse("--teacher-first", "true", "--method", "opad").method == "teacher-first"
    assert _parse("--teacher-first", "false", "--method", "lora").method == "lora"
    config = tmp_path / "c.yaml"
    config.write_text("teacher_first: true\nteacher_first_steps: 3\nmax_steps: 10\n")
    assert (_parse("--config", str(config)).method, _parse("--config", str(config)).teacher_first_steps) == (
        "teacher-first", 3)
    assert _parse("--config", str(config), "--teacher-first", "false").method == "opad"  # the flag wins
    for argv in (["--method", "dreambooth", "--teacher-first"], ["--config", str(config), "--method", "lora"]):
        with pytest.raises(OpadError, match="^--teacher-first is --method teacher-first; it cannot be combined "
                                            "with --method (dreambooth|lora)$"):
            _parse(*argv)
    config.write_text('{"teacher_first": "yes"}')
    config = config.rename(tmp_path / "c.json")
    with pytest.raises(OpadError, match="teacher_first must be true or false"):
        _parse("--config", str(config))
    with pytest.raises(OpadError, match="--teacher-first needs the teacher"):
        _parse("--teacher-first", "--use-teacher", "false")


@pytest.mark.parametrize("method", ["teacher-first", "opad"])
def test_an_old_config_json_with_teacher_first_still_resumes(tmp_path, method):
    from opad.train.loop import Trainer

    # what the code before the split wrote: the resolved config with its teacher_first key
    stored = json.loads(TABLE.read_text())
    old = {**stored["base"], **stored["cases"][f"{method} paper | tiny"], "teacher_first": method == "teacher-first"}
    old["output_dir"] = str(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = _parse("--config", str(tmp_path / "config.json"), "--resume")  # what --resume reads (opad.train.cli)
    resolved = cfg.resolved(PRESETS["tiny"])
    assert json.loads(resolved.to_json()) == {k: v for k, v in old.items() if k not in ("teacher_first", "resume")} | {
        "resume": True}
    Trainer._check_resume_config(SimpleNamespace(cfg=resolved, out=tmp_path))  # no setting differs


if __name__ == "__main__":  # regenerate (only from a known-good tree): PYTHONPATH=. python tests/test_config_defaults.py
    _write(resolve_all())
    print(f"wrote {TABLE}", file=sys.stderr)
