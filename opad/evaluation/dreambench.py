"""The DreamBench (DreamBooth dataset) prompt lists and subject classes, read from its text file."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from opad.errors import OpadError

_PROMPT = re.compile(r"^'(.*)'\.format\(unique_token, class_token\),?$")


@dataclass
class DreamBench:
    classes: dict[str, str]  # subject folder -> class word
    object_prompts: list[str]  # templates with {0} = unique token, {1} = class word
    live_prompts: list[str]
    live_subjects: frozenset[str] = frozenset({"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"})

    def prompts_for(self, subject: str, token: str) -> list[str]:
        templates = self.live_prompts if subject in self.live_subjects else self.object_prompts
        return [t.format(token, self.classes[subject]) for t in templates]


def read_dreambench(path: str | os.PathLike) -> DreamBench:
    """Parse ``prompts_and_classes.txt`` from the DreamBooth dataset."""
    path = Path(path)
    if not path.is_file():
        raise OpadError(f"DreamBench prompt file not found: {str(path)!r}")
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("Object Prompts"):
            current = "object"
        elif line.startswith("Live Subject Prompts"):
            current = "live"
        elif current and (m := _PROMPT.match(line)):
            lists[current].append(m.group(1))
        elif current is None and line.count(",") == 1 and line != "subject_name,class":
            subject, cls = line.split(",")
            classes[subject] = cls
    if len(lists["object"]) != 25 or len(lists["live"]) != 25 or not classes:
        raise OpadError(f"{path} does not look like DreamBench's prompts_and_classes.txt")
    return DreamBench(classes, lists["object"], lists["live"])
