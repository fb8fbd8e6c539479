"""Procedurally drawn 64x64 scenes with captions, the images of the mini world (drawn to a folder by
``python -m opad.world.scenes``).

A scene is one object (:data:`CLASSES`: mug, ball, robot, car, house, tree, flower, bird) of a named
colour (:data:`COLOURS`), optionally with attributes (:data:`ATTRIBUTES`: shiny, striped, dotted,
two-tone), in one of the contexts DreamBench's prompts use (:data:`CONTEXTS`: beach, snow, grass,
city, indoors, night), with a caption such as "a photo of a shiny red mug on the beach".

Everything is a pure function of a :class:`Scene` (and a scene of a seed), so the world is the same
on every machine: randomness comes only from ``random.Random(...).random()``, the one stream Python
promises to keep across versions, never from global state. Drawing is PIL polygons and ellipses at
4x the output size, downsampled with LANCZOS for anti-aliasing. Objects get a dark outline and
contexts distinct palettes so that both stay recognisable after a small VAE blurs them.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps

from opad.errors import OpadError
from opad.world.render.contexts import CONTEXTS
from opad.world.render.objects import CLASSES, RGB, SUPERSAMPLE, WHITE, Pen, Rand, Style

COLOURS: dict[str, RGB] = {
    "red": (210, 40, 40),
    "orange": (240, 135, 25),
    "yellow": (245, 210, 40),
    "green": (45, 165, 70),
    "blue": (40, 90, 215),
    "purple": (135, 60, 185),
    "pink": (240, 125, 180),
    "white": (245, 245, 245),
}

ATTRIBUTES: dict[str, str] = {
    "shiny": "a specular highlight on the main body",
    "striped": "stripes of the accent colour on the main body",
    "dotted": "dots of the accent colour on the main body",
    "two-tone": "secondary parts (robot head and limbs, car cabin, house roof, mug handle, ...) in the accent colour",
}
# Patterns no world scene has: only the held-out concepts wear them (opad.world.render.concepts), so a concept
# is an instance the pretrained models have never seen. sample_scene never draws them.
CONCEPT_ATTRIBUTES: dict[str, str] = {
    "checkered": "a checkerboard of the accent colour on the main body",
    "zigzag": "zigzag bands of the accent colour on the main body",
}
PATTERNS = ("striped", "dotted", "checkered", "zigzag")
_PATTERN_NOUN = {"striped": "stripes", "dotted": "dots", "checkered": "checks", "zigzag": "zigzags"}

@dataclass(frozen=True)
class Scene:
    """Everything an image depends on. Positions and sizes are fractions of the image side."""

    category: str  # a key of CLASSES
    context: str  # a key of CONTEXTS
    colour: str  # a key of COLOURS: the object's main colour (and the caption's)
    rgb: RGB | None = None  # the main colour as drawn (jittered); None: exactly COLOURS[colour]
    attributes: tuple[str, ...] = ()  # keys of ATTRIBUTES
    accent: str = "white"  # a key of COLOURS: stripes, dots and the second tone
    scale: float = 0.55  # side of the object's box / image side
    x: float = 0.5  # centre of the object's box
    y: float = 0.65
    rotation: float = 0.0  # degrees, counter-clockwise
    flip: bool = False  # mirrored left-right (birds and cars face left)
    variant: int = 0  # per-class shape variant (round or pointed tree, folded or raised wing, ...)
    seed: int = 0  # background details: stars, windows, grass blades, clouds

    def __post_init__(self) -> None:
        for value, table, what in ((self.category, CLASSES, "class"), (self.context, CONTEXTS, "context"),
                                   (self.colour, COLOURS, "colour"), (self.accent, COLOURS, "accent colour")):
            if value not in table:
                raise OpadError(f"unknown {what} {value!r}; known: {', '.join(table)}")
        for a in self.attributes:
            if a not in ATTRIBUTES and a not in CONCEPT_ATTRIBUTES:
                raise OpadError(f"unknown attribute {a!r}; known: {', '.join([*ATTRIBUTES, *CONCEPT_ATTRIBUTES])}")
        if sum(a in PATTERNS for a in self.attributes) > 1:
            raise OpadError(f"a scene has at most one pattern, got {self.attributes}")
        if not 0.05 <= self.scale <= 1.0:
            raise OpadError(f"scale must be in 0.05..1, got {self.scale}")
        if not 0 <= self.variant < CLASSES[self.category].variants:
            last = CLASSES[self.category].variants - 1
            raise OpadError(f"{self.category} has variants 0..{last}, got {self.variant}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        """The inverse of :meth:`to_dict` (JSON turns tuples into lists)."""
        d = dict(d)
        d["attributes"] = tuple(d.get("attributes", ()))
        if d.get("rgb") is not None:
            d["rgb"] = tuple(d["rgb"])
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Scenes, captions, rendering.


def caption(scene: Scene) -> str:
    """"a photo of a shiny red mug with white stripes on the beach"."""
    words = ["shiny"] if "shiny" in scene.attributes else []
    words.append(f"{scene.colour} and {scene.accent}" if "two-tone" in scene.attributes else scene.colour)
    words.append(scene.category)
    words += [f"with {scene.accent} {_PATTERN_NOUN[a]}" for a in scene.attributes if a in PATTERNS]
    article = "an" if words[0][0] in "aeiou" else "a"
    return f"a photo of {article} {' '.join(words)} {CONTEXTS[scene.context].phrase}"


def _far_colours(colour: str) -> list[str]:
    """Accent colours that stand out from ``colour`` (no yellow dots on an orange ball)."""
    c = np.array(COLOURS[colour])
    return [k for k, v in COLOURS.items() if np.abs(np.array(v) - c).sum() > 220]


def sample_scene(rng: random.Random) -> Scene:
    """A random scene: class, context and colour uniform; size, place, tilt, flip and colour jittered."""
    r = Rand(rng)
    category, context, colour = r.choice(list(CLASSES)), r.choice(list(CONTEXTS)), r.choice(list(COLOURS))
    rgb = tuple(max(0, min(255, round(v + r.uniform(-14, 14)))) for v in COLOURS[colour])
    attributes: list[str] = []
    if r.chance(0.2):
        attributes.append("shiny")
    style = r.uniform(0, 1)  # at most one of: a pattern, two tones
    if style < 0.1:
        attributes.append("striped")
    elif style < 0.2:
        attributes.append("dotted")
    elif style < 0.28:
        attributes.append("two-tone")
    accent = r.choice(_far_colours(colour))
    pose = _pose(r, category)
    return Scene(category=category, context=context, colour=colour, rgb=rgb, attributes=tuple(attributes),  # type: ignore[arg-type]
                 accent=accent, **pose, variant=r.below(CLASSES[category].variants), seed=r.below(2**31))


def _pose(r: Rand, category: str) -> dict[str, Any]:
    """Size, place, tilt and facing of an object of ``category`` (the draws' order is the world's: keep it)."""
    spec = CLASSES[category]
    scale = r.uniform(0.35, 0.7)
    rotation = r.uniform(-spec.max_tilt, spec.max_tilt)
    a = math.radians(abs(rotation))
    half = scale / 2 * (math.cos(a) + math.sin(a))  # half the side of the tilted box: it stays inside the image
    x = 0.5 + r.uniform(-1, 1) * max(0.0, 0.5 - half)
    bottom = r.uniform(max(0.8, 2 * half), 1.0)  # standing on the ground, below every horizon
    return dict(scale=round(scale, 4), x=round(x, 4), y=round(bottom - half, 4), rotation=round(rotation, 2),
                flip=r.chance(0.5))


def repose(scene: Scene, rng: random.Random, context: str | None = None) -> Scene:
    """The same object (class, colours, pattern, shape variant) in a new pose, background and context
    (``context``, or one drawn): another photo of the same instance."""
    r = Rand(rng)
    context = context or r.choice(list(CONTEXTS))
    return dataclasses.replace(scene, context=context, **_pose(r, scene.category), seed=r.below(2**31))


def _style(scene: Scene) -> Style:
    fill = scene.rgb or COLOURS[scene.colour]
    pattern = next((a for a in scene.attributes if a in PATTERNS), None)
    return Style(fill=fill, accent=COLOURS[scene.accent], two_tone="two-tone" in scene.attributes, pattern=pattern,
                  variant=scene.variant)


def _shine(p: Pen) -> None:
    """A soft white highlight at the upper left of the main body, and a small hard glint in it."""
    mask = p.bodies[0]
    x0, y0, x1, y1 = mask.getbbox() or (0, 0, p.side, p.side)
    w, h = x1 - x0, y1 - y0
    hl = Image.new("L", mask.size, 0)
    hd = ImageDraw.Draw(hl)
    cx, cy = x0 + 0.3 * w, y0 + 0.28 * h
    hd.ellipse([cx - 0.16 * w, cy - 0.1 * h, cx + 0.16 * w, cy + 0.1 * h], fill=190)
    hl = hl.filter(ImageFilter.GaussianBlur(max(1, 0.03 * p.side)))
    hd = ImageDraw.Draw(hl)
    hd.ellipse([cx - 0.05 * w, cy - 0.04 * h, cx + 0.05 * w, cy + 0.04 * h], fill=255)
    p.layer.paste(Image.new("RGBA", mask.size, (*WHITE, 255)), (0, 0), ImageChops.multiply(hl, mask))


def _layers(scene: Scene, size: int) -> tuple[Image.Image, Image.Image]:
    """The background (RGB) and the placed object (RGBA, transparent elsewhere), both at SUPERSAMPLE x size."""
    s = size * SUPERSAMPLE
    background = Image.new("RGB", (s, s))
    CONTEXTS[scene.context].draw(ImageDraw.Draw(background), s, Rand(scene.seed))

    pen = Pen(max(8, round(scene.scale * s)), _style(scene))
    CLASSES[scene.category].draw(pen, pen.style)
    if "shiny" in scene.attributes:
        _shine(pen)
    obj = pen.layer
    tint = CONTEXTS[scene.context].object_tint
    if tint != (255, 255, 255):
        obj = ImageChops.multiply(obj, Image.new("RGBA", obj.size, (*tint, 255)))
    if scene.flip:
        obj = ImageOps.mirror(obj)
    if scene.rotation:
        obj = obj.rotate(scene.rotation, resample=Image.Resampling.BICUBIC, expand=True)
    placed = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    placed.paste(obj, (round(scene.x * s - obj.width / 2), round(scene.y * s - obj.height / 2)))
    return background, placed


def _add_shadow(canvas: Image.Image, placed: Image.Image) -> None:
    """A soft dark ellipse under the object's lowest point: it stands on the ground rather than floating."""
    box = placed.getchannel("A").getbbox()
    if not box:
        return
    x0, _, x1, y1 = box
    rx, ry, blur = 0.42 * (x1 - x0), 0.025 * canvas.height, 0.01 * canvas.height
    pad = round(ry + 3 * blur)
    patch = Image.new("RGBA", (round(2 * rx) + 2 * pad, 2 * pad), (0, 0, 0, 0))  # blurred alone: 3x faster
    ImageDraw.Draw(patch).ellipse([pad, pad - ry, pad + 2 * rx, pad + ry], fill=(0, 0, 0, 80))
    patch = patch.filter(ImageFilter.GaussianBlur(blur))
    left, top = round((x0 + x1) / 2 - rx) - pad, round(y1) - pad
    canvas.alpha_composite(patch, (max(0, left), max(0, top)), (max(0, -left), max(0, -top)))


def render_with_mask(scene: Scene, size: int = 64) -> tuple[Image.Image, np.ndarray]:
    """:func:`render`'s image and where the object covers at least half of a pixel (bool, size x size)."""
    background, placed = _layers(scene, size)
    canvas = background.convert("RGBA")
    _add_shadow(canvas, placed)
    canvas.alpha_composite(placed)
    image = canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    alpha = placed.getchannel("A").resize((size, size), Image.Resampling.LANCZOS)
    return image, np.asarray(alpha) >= 128


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image."""
    return render_with_mask(scene, size)[0]


def object_mask(scene: Scene, size: int = 64) -> np.ndarray:
    """Where the object covers at least half of a pixel of :func:`render`'s image (bool, size x size)."""
    return render_with_mask(scene, size)[1]


def world_scenes(n: int, seed: int) -> list[Scene]:
    """The first ``n`` scenes of the world ``seed``; scene i depends only on (seed, i), not on n."""
    return [sample_scene(random.Random(f"opad-world:{seed}:{i}")) for i in range(n)]


def iter_world(n: int, seed: int, size: int = 64) -> Iterator[tuple[Image.Image, str, Scene]]:
    """(image, caption, scene) for the first ``n`` scenes of the world ``seed``, rendered one at a time."""
    for scene in world_scenes(n, seed):
        yield render(scene, size), caption(scene), scene


def world_dataset(n: int, seed: int, size: int = 64) -> list[tuple[Image.Image, str, Scene]]:
    """:func:`iter_world` as a list."""
    return list(iter_world(n, seed, size))


def grid(images: list[Image.Image], columns: int | None = None, gap: int = 2) -> Image.Image:
    """The images in rows of ``columns`` (default: a square), on a dark grey ground."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * (w + gap) + gap, rows * (h + gap) + gap), (40, 40, 40))
    for i, im in enumerate(images):
        sheet.paste(im, (gap + (i % columns) * (w + gap), gap + (i // columns) * (h + gap)))
    return sheet
