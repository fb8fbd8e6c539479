"""The documentation: the mkdocs site builds in strict mode (every link and image resolves), and every
page is runnable: each opad command a fenced ``bash`` block of README.md or docs/*.md shows names a
program that exists, and every ``--flag`` it shows is one that program's ``--help`` lists.

The ``--help`` runs share one subprocess (``python tests/test_docs.py OUT.json PROGRAM...``): each
program is run the way its command line runs it (``runpy``, ``sys.argv``, the script's folder first on
``sys.path``), but torch and the rest are imported once, not once per program.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Commands in the pages that are not opad's programs, so nothing is checked: the set-up and test
# lines (virtualenv, pip, activate, pytest) and shell helpers. A first word outside this list and
# outside opad's programs fails the test, so a new kind of command is seen, not silently skipped.
NOT_OPAD = {
    "pip": "set-up: installs packages",
    ".": "set-up: activates the virtualenv",
    "source": "set-up: activates the virtualenv",
    "mkdir": "shell: makes the concepts folder",
    "cp": "shell: copies a concept",
    "python -m venv": "set-up: makes the virtualenv",
    "python -m pytest": "the test runner",
    "apt-get": "set-up: installs the system's Chromium for the live page's browser test",
    "ray": "Ray's own command line: starts and stops the cluster opad jobs --ray runs on",
}
# A segment holding one of these is a template, not a command line: it is skipped (none is now).
PLACEHOLDERS = ("...", "<command>")

PYTHON = re.compile(r"(^|/)python(\d+(\.\d+)?)?$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SCRIPT_DIRS = ("export/", "benchmarks/")


def bash_blocks(text: str) -> list[str]:
    """The bodies of the page's fenced blocks opened with ```bash."""
    return re.findall(r"^```bash[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def command_segments(line: str) -> list[list[str]]:
    """Each simple command of one line, as words: comments dropped, split at ``&&``, ``||``, ``;``,
    ``|`` and ``&``."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segments, words = [], []
    for word in lexer:
        if set(word) <= set("&|;()<>"):
            segments.append(words)
            words = []
        else:
            words.append(word)
    segments.append(words)
    return [w for w in segments if w]


def block_commands(block: str) -> list[list[str]]:
    """Every simple command of a block, continuation lines joined."""
    return [seg for line in block.replace("\\\n", " ").splitlines() for seg in command_segments(line)]


def program_of(words: list[str]) -> tuple[str | None, list[str]]:
    """``(program, flags)`` for one command: the program as the ``--help`` driver names it (``-m MOD``,
    a script path, or ``opad SUB...``), or None where it is not one of opad's (``NOT_OPAD``)."""
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]  # CUDA_VISIBLE_DEVICES=0 python ...
    flags = sorted({w.split("=", 1)[0] for w in words if w.startswith("--") and len(w) > 2})
    first = words[0]
    if PYTHON.search(first):
        if len(words) > 2 and words[1] == "-m":
            if words[2].startswith("opad"):
                return f"-m {words[2]}", flags
            key = f"python -m {words[2]}"
        elif len(words) > 1 and words[1].startswith(SCRIPT_DIRS) and words[1].endswith(".py"):
            return words[1], flags
        else:
            key = f"python {words[1] if len(words) > 1 else ''}".strip()
    elif first == "opad":
        sub = words[1:3] if words[1:2] == ["export"] else words[1:2]
        return " ".join(["opad", *sub]), flags
    else:
        key = first
    assert key in NOT_OPAD, f"a page shows `{' '.join(words)}`: neither opad's program nor in NOT_OPAD"
    return None, flags


def page_commands(page: Path) -> list[tuple[str, str, list[str]]]:
    """``(command line, program, flags)`` for every opad command the page's bash blocks show."""
    found = []
    for block in bash_blocks(page.read_text()):
        for words in block_commands(block):
            if any(p in w for w in words for p in PLACEHOLDERS):
                continue
            program, flags = program_of(words)
            if program is not None:
                found.append((" ".join(words), program, flags))
    return found


@functools.cache
def help_texts() -> dict[str, dict]:
    """``{program: {"rc", "text"}}`` for every program the pages show, from one driver process."""
    programs = sorted({program for page in PAGES for _, program, _ in page_commands(page)})
    with tempfile.TemporaryDirectory() as tmp:  # not tmp_path: the cache outlives one test
        out = Path(tmp) / "help.json"
        run = subprocess.run([sys.executable, __file__, str(out), *programs], cwd=REPO, capture_output=True,
                             text=True, timeout=600, env=_env())
        assert out.exists(), f"the --help driver failed (exit {run.returncode}):\n{run.stderr[-4000:]}"
        return json.loads(out.read_text())


def _env() -> dict:
    # the repository's opad first, as `python -m` from the root has it (scripts get their own folder first)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def _run_help(program: str) -> tuple[int, str]:
    """Run ``program --help`` in this process, as its command line would; its exit code and output."""
    import contextlib
    import io
    import runpy

    buf = io.StringIO()
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    rc = 0
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            if program.startswith("-m "):
                module = program[3:]
                sys.argv = [module, "--help"]
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            elif program.startswith("opad"):
                from opad.cli import main

                sys.argv = ["opad", *program.split()[1:], "--help"]
                rc = main(sys.argv[1:]) or 0
            else:
                path = REPO / program
                if not path.is_file():
                    return 1, f"no such script: {program}"
                sys.argv = [str(path), "--help"]
                sys.path.insert(0, str(path.parent))
                runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001 - any failure is the answer for this program
        rc, buf = 1, io.StringIO(buf.getvalue() + f"\n{type(e).__name__}: {e}")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return rc, buf.getvalue()


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        raise AssertionError('mkdocs-material is not installed: pip install -e ".[docs]" (CI installs it)')
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))  # material's end-of-life banner
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"


def test_pages_show_commands():
    """The parser finds the commands (a parser that found none would pass everything below)."""
    shown = {program for page in PAGES for _, program, _ in page_commands(page)}
    assert {"-m opad.train", "-m opad.generate", "export/serve.py", "export/export_onnx.py"} <= shown


def test_every_shown_command_works_as_shown():
    helps = help_texts()
    problems = []
    for page in PAGES:
        for line, program, flags in page_commands(page):
            rc, text = helps[program]["rc"], helps[program]["text"]
            if rc != 0:
                problems.append(f"{page.name}: `{line}`: `{program} --help` exits {rc}: {text.strip()[-300:]}")
                continue
            missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
            if missing:
                problems.append(f"{page.name}: `{line}`: {', '.join(missing)} not in `{program} --help`")
    assert not problems, "\n".join(problems)


if __name__ == "__main__":  # the --help driver: python tests/test_docs.py OUT.json PROGRAM...
    sys.path[0] = str(REPO)
    results = {}
    for name in sys.argv[2:]:
        code, text = _run_help(name)
        results[name] = {"rc": code, "text": text}
    Path(sys.argv[1]).write_text(json.dumps(results))
