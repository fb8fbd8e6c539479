"""The mini world's contexts: one small function per context painting the whole background
(:data:`CONTEXTS`), each from its own seed."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import ImageDraw

from opad.world.render.objects import RGB, Rand, mix

# ---------------------------------------------------------------------------------------------
# Contexts: each a small function painting the whole background (side S pixels) from its own seed.


def _vgradient(d: ImageDraw.ImageDraw, s: int, y0: float, y1: float, top: RGB, bottom: RGB) -> None:
    a, b = round(y0 * s), max(round(y0 * s) + 1, round(y1 * s))
    for y in range(a, b):
        d.line([(0, y), (s, y)], fill=mix(top, bottom, (y - a) / max(1, b - a - 1)))


def _dot(d: ImageDraw.ImageDraw, x: float, y: float, r: float, fill: RGB) -> None:
    d.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _bg_beach(d: ImageDraw.ImageDraw, s: int, r: Rand) -> None:
    h = r.uniform(0.36, 0.46)
    _vgradient(d, s, 0, h, (95, 175, 240), (180, 220, 248))
    _dot(d, r.uniform(0.1, 0.9) * s, r.uniform(0.06, 0.16) * s, 0.07 * s, (255, 240, 140))  # sun
    sea = h + r.uniform(0.1, 0.14)
    _vgradient(d, s, h, sea, (25, 110, 185), (60, 160, 205))
    for _ in range(5):  # wave crests
        x, y = r.uniform(0, 1) * s, r.uniform(h + 0.02, sea - 0.02) * s
        d.line([(x, y), (x + 0.12 * s, y)], fill=(220, 240, 250), width=max(1, s // 90))
    _vgradient(d, s, sea, 1, (240, 222, 170), (225, 198, 140))
    d.rectangle([0, sea * s, s, (sea + 0.02) * s], fill=(250, 245, 230))  # foam line
    for _ in range(60):
        _dot(d, r.uniform(0, 1) * s, r.uniform(sea + 0.03, 1) * s, s / 200, (200, 170, 115))


def _bg_snow(d: ImageDraw.ImageDraw, s: int, r: Rand) -> None:
    h = r.uniform(0.42, 0.52)
    _vgradient(d, s, 0, h, (170, 185, 205), (215, 222, 232))
    hill = [(0, h * s)] + [(x * s, (h - 0.08 * math.sin(math.pi * x * r.uniform(0.8, 1.6)) ** 2) * s)
                           for x in (0.2, 0.4, 0.6, 0.8, 1.0)] + [(s, s), (0, s)]
    d.polygon(hill, fill=(236, 240, 248))
    d.rectangle([0, (h + 0.05) * s, s, s], fill=(250, 251, 254))
    for _ in range(4):  # blue-grey drift shadows
        x, y = r.uniform(0, 1) * s, r.uniform(h + 0.1, 0.95) * s
        d.ellipse([x - 0.18 * s, y - 0.025 * s, x + 0.18 * s, y + 0.025 * s], fill=(218, 228, 242))
    for _ in range(int(r.uniform(25, 45))):
        _dot(d, r.uniform(0, 1) * s, r.uniform(0, 1) * s, r.uniform(0.006, 0.012) * s, (255, 255, 255))


def _bg_grass(d: ImageDraw.ImageDraw, s: int, r: Rand) -> None:
    h = r.uniform(0.4, 0.5)
    _vgradient(d, s, 0, h, (70, 150, 230), (165, 210, 245))
    for _ in range(int(r.uniform(1, 3.99))):  # clouds
        x, y = r.uniform(0.1, 0.9) * s, r.uniform(0.08, h - 0.12) * s
        for dx, dy, rad in ((0, 0, 0.06), (0.06, 0.01, 0.05), (-0.06, 0.015, 0.045)):
            _dot(d, x + dx * s, y + dy * s, rad * s, (248, 250, 252))
    _vgradient(d, s, h, 1, (95, 175, 70), (50, 130, 40))
    for _ in range(220):  # blades
        x, y = r.uniform(0, 1) * s, r.uniform(h + 0.01, 1.02) * s
        c = (40, 115, 35) if r.chance(0.5) else (130, 200, 90)
        tip = (x + r.uniform(-0.01, 0.01) * s, y - r.uniform(0.02, 0.045) * s)
        d.line([(x, y), tip], fill=c, width=max(1, s // 128))


def _bg_city(d: ImageDraw.ImageDraw, s: int, r: Rand) -> None:
    g = r.uniform(0.6, 0.7)  # the street's far edge
    _vgradient(d, s, 0, g, (150, 165, 185), (200, 200, 205))
    x = -r.uniform(0, 0.1)
    while x < 1:  # a row of buildings with lit windows
        w, top = r.uniform(0.14, 0.26), r.uniform(0.08, 0.42)
        grey = round(r.uniform(85, 135))
        d.rectangle([x * s, top * s, (x + w) * s, g * s], fill=(grey, grey, grey + 8))
        lit = (235, 220, 150) if r.chance(0.5) else (185, 200, 220)
        for wy in np.arange(top + 0.04, g - 0.06, 0.08):
            for wx in np.arange(x + 0.03, x + w - 0.04, 0.06):
                d.rectangle([wx * s, wy * s, (wx + 0.03) * s, (wy + 0.04) * s], fill=lit)
        x += w + r.uniform(0, 0.02)
    d.rectangle([0, g * s, s, (g + 0.05) * s], fill=(165, 165, 168))  # pavement
    d.rectangle([0, (g + 0.05) * s, s, s], fill=(70, 70, 76))  # road
    lane = (g + 0.05 + 1) / 2
    for k in range(6):
        d.rectangle([(k / 5 - 0.06) * s, (lane - 0.008) * s, (k / 5 + 0.04) * s, (lane + 0.008) * s],
                    fill=(235, 235, 235))


def _bg_indoors(d: ImageDraw.ImageDraw, s: int, r: Rand) -> None:
    t = r.uniform(0.55, 0.65)  # the table's back edge
    wall = mix((230, 208, 175), (215, 190, 160), r.uniform(0, 1))
    d.rectangle([0, 0, s, t * s], fill=wall)
    fx, fy, fw, fh = r.uniform(0.08, 0.6), r.uniform(0.08, 0.18), r.uniform(0.2, 0.3), r.uniform(0.16, 0.24)
    d.rectangle([fx * s, fy * s, (fx + fw) * s, (fy + fh) * s], fill=(95, 60, 35))  # a picture on the wall
    d.rectangle([(fx + 0.02) * s, (fy + 0.02) * s, (fx + fw - 0.02) * s, (fy + fh - 0.02) * s],
                fill=mix((120, 170, 200), (200, 120, 90), r.uniform(0, 1)))
    _vgradient(d, s, t, 0.9, (175, 118, 72), (150, 98, 58))  # table top
    for _ in range(8):  # wood grain
        y = r.uniform(t + 0.02, 0.88) * s
        x0, x1 = r.uniform(-0.2, 0.5) * s, r.uniform(0.5, 1.2) * s
        d.line([(x0, y), (x1, y)], fill=(140, 92, 55), width=max(1, s // 128))
    d.rectangle([0, 0.9 * s, s, s], fill=(105, 66, 38))  # the table's front edge
    d.line([(0, 0.9 * s), (s, 0.9 * s)], fill=(190, 135, 90), width=max(1, s // 100))


def _bg_night(d: ImageDraw.ImageDraw, s: int, r: Rand) -> None:
    h = r.uniform(0.5, 0.62)
    _vgradient(d, s, 0, h, (8, 12, 40), (35, 42, 95))
    for _ in range(int(r.uniform(30, 50))):
        _dot(d, r.uniform(0, 1) * s, r.uniform(0, h - 0.03) * s, r.uniform(0.004, 0.009) * s, (255, 250, 220))
    mx, my, mr = r.uniform(0.12, 0.88) * s, r.uniform(0.1, 0.22) * s, 0.075 * s
    _dot(d, mx, my, mr, (245, 240, 195))  # a crescent moon: a disc with the sky drawn over one side
    _dot(d, mx + 0.4 * mr, my - 0.2 * mr, mr * 0.85, (12, 17, 50))
    hill = [(0, h * s)] + [(x * s, (h - r.uniform(0.0, 0.06)) * s) for x in (0.25, 0.5, 0.75, 1.0)] + [(s, s), (0, s)]
    d.polygon(hill, fill=(34, 44, 68))
    d.rectangle([0, (h + 0.08) * s, s, s], fill=(28, 36, 58))


@dataclass(frozen=True)
class ContextSpec:
    phrase: str  # the caption's ending
    draw: Callable[[ImageDraw.ImageDraw, int, Rand], None]
    object_tint: RGB = (255, 255, 255)  # multiplied into the object: things look darker and bluer at night


CONTEXTS: dict[str, ContextSpec] = {
    "beach": ContextSpec("on the beach", _bg_beach),
    "snow": ContextSpec("in the snow", _bg_snow),
    "grass": ContextSpec("on the grass", _bg_grass),
    "city": ContextSpec("in the city", _bg_city),
    "indoors": ContextSpec("indoors", _bg_indoors),
    "night": ContextSpec("at night", _bg_night, object_tint=(215, 220, 245)),
}
