"""A TrainConfig from the command line: one ``--flag`` per field, and ``--config FILE`` (JSON or YAML) for
the same fields; a flag given overrides the file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from opad.config.checks import check_type, split_list
from opad.config.defaults import describe
from opad.config.fields import TrainConfig
from opad.errors import OpadError

# Not a field: --teacher-first (flag, or "teacher_first" in a config file, as config.json held it) is
# --method teacher-first; its options are the teacher_first_* fields.
TEACHER_FIRST = "teacher_first"
_TEACHER_FIRST_HELP = ("teacher-first baseline: train the teacher alone, sample it, then train the student on those "
                       "samples with the identity loss (no discriminators, no collaborative stage); the same as "
                       "--method teacher-first (default: False)")


def _none_or(cast):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else cast(text)

    return parse


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_parser(tp) -> typing.Callable:
    args = typing.get_args(tp)
    if type(None) in args:
        return _none_or(_field_parser(next(a for a in args if a is not type(None))))
    if tp is bool:
        return _bool
    if typing.get_origin(tp) is list or tp is list:
        return split_list
    return tp


def _add_bool(parser: argparse.ArgumentParser, flag: str, dest: str, help: str) -> None:
    # --resume == --resume true
    parser.add_argument(flag, dest=dest, type=_bool, default=argparse.SUPPRESS, help=help, nargs="?", const=True,
                        metavar="BOOL")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per field; flags not given stay absent so a config file's value survives."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "teacher_first_steps":  # where the field stood, among the method's options
            _add_bool(parser, "--teacher-first", TEACHER_FIRST, _TEACHER_FIRST_HELP)
        flag, help = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (default: {describe(f)})"
        if hints[f.name] is bool:
            _add_bool(parser, flag, f.name, help)
        else:
            parser.add_argument(flag, dest=f.name, type=_field_parser(hints[f.name]), default=argparse.SUPPRESS,
                                help=help)


def read_config_file(path: str) -> dict:
    """The file's field values, type-checked (and ``teacher_first``, if it holds one)."""
    p = Path(path)
    if not p.is_file():
        raise OpadError(f"config file not found: {path!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OpadError(f"config file {path!r} could not be read: {e}") from e
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise OpadError(f"config file {path!r} could not be parsed: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise OpadError(f"config file {path!r} must hold a mapping of field names to values")
    hints = {**typing.get_type_hints(TrainConfig), TEACHER_FIRST: bool}
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise OpadError(f"config file {path!r}: unknown field(s) {', '.join(unknown)}")
    return {name: check_type(name, value, hints[name], f"config file {path!r}: ") for name, value in data.items()}


def _fold_teacher_first(values: dict) -> None:
    """``teacher_first`` true becomes ``method`` teacher-first; with another method it is an error."""
    if values.pop(TEACHER_FIRST, False):
        method = values.get("method", "opad")
        if method not in ("opad", "teacher-first"):
            raise OpadError(f"--teacher-first is --method teacher-first; it cannot be combined with "
                            f"--method {method}")
        values["method"] = "teacher-first"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """File values first (``args.config``), then every flag the user gave."""
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    for name in (*(f.name for f in dataclasses.fields(TrainConfig)), TEACHER_FIRST):
        if hasattr(args, name):
            values[name] = getattr(args, name)
    _fold_teacher_first(values)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
