"""The mini world's objects: one small drawing function per class, in a unit box, with a pen that
scales, tilts, outlines and patterns every part (:data:`CLASSES`)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageChops, ImageDraw, ImageFilter

RGB = tuple[int, int, int]
Point = tuple[float, float]
SUPERSAMPLE = 4  # drawn at 4x and downsampled: anti-aliased edges without anti-aliased drawing calls
OUTLINE: RGB = (30, 28, 34)  # one dark outline for every object: its silhouette survives any background

# Fixed part colours: wheels stay black, trunks brown, whatever the object's colour.
_METAL: RGB = (150, 155, 168)
_GLASS: RGB = (170, 212, 238)
_WOOD: RGB = (120, 78, 44)
_LEAF: RGB = (60, 145, 55)
_BEAK: RGB = (250, 170, 30)
_DARK: RGB = (38, 36, 42)
WHITE: RGB = (250, 250, 250)
_HOLE: Any = (0, 0, 0, 0)  # transparent: drawing it cuts through what is already there


class Rand:
    """Uniforms, choices and coin flips from ``random.Random.random()`` alone (stable across Python versions)."""

    def __init__(self, seed: int | str | random.Random) -> None:
        self._r = seed if isinstance(seed, random.Random) else random.Random(seed)

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self._r.random()

    def below(self, n: int) -> int:
        return min(int(self._r.random() * n), n - 1)

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def chance(self, p: float) -> bool:
        return self._r.random() < p


def scale_rgb(c: RGB, f: float) -> RGB:
    return tuple(max(0, min(255, round(v * f))) for v in c)  # type: ignore[return-value]


def mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Objects: each drawn by a small function in its own unit box ([0, 1]^2, y down, facing right).

Shape = Callable[..., None]  # shape(draw, side, **ImageDraw keyword arguments)


def _ellipse(cx: float, cy: float, rx: float, ry: float | None = None) -> Shape:
    ry = rx if ry is None else ry
    return lambda d, s, **kw: d.ellipse([(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s], **kw)


def _rect(x0: float, y0: float, x1: float, y1: float, r: float = 0.0) -> Shape:
    return lambda d, s, **kw: d.rounded_rectangle([x0 * s, y0 * s, x1 * s, y1 * s], radius=r * s, **kw)


def _poly(pts: list[Point]) -> Shape:
    return lambda d, s, **kw: d.polygon([(x * s, y * s) for x, y in pts], **kw)


def _oval_pts(cx: float, cy: float, rx: float, ry: float, angle: float, n: int = 28) -> list[Point]:
    """A rotated ellipse as a polygon (PIL's ellipses are axis-aligned)."""
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        ex, ey = rx * math.cos(t), ry * math.sin(t)
        pts.append((cx + ex * ca - ey * sa, cy + ex * sa + ey * ca))
    return pts


@dataclass
class Style:
    fill: RGB  # the main colour
    accent: RGB
    two_tone: bool
    pattern: str | None
    variant: int

    def tone(self, usual: RGB) -> RGB:
        """A secondary part's colour: the accent for two-tone objects, else its usual colour."""
        return self.accent if self.two_tone else usual


class Pen:
    """Draws parts in unit coordinates onto a transparent RGBA layer of ``side`` pixels."""

    def __init__(self, side: int, style: Style) -> None:
        self.side = side
        self.style = style
        self.layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.layer)
        self.width = max(2, round(side * 0.035))  # outline: ~1 px at 64 px for a mid-sized object
        self.bodies: list[Image.Image] = []  # masks of the main-colour regions, first = the shiny one

    def part(self, shape: Shape, fill: RGB, outline: bool = True) -> None:
        shape(self.draw, self.side, fill=fill, outline=OUTLINE if outline else None, width=self.width)

    def line(self, pts: list[Point], fill: RGB, width: float, outline: bool = True) -> None:
        """A thick polyline (stems, legs, antennas), outlined by drawing it wider in OUTLINE first."""
        xy = [(x * self.side, y * self.side) for x, y in pts]
        w = max(1, round(width * self.side))
        if outline:
            self.draw.line(xy, fill=OUTLINE, width=w + 2 * self.width, joint="curve")
        self.draw.line(xy, fill=fill, width=w, joint="curve")

    def body(self, shape: Shape, fill: RGB | None = None, outline: bool = True) -> Image.Image:
        """A main-colour region: filled, patterned (stripes/dots clipped to it), then outlined."""
        shape(self.draw, self.side, fill=fill or self.style.fill)
        mask = Image.new("L", self.layer.size, 0)
        shape(ImageDraw.Draw(mask), self.side, fill=255)
        if self.style.pattern:
            self.inside(mask, _PATTERN_DRAW[self.style.pattern], self.style.accent)
        if outline:
            shape(self.draw, self.side, fill=None, outline=OUTLINE, width=self.width)
        self.bodies.append(mask)
        return mask

    def blob(self, circles: list[tuple[float, float, float]]) -> None:
        """Overlapping circles with one outline around their union (a round tree canopy)."""
        pad = self.width / self.side
        for cx, cy, r in circles:
            self.part(_ellipse(cx, cy, r + pad), OUTLINE, outline=False)

        def union(d, s, **kw):
            for cx, cy, r in circles:
                _ellipse(cx, cy, r)(d, s, **kw)

        self.body(union, outline=False)

    def inside(self, mask: Image.Image, paint: Callable[[ImageDraw.ImageDraw, int, RGB], None], colour: RGB) -> None:
        """Paint onto the layer only where ``mask`` is set (patterns, seams, highlights)."""
        overlay = Image.new("RGBA", self.layer.size, (0, 0, 0, 0))
        paint(ImageDraw.Draw(overlay), self.side, colour)
        self.layer.paste(overlay, (0, 0), ImageChops.multiply(mask, overlay.getchannel("A")))


def _stripes(d: ImageDraw.ImageDraw, s: int, c: RGB) -> None:
    for k in range(6):
        y = 0.06 + 0.19 * k
        d.rectangle([0, y * s, s, (y + 0.085) * s], fill=c)


def _dots(d: ImageDraw.ImageDraw, s: int, c: RGB) -> None:
    for row in range(6):
        for col in range(6):
            cx, cy = 0.08 + 0.19 * col + (0.095 if row % 2 else 0), 0.08 + 0.19 * row
            _ellipse(cx, cy, 0.05)(d, s, fill=c)


def _checks(d: ImageDraw.ImageDraw, s: int, c: RGB) -> None:
    for row in range(7):
        for col in range(row % 2, 7, 2):
            d.rectangle([col / 7 * s, row / 7 * s, (col + 1) / 7 * s, (row + 1) / 7 * s], fill=c)


def _zigzags(d: ImageDraw.ImageDraw, s: int, c: RGB) -> None:
    for k in range(4):
        y = 0.14 + 0.25 * k
        pts = [(x / 8 * s, (y + (0.07 if x % 2 else -0.07)) * s) for x in range(9)]
        d.line(pts, fill=c, width=max(2, round(0.07 * s)), joint="curve")


# striped and dotted appear in the world; checkered and zigzag only on the held-out concepts
_PATTERN_DRAW = {"striped": _stripes, "dotted": _dots, "checkered": _checks, "zigzag": _zigzags}


def _draw_mug(p: Pen, st: Style) -> None:
    p.part(_ellipse(0.73, 0.56, 0.2, 0.22), st.tone(st.fill))  # the handle: a ring with its hole cut out below
    p.part(_ellipse(0.73, 0.56, 0.1, 0.12), _HOLE)
    p.body(_rect(0.14, 0.2, 0.72, 0.95, 0.07))
    p.part(_ellipse(0.43, 0.2, 0.29, 0.075), scale_rgb(st.fill, 1.15))  # rim
    p.part(_ellipse(0.43, 0.205, 0.23, 0.05), (92, 56, 34), outline=False)  # coffee
    if st.variant == 1:  # steam
        for x in (0.33, 0.5):
            p.line([(x, 0.12), (x - 0.03, 0.08), (x + 0.02, 0.04), (x - 0.01, 0.0)], (235, 235, 240), 0.02, False)


def _ball_seams(d: ImageDraw.ImageDraw, s: int, c: RGB) -> None:
    w = max(2, round(s * 0.04))
    d.arc([-0.55 * s, 0.0, 0.3 * s, s], -55, 55, fill=c, width=w)
    d.arc([0.7 * s, 0.0, 1.55 * s, s], 125, 235, fill=c, width=w)


def _ball_meridians(d: ImageDraw.ImageDraw, s: int, c: RGB) -> None:
    w = max(2, round(s * 0.035))
    for rx in (0.16, 0.33):
        d.ellipse([(0.5 - rx) * s, 0.06 * s, (0.5 + rx) * s, 0.94 * s], outline=c, width=w)


def _draw_ball(p: Pen, st: Style) -> None:
    mask = p.body(_ellipse(0.5, 0.5, 0.44), outline=False)
    seam = scale_rgb(st.fill, 0.55) if sum(st.fill) > 600 else mix(st.fill, WHITE, 0.75)
    p.inside(mask, _ball_seams if st.variant == 0 else _ball_meridians, st.tone(seam))
    # a darker lower-right crescent: the ball reads as a sphere, not a disc
    shade = Image.new("L", mask.size, 0)
    _ellipse(0.5, 0.5, 0.44)(ImageDraw.Draw(shade), p.side, fill=90)
    _ellipse(0.43, 0.42, 0.42)(ImageDraw.Draw(shade), p.side, fill=0)
    shade = shade.filter(ImageFilter.GaussianBlur(p.side * 0.03))
    p.layer.paste(Image.new("RGBA", mask.size, (0, 0, 0, 255)), (0, 0), ImageChops.multiply(shade, mask))
    _ellipse(0.5, 0.5, 0.44)(p.draw, p.side, fill=None, outline=OUTLINE, width=p.width)


def _draw_robot(p: Pen, st: Style) -> None:
    limbs = st.tone(_METAL)
    arm_y = (0.18, 0.46) if st.variant == 1 else (0.45, 0.74)  # arms raised or down
    p.part(_rect(0.08, arm_y[0], 0.2, arm_y[1], 0.04), limbs)
    p.part(_rect(0.8, arm_y[0], 0.92, arm_y[1], 0.04), limbs)
    p.part(_rect(0.29, 0.78, 0.43, 0.95), limbs)  # legs and feet
    p.part(_rect(0.57, 0.78, 0.71, 0.95), limbs)
    p.part(_rect(0.25, 0.92, 0.45, 0.98, 0.02), _DARK)
    p.part(_rect(0.55, 0.92, 0.75, 0.98, 0.02), _DARK)
    p.line([(0.5, 0.14), (0.5, 0.05)], _METAL, 0.025)  # antenna
    p.part(_ellipse(0.5, 0.04, 0.04), (235, 50, 50) if st.fill[0] < 180 else (250, 220, 60))
    p.part(_rect(0.45, 0.36, 0.55, 0.44), _METAL)  # neck
    p.body(_rect(0.22, 0.42, 0.78, 0.8, 0.03))
    p.part(_rect(0.4, 0.52, 0.6, 0.64, 0.02), _DARK)  # chest panel with two lights
    p.part(_ellipse(0.45, 0.58, 0.025), (90, 230, 120), outline=False)
    p.part(_ellipse(0.55, 0.58, 0.025), (250, 90, 80), outline=False)
    p.part(_rect(0.3, 0.13, 0.7, 0.38, 0.04), st.tone(st.fill))
    for ex in (0.41, 0.59):
        p.part(_ellipse(ex, 0.245, 0.055), WHITE)
        p.part(_ellipse(ex + 0.01, 0.245, 0.025), _DARK, outline=False)
    p.part(_rect(0.42, 0.31, 0.58, 0.34), _DARK, outline=False)  # mouth


def _draw_car(p: Pen, st: Style) -> None:
    if st.variant == 0:  # saloon: a low cabin in the middle
        cabin = [(0.24, 0.5), (0.34, 0.28), (0.68, 0.28), (0.8, 0.5)]
        windows = ([(0.3, 0.48), (0.37, 0.33), (0.5, 0.33), (0.5, 0.48)],
                   [(0.54, 0.48), (0.54, 0.33), (0.66, 0.33), (0.74, 0.48)])
    else:  # van: a tall cabin reaching the back
        cabin = [(0.06, 0.5), (0.08, 0.2), (0.66, 0.2), (0.84, 0.5)]
        windows = ([(0.14, 0.46), (0.15, 0.26), (0.38, 0.26), (0.38, 0.46)],
                   [(0.44, 0.46), (0.44, 0.26), (0.63, 0.26), (0.76, 0.46)])
    p.part(_poly(cabin), st.tone(st.fill))
    for w in windows:
        p.part(_poly(w), _GLASS)
    p.body(_rect(0.03, 0.48, 0.97, 0.8, 0.08))
    p.part(_ellipse(0.92, 0.58, 0.035, 0.03), (255, 235, 120))  # headlight at the front (right)
    p.part(_ellipse(0.07, 0.58, 0.025, 0.03), (220, 40, 40))
    for wx in (0.26, 0.74):
        p.part(_ellipse(wx, 0.8, 0.125), _DARK)
        p.part(_ellipse(wx, 0.8, 0.055), (185, 185, 190))


def _draw_house(p: Pen, st: Style) -> None:
    roof = st.tone((105, 55, 45))
    if st.variant == 0:
        p.part(_rect(0.66, 0.1, 0.78, 0.36), (120, 110, 110))  # chimney
    p.body(_rect(0.16, 0.45, 0.84, 0.97))
    p.part(_poly([(0.05, 0.5), (0.5, 0.07), (0.95, 0.5)]), roof)
    p.part(_rect(0.43, 0.68, 0.58, 0.97), _WOOD)  # door
    p.part(_ellipse(0.545, 0.83, 0.012), (230, 200, 80), outline=False)
    for wx in (0.22, 0.64):
        p.part(_rect(wx, 0.56, wx + 0.14, 0.7), _GLASS)
        p.line([(wx + 0.07, 0.56), (wx + 0.07, 0.7)], WHITE, 0.015, False)
        p.line([(wx, 0.63), (wx + 0.14, 0.63)], WHITE, 0.015, False)


def _draw_tree(p: Pen, st: Style) -> None:
    p.part(_rect(0.42, 0.55, 0.58, 0.98), st.tone(_WOOD))  # two-tone: a birch
    if st.variant == 0:  # round canopy
        p.blob([(0.5, 0.3, 0.25), (0.3, 0.45, 0.19), (0.7, 0.45, 0.19), (0.5, 0.52, 0.17)])
    else:  # pointed canopy: three stacked triangles, drawn bottom up so each overlaps the one below
        for top, bottom, half in ((0.38, 0.8, 0.44), (0.2, 0.6, 0.35), (0.02, 0.38, 0.26)):
            p.body(_poly([(0.5, top), (0.5 - half, bottom), (0.5 + half, bottom)]))


def _draw_flower(p: Pen, st: Style) -> None:
    p.line([(0.5, 0.4), (0.48, 0.7), (0.5, 0.98)], _LEAF, 0.05)
    p.part(_poly(_oval_pts(0.63, 0.72, 0.14, 0.05, -30)), _LEAF)
    n = 5 if st.variant == 0 else 8
    for k in range(n):
        a = 360 * k / n - 90
        cx, cy = 0.5 + 0.19 * math.cos(math.radians(a)), 0.3 + 0.19 * math.sin(math.radians(a))
        p.body(_poly(_oval_pts(cx, cy, 0.15 if n == 5 else 0.13, 0.1 if n == 5 else 0.065, a)))
    centre = (130, 80, 30) if st.fill[0] > 200 and st.fill[1] > 120 else (245, 200, 40)
    p.part(_ellipse(0.5, 0.3, 0.085), st.tone(centre))


def _draw_bird(p: Pen, st: Style) -> None:
    p.line([(0.42, 0.7), (0.4, 0.92)], _BEAK, 0.025)  # legs
    p.line([(0.53, 0.7), (0.55, 0.92)], _BEAK, 0.025)
    second = st.tone(scale_rgb(st.fill, 0.7))
    p.part(_poly([(0.22, 0.5), (0.02, 0.38), (0.05, 0.64)]), second)  # tail
    p.body(_ellipse(0.44, 0.55, 0.29, 0.2))
    p.part(_ellipse(0.72, 0.34, 0.15), st.fill)  # head
    p.part(_poly([(0.84, 0.28), (0.99, 0.35), (0.84, 0.41)]), _BEAK)
    p.part(_ellipse(0.76, 0.3, 0.04), WHITE)
    p.part(_ellipse(0.77, 0.3, 0.02), _DARK, outline=False)
    if st.variant == 0:  # folded wing
        p.part(_poly(_oval_pts(0.4, 0.55, 0.2, 0.1, -12)), second)
    else:  # raised wing
        p.part(_poly([(0.3, 0.5), (0.22, 0.08), (0.42, 0.16), (0.56, 0.5)]), second)


@dataclass(frozen=True)
class ClassSpec:
    draw: Callable[[Pen, Style], None]
    max_tilt: float  # degrees: things standing on the ground tilt less than things that can roll or hop
    variants: int


CLASSES: dict[str, ClassSpec] = {
    "mug": ClassSpec(_draw_mug, 20, 2),
    "ball": ClassSpec(_draw_ball, 20, 2),
    "robot": ClassSpec(_draw_robot, 15, 2),
    "car": ClassSpec(_draw_car, 10, 2),
    "house": ClassSpec(_draw_house, 8, 2),
    "tree": ClassSpec(_draw_tree, 8, 2),
    "flower": ClassSpec(_draw_flower, 15, 2),
    "bird": ClassSpec(_draw_bird, 20, 2),
}
