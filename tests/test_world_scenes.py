"""The mini world's scene generator: deterministic, covering every class and context, captions that
match the scene, and classes and contexts that differ where a classifier would look."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from opad.errors import OpadError
from opad.world.render.scenes import (
    ATTRIBUTES,
    CLASSES,
    COLOURS,
    CONTEXTS,
    Scene,
    caption,
    object_mask,
    render,
    render_with_mask,
    sample_scene,
    world_dataset,
    world_scenes,
)
from opad.world.scenes import main


def test_sizes_of_the_world():
    assert len(CLASSES) >= 8 and len(COLOURS) >= 6
    assert {"beach", "snow", "grass", "city", "indoors", "night"} <= set(CONTEXTS)
    assert {"shiny", "striped", "dotted"} <= set(ATTRIBUTES)


def test_same_seed_same_bytes_and_scene_i_depends_only_on_seed_and_i():
    a, b = world_dataset(5, seed=3), world_dataset(5, seed=3)
    assert [im.tobytes() for im, _, _ in a] == [im.tobytes() for im, _, _ in b]
    assert [(c, s) for _, c, s in a] == [(c, s) for _, c, s in b]
    other = world_dataset(5, seed=4)
    assert all(x[0].tobytes() != y[0].tobytes() for x, y in zip(a, other))
    assert world_scenes(8, 3)[:5] == [s for _, _, s in a]


def test_world_is_the_same_on_every_machine():
    # Only random.Random(str).random() feeds the sampler (a stream Python keeps across versions and
    # platforms): these are the first scenes of world 0. A change here changes every world.
    scenes = world_scenes(3, 0)
    assert [caption(s) for s in scenes] == ["a photo of a pink mug indoors", "a photo of an orange tree in the city",
                                            "a photo of a red flower in the city"]
    assert [s.seed for s in scenes] == [572915688, 1426427996, 1086235491]


def test_every_class_context_colour_attribute_and_variant_appears():
    scenes = world_scenes(600, 0)
    for field, table, least in (("category", CLASSES, 50), ("context", CONTEXTS, 60), ("colour", COLOURS, 50)):
        counts = Counter(getattr(s, field) for s in scenes)
        assert set(counts) == set(table) and min(counts.values()) >= least, (field, counts)
    assert set(ATTRIBUTES) == {a for s in scenes for a in s.attributes}
    variants = {(c, v) for c, spec in CLASSES.items() for v in range(spec.variants)}
    assert {(s.category, s.variant) for s in scenes} == variants
    for s in scenes:  # bounded variation
        assert 0.35 <= s.scale <= 0.7 and abs(s.rotation) <= CLASSES[s.category].max_tilt
        assert 0 < s.x < 1 and 0 < s.y < 1 and s.accent != s.colour
        assert all(abs(v - w) <= 14 for v, w in zip(s.rgb, COLOURS[s.colour]))
    assert len({s.flip for s in scenes}) == 2 and len({s.seed for s in scenes}) == len(scenes)


def test_captions():
    assert caption(Scene("mug", "beach", "red")) == "a photo of a red mug on the beach"
    assert caption(Scene("ball", "snow", "orange")) == "a photo of an orange ball in the snow"
    assert caption(Scene("robot", "city", "blue", attributes=("two-tone",), accent="white")) == \
        "a photo of a blue and white robot in the city"
    assert caption(Scene("car", "indoors", "green", attributes=("shiny", "striped"), accent="yellow")) == \
        "a photo of a shiny green car with yellow stripes indoors"
    assert caption(Scene("bird", "night", "pink", attributes=("dotted",), accent="blue")) == \
        "a photo of a pink bird with blue dots at night"
    for s in world_scenes(200, 1):  # the caption names what was drawn
        text = caption(s)
        assert text.startswith("a photo of ") and text.endswith(CONTEXTS[s.context].phrase)
        assert f" {s.colour} " in text and f" {s.category} " in f"{text} "
        assert all(a in text for a in s.attributes if a == "shiny")


def test_bad_scenes_are_refused():
    for kwargs in ({"category": "dog"}, {"context": "moon"}, {"colour": "teal"}, {"attributes": ("furry",)},
                   {"attributes": ("striped", "dotted")}, {"variant": 5}, {"scale": 0.0}):
        with pytest.raises(OpadError):
            Scene(**{"category": "mug", "context": "beach", "colour": "red", **kwargs})
    s = world_scenes(1, 0)[0]
    assert Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_images_are_64px_rgb_and_not_constant():
    for context, category in zip(CONTEXTS, CLASSES):
        im = render(Scene(category, context, "red", seed=1))
        assert im.mode == "RGB" and im.size == (64, 64)
        arr = np.asarray(im, dtype=float)
        assert arr.std(axis=(0, 1)).min() > 10  # every channel varies
    assert render(Scene("mug", "beach", "red"), size=32).size == (32, 32)


def _crop(mask: np.ndarray, side: int = 24) -> np.ndarray:
    """The mask's bounding box resized to side x side: a silhouette free of position and scale."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.uint8) * 255
    return np.asarray(Image.fromarray(box).resize((side, side), Image.Resampling.BILINEAR), dtype=float).ravel() / 255


def test_classes_differ_in_silhouette():
    # Same place, size, colour and context: only the class differs, so the masks must too ...
    masks = {c: object_mask(Scene(c, "grass", "red", scale=0.6, x=0.5, y=0.65)) for c in CLASSES}
    pairs = itertools.combinations(CLASSES, 2)
    ious = {(a, b): (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum() for a, b in pairs}
    assert max(ious.values()) < 0.85 and np.mean(list(ious.values())) < 0.65, ious
    assert (object_mask(Scene("mug", "night", "blue", scale=0.6, x=0.5, y=0.65)) == masks["mug"]).all()
    # ... and the silhouette alone (cropped, so position and scale say nothing) names the class of
    # random draws: 1-nearest-neighbour over 6 other draws per class.
    def draws(tag: str) -> list[tuple[str, np.ndarray]]:
        out = []
        for c in CLASSES:
            for i in range(6):
                s = dataclasses.replace(sample_scene(random.Random(f"{tag}:{c}:{i}")), category=c, variant=i % 2)
                out.append((c, _crop(object_mask(s))))
        return out

    train, test = draws("train"), draws("test")
    refs = np.stack([f for _, f in train])
    hits = [train[int(((refs - f) ** 2).sum(1).argmin())][0] == c for c, f in test]
    assert np.mean(hits) >= 0.85, np.mean(hits)


def test_contexts_differ_in_background_colour():
    def background_means(seed: int, n: int) -> list[tuple[str, np.ndarray]]:
        out = []
        for s in world_scenes(n, seed):
            image, mask = render_with_mask(s)
            arr = np.asarray(image, dtype=float)
            top, bottom = arr[:32][~mask[:32]], arr[32:][~mask[32:]]  # sky/wall and ground/table apart
            out.append((s.context, np.concatenate([top.mean(0), bottom.mean(0)])))
        return out

    train = background_means(0, 60)
    centroids = {k: np.mean([f for c, f in train if c == k], axis=0) for k in CONTEXTS}
    for a, b in itertools.combinations(CONTEXTS, 2):  # mean colours (upper and lower half) apart by a clear margin
        assert np.linalg.norm(centroids[a] - centroids[b]) > 40, (a, b)
    test = background_means(1, 48)
    nearest = [min(centroids, key=lambda k: np.linalg.norm(centroids[k] - f)) == c for c, f in test]
    assert np.mean(nearest) >= 0.95  # the background's colour alone names the context


def test_cli_writes_grid_images_and_captions(tmp_path, capsys):
    out = tmp_path / "world"
    assert main([str(out), "--n", "6", "--seed", "2", "--columns", "3"]) == 0
    assert "wrote 6 scene(s)" in capsys.readouterr().out
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * 66 + 2, 2 * 66 + 2)
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    expected = world_dataset(6, 2)
    assert len(rows) == 6 and sorted(p.name for p in (out / "images").iterdir()) == [f"{i:05d}.png" for i in range(6)]
    for row, (image, text, scene) in zip(rows, expected):
        assert row["caption"] == text and Scene.from_dict(row["scene"]) == scene
        assert Image.open(out / row["file"]).tobytes() == image.tobytes()


def test_cli_refuses_a_non_empty_folder_in_one_line(tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    r = subprocess.run([sys.executable, "-m", "opad.world.scenes", str(tmp_path), "--n", "2"],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: OUT") and "not empty" in r.stderr and r.stderr.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"]
    assert main([str(tmp_path / "x"), "--n", "0"]) == 2


def test_cli_help_explains():
    r = subprocess.run([sys.executable, "-m", "opad.world.scenes", "--help"],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 0
    assert "captions.jsonl" in r.stdout and "grid.png" in r.stdout and "--seed" in r.stdout
