"""The mini world's held-out concepts: instances no pretraining scene shows, laid out like DreamBench."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from opad.evaluation.dreambench import read_dreambench
from opad.evaluation.metrics import prompt_type
from opad.world.concepts import main
from opad.world.render import concepts
from opad.world.render.contexts import CONTEXTS
from opad.world.render.scenes import COLOURS, CONCEPT_ATTRIBUTES, PATTERNS, world_scenes


def _digest(folder) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    named = b"".join(p.relative_to(folder).as_posix().encode() + p.read_bytes() for p in files)
    return hashlib.sha256(named).hexdigest()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("concepts") / "world-concepts"
    assert main([str(out)]) == 0
    return out


def test_concepts_are_laid_out_like_dreambench_and_read_by_its_reader(written):
    bench = read_dreambench(written / "prompts_and_classes.txt")
    assert len(concepts.CONCEPTS) >= 6
    assert bench.classes == {c.name: c.instance.category for c in concepts.CONCEPTS}
    for c in concepts.CONCEPTS:
        photos = sorted((written / c.name).iterdir())
        assert [p.name for p in photos] == [f"{k:02d}.png" for k in range(concepts.PHOTOS)]
        assert all(Image.open(p).size == (64, 64) for p in photos)
        prompts = bench.prompts_for(c.name, "<new1>")
        assert len(prompts) == 25 and all(f"<new1> {c.class_word}" in p for p in prompts)
    # DreamBench's kinds by position: 20 recontextualizations (every world context), then 5 property changes
    kinds = [prompt_type(t.format("<new1>", "mug"), bench) for t in concepts.PROMPTS]
    assert kinds == ["recontextualization"] * 20 + ["property"] * 5
    assert all(any(ctx.phrase in t for t in concepts.PROMPTS[:20]) for ctx in CONTEXTS.values())


def test_concepts_are_the_same_on_every_write(written, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    concepts.write_concepts(again)
    assert _digest(again) == _digest(written)


def test_no_pretraining_scene_shows_a_concept():
    # what makes each concept new: a pattern the world never draws, or a pattern on a two-tone object;
    # and a main colour off the world's palette (further than the world's +-14 jitter from each colour)
    for c in concepts.CONCEPTS:
        attrs = set(c.instance.attributes)
        assert attrs & set(CONCEPT_ATTRIBUTES) or {"two-tone"} <= attrs and attrs & set(PATTERNS), c.name
        assert min(np.abs(np.subtract(c.instance.rgb, rgb)).max() for rgb in COLOURS.values()) > 14, c.name
    for scene in world_scenes(20_000, 0):  # the whole training world
        attrs = set(scene.attributes)
        assert not attrs & set(CONCEPT_ATTRIBUTES)
        assert not ("two-tone" in attrs and attrs & set(PATTERNS))


def test_each_concepts_photos_vary_pose_and_context_and_keep_the_instance():
    for c in concepts.CONCEPTS:
        scenes = concepts.photo_scenes(c)
        assert {s.context for s in scenes} == set(c.homes) and len(c.homes) >= 2
        assert len({(s.x, s.scale, s.rotation) for s in scenes}) == len(scenes)  # every pose differs
        keep = {(s.category, s.rgb, s.attributes, s.accent, s.variant) for s in scenes}
        assert keep == {(c.instance.category, c.instance.rgb, c.instance.attributes, c.instance.accent,
                         c.instance.variant)}


def test_concepts_cli_refuses_a_folder_that_holds_files(tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_concepts_dir_is_written_once_to_the_cache(opad_cache):
    first = concepts.concepts_dir()
    assert first.parent == opad_cache and (first / "prompts_and_classes.txt").is_file()
    stamp = (first / "concepts.json").stat().st_mtime_ns
    assert concepts.concepts_dir() == first and (first / "concepts.json").stat().st_mtime_ns == stamp


def test_the_world_classifier_scores_class_and_prompted_context(written, tmp_path):
    """opad.world.fidelity.classifier_scores on the car's own photos, each "prompted" with the context it
    was taken in (plus a property prompt, which names none): the classifier finds the class and the
    contexts; a wrong class word scores zero."""
    import csv
    import shutil

    from opad.world.fidelity import classifier_scores, prompt_context

    car = next(c for c in concepts.CONCEPTS if c.name == "checkered_car")
    folder = tmp_path / "generated"
    folder.mkdir()
    rows = []
    for k, scene in enumerate(concepts.photo_scenes(car)):
        shutil.copy(written / car.name / f"{k:02d}.png", folder / f"{k}.png")
        rows.append({"file": f"{k}.png", "prompt": f"a photo of a <new1> car {CONTEXTS[scene.context].phrase}"})
    shutil.copy(written / car.name / "00.png", folder / "property.png")
    rows.append({"file": "property.png", "prompt": "a shiny <new1> car"})
    with (folder / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["file", "prompt"])
        writer.writeheader()
        writer.writerows(rows)
    assert [prompt_context(r["prompt"]) for r in rows[:2]] == ["city", "snow"] and prompt_context(rows[-1]["prompt"]) is None
    assert classifier_scores(folder, "car") == {"class_acc": 1.0, "context_acc": 1.0}
    assert classifier_scores(folder, "bird")["class_acc"] == 0.0
