"""The metric arithmetic: cosine similarities, pairing, prompt types and bootstrap intervals.

Scores are raw cosines in [-1, 1] (no x100, no clipping). A generated image's DINO or CLIP-I score
is its mean cosine to the subject's real images (``pairing="all"``, the default) or its cosine to
one reference image (``"single"``); CLIP-T is the cosine between the image and its prompt.
"""

from __future__ import annotations

import re

import numpy as np

from opad.evaluation.dreambench import DreamBench

PAIRINGS = ("all", "single")
MODIFIER = re.compile(r"<[^<>\s]+>")  # <new1>-style modifier tokens


def normalized(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True).clip(min=1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) cosines between the rows of ``a`` (N, D) and ``b`` (M, D)."""
    return normalized(a) @ normalized(b).T


def image_scores(generated: np.ndarray, real: np.ndarray, pairing: str = "all", reference: int = 0) -> np.ndarray:
    """Each generated row's score against the real rows: their mean cosine, or the cosine to ``reference``."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    sims = cosine(generated, real)
    return sims.mean(axis=1) if pairing == "all" else sims[:, reference]


def text_scores(images: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """Row i: the cosine between image i and prompt i."""
    return (normalized(images) * normalized(prompts)).sum(axis=1)


def strip_modifiers(prompt: str, extra: tuple[str, ...] = ()) -> str:
    """The prompt without its modifier tokens (``<new1>``, and any word in ``extra`` such as ``sks``)."""
    words = [w for w in MODIFIER.sub(" ", prompt).split() if w not in extra]
    return " ".join(words)


def prompt_type(prompt: str, bench: DreamBench | None) -> str:
    """DreamBench's prompt kinds: recontextualization, accessorization or property modification (the
    order of its lists: objects 20 + 5, live subjects 10 + 10 + 5); ``other`` for any other prompt."""
    if bench is None:
        return "other"
    for templates, kinds in ((bench.object_prompts, [("recontextualization", 20), ("property", 5)]),
                             (bench.live_prompts, [("recontextualization", 10), ("accessorization", 10),
                                                   ("property", 5)])):
        labels = [kind for kind, count in kinds for _ in range(count)]
        for template, label in zip(templates, labels):
            pattern = re.escape(template).replace(re.escape("{0}"), r"\S+").replace(re.escape("{1}"), r".+?")
            if re.fullmatch(pattern, prompt.strip()):
                return label
    return "other"


def bootstrap_interval(values: list[float], *, samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean, resampling ``values`` (one per subject) with replacement."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return (float(values.mean()), float(values.mean())) if len(values) else (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)
