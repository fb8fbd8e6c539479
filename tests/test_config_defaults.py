"""Where the trainer's defaults come from: ``resolved()`` for every method x profile x preset, against a table
written by the code before the config split (tests/data/resolved_configs.json), and ``--help`` quoting the tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from opad.config import METHODS, config_from_args
from opad.config.profiles import PROFILES
from opad.presets import PRESETS
from opad.train.cli import build_parser

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


if __name__ == "__main__":  # regenerate (only from a known-good tree): PYTHONPATH=. python tests/test_config_defaults.py
    _write(resolve_all())
    print(f"wrote {TABLE}", file=sys.stderr)
