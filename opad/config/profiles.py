"""``--profile {paper,release}``: two documented sets of defaults for the trainer.

``paper`` is Algorithm 1 as published, with the collaborative stage; ``release`` reproduces the
authors' public ``train_opad.py`` (github.com/liulisixin/OPAD-code, commit 0339290) point by
point. A profile only fills the fields the user left unset; every flag still overrides it.

``python -m opad.config.profiles`` prints the table that the README shows (a test keeps them equal).
"""

from __future__ import annotations

from dataclasses import dataclass

PROFILES = ("paper", "release")

# MS-SWD on [-1, 1] input (the release) is larger than on [0, 1] input by this factor: the median
# over two photos of each of the 30 DreamBench subjects at 256 px (range 1.26-2.22), measured with
# benchmarks/studies/measure_swd_range.py on 2026-11-25. The paper profile multiplies the release's weight
# 0.1 by it, so the term pulls as hard as in the authors' runs.
SWD_SIGNED_OVER_UNIT = 1.71


@dataclass(frozen=True)
class Point:
    """One behaviour that differs between the profiles."""

    field: str
    paper: object
    release: object
    what: str  # what the release does (its lines) and what paper does instead


POINTS: tuple[Point, ...] = (
    Point("collab_start", 0.75, None,
          "no collaborative stage (the release has none) | student samples join the data from 75% of the steps"),
    Point("swd_input", "unit", "signed",
          "MS-SWD fed the raw decoder output in [-1, 1] to an sRGB->Lab conversion made for [0, 1] (L2414) "
          "| MS-SWD on [0, 1] images"),
    Point("swd_weight", round(0.1 * SWD_SIGNED_OVER_UNIT, 4), 0.1,
          "MS-SWD weight 0.1 on those values, 1.71x larger (median, DreamBench) (L1029) | 0.1 x 1.71: the same pull"),
    Point("shared_noise", False, True,
          "one noise tensor for the teacher step, the student's x_T and the re-noising (L2039, L2111, L2228, L2346)"
          " | three independent draws"),
    Point("disc_real", "photos", "batch",
          "discriminators' real side is the augmented teacher batch (L2561) | the photos, flipped and resized"),
    Point("teacher_loss_channels", "mean", "sum",
          "teacher loss summed over the 4 latent channels against the 1-channel mask (L2143): 4x | mean"),
    Point("prompt_style", "custom_diffusion", "release",
          "25 templates (no 'close-up' ones when augmenting, L407/L473), scale hint inserted as the second word"
          " (L482) | Custom Diffusion's 27 templates, hint as a prefix"),
    Point("crop", "center", "stretch",
          "whole photo stretched to a square (L310) | centre crop to a square"),
    Point("sampling", "random", "epoch",
          "(photo, template) pairs shuffled once per epoch (L1732) | photo and template drawn independently"),
    Point("lpips_net", "vgg", "alex", "AlexNet LPIPS when LPIPS is on (L1880) | VGG LPIPS"),
    Point("disc_normalize", True, False,
          "backbones get raw [-1, 1] pixels (util_disc.py) | each backbone's own mean/std"),
    Point("backbone_resize", "antialias", "area",
          "discriminator inputs resized with mode='area' (util_disc.py L41/L131) | antialiased bilinear"),
    Point("id_resize", "antialias", "bilinear",
          "identity input resized bilinear without antialias (L2390) | antialiased bilinear"),
    Point("train_student_token", True, False,
          "without the shared text encoder the student's prompt embeddings stay detached, so its token never"
          " trains (L2223) | the student's loss trains its own token"),
)

_BY_FIELD = {p.field: p for p in POINTS}


def profile_defaults(profile: str) -> dict[str, object]:
    """Field name -> value for every field a profile sets."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    return {p.field: getattr(p, profile) for p in POINTS}


def describe_default(name: str) -> str | None:
    """'paper X, release Y' for a profile field (for --help), else None."""
    p = _BY_FIELD.get(name)
    return None if p is None else f"paper: {_show(p.paper)}, release: {_show(p.release)}"


def _show(value: object) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def markdown_table() -> str:
    """The README's table: flag, release value and what it does there, paper value and behaviour."""
    lines = ["| flag | `release` (train_opad.py) | `paper` |", "|---|---|---|"]
    for p in POINTS:
        release_text, _, paper_text = p.what.partition(" | ")
        flag = "--" + p.field.replace("_", "-")
        lines.append(f"| `{flag}` | `{_show(p.release)}`: {release_text} | `{_show(p.paper)}`: {paper_text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
