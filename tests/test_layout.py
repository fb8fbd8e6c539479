"""The README's layout tree matches the repository: every folder it names exists, and every top-level
folder and every subpackage of opad/ and export/ is named in it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tree() -> dict[str, set[str]]:
    """{top-level folder: the sub-folders listed under it}, from the README's "Layout" block."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Layout\s*\n+```\n(.*?)```", text, re.S)
    assert block, "README.md has no fenced block under '## Layout'"
    tree: dict[str, set[str]] = {}
    top = None
    for line in block.group(1).splitlines():
        # "name/ other/   what they hold": the names are the words before the first run of 2+ spaces
        names = [w.rstrip("/") for w in re.split(r"\s{2,}", line.strip())[0].split() if w.endswith("/")]
        if not line.startswith(" "):
            top = names[0] if names else None
            if top:
                tree[top] = set()
        elif top:
            tree[top].update(names)
    return tree


def _tracked_dirs() -> set[str]:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return {str(Path(f).parent) for f in files if "/" in f}


def _packages(folder: str) -> set[str]:
    return {p.parent.name for p in (REPO / folder).glob("*/__init__.py")}


def test_every_folder_in_the_tree_exists():
    for top, subs in _tree().items():
        assert (REPO / top).is_dir(), f"README layout names {top}/, which does not exist"
        for sub in subs:
            assert (REPO / top / sub).is_dir(), f"README layout names {top}/{sub}/, which does not exist"


def test_every_top_level_folder_and_subpackage_is_in_the_tree():
    tree = _tree()
    tops = {d.split("/")[0] for d in _tracked_dirs() if not d.startswith(".")}
    assert tops == set(tree), f"top-level folders {sorted(tops)} vs the README's tree {sorted(tree)}"
    for folder in ("opad", "export"):
        assert _packages(folder) == tree[folder], (
            f"{folder}/'s subpackages {sorted(_packages(folder))} vs the README's tree {sorted(tree[folder])}")
