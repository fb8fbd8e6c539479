"""Bad input to the trainer: one clear error naming the problem, and nothing written."""

import os
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from trainutil import make_trainer

from opad.errors import OpadError
from opad.train.data import ConceptData, load_images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo(path, size=(80, 96), mode="RGB", seed=0, **save):
    g = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = (torch.rand(size[1], size[0], channels, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(path, **save)


@pytest.fixture()
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    _photo(d / "a.jpg")
    _photo(d / "b.png", (120, 70), "RGBA", 1)
    _photo(d / "c.webp", (100, 66), "RGB", 2, lossless=True)
    _photo(d / "d.png", (64, 64), "L", 3)
    (d / "notes.txt").write_text("not an image")
    return d


def test_any_size_and_mode_loads_as_rgb_squares(photos):
    images = load_images(photos, 64, allow_upscale=False)
    assert [tuple(i.shape) for i in images] == [(3, 80, 80), (3, 70, 70), (3, 66, 66), (3, 64, 64)]
    assert all(0 <= i.min() and i.max() <= 1 for i in images)
    gray = images[3]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_batches_are_augmented_and_deterministic(photos):
    data = ConceptData(load_images(photos, 64, allow_upscale=False), "<new1> dog", 64, 8)
    a = data.sample(6, torch.Generator().manual_seed(1))
    b = data.sample(6, torch.Generator().manual_seed(1))
    assert torch.equal(a.pixels, b.pixels) and a.prompts == b.prompts
    assert a.pixels.shape == (6, 3, 64, 64) and a.masks.shape == (6, 1, 8, 8)
    assert a.pixels.min() >= -1 and a.pixels.max() <= 1
    assert all("<new1> dog" in p for p in a.prompts)
    many = data.sample(60, torch.Generator().manual_seed(2))
    assert any(p.startswith(("a far away", "very small")) for p in many.prompts)
    assert any(p.startswith(("zoomed in", "close up")) for p in many.prompts)
    assert (many.masks.flatten(1).mean(1) < 1).any()  # shrunk subjects count only where pasted


@pytest.mark.parametrize(
    "setup, overrides, message",
    [
        (None, dict(instance_dir="{tmp}/missing", class_name="dog"), "instance folder not found"),
        ("empty", dict(class_name="dog"), "has no images"),
        ("text_only", dict(class_name="dog"), "has no images"),
        ("corrupt", dict(class_name="dog"), "could not read image '{tmp}/in/broken.png'"),
        ("small", dict(class_name="dog"), "is 40x40, smaller than the training resolution 64"),
        ("ok", dict(class_name="dog", token="dog"), "'dog' is already in the tokenizer's vocabulary"),
        ("ok", dict(class_name="stuffed animal"), "initialiser word 'stuffed animal' is 2 tokens"),
        ("ok", dict(), "--class-name is required"),
        ("ok", dict(class_name="dog", discriminators=["dino_v1", "stylegan"]), "unknown discriminator 'stylegan'"),
        ("ok", dict(class_name="dog", id_encoder="vgg"), "--id-encoder must be one of dino_v1, dino_v2, clip, got 'vgg'"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(tiny_dir, tmp_path, setup, overrides, message):
    folder = tmp_path / "in"
    if setup:
        folder.mkdir()
    if setup == "text_only":
        (folder / "readme.txt").write_text("hi")
    if setup == "corrupt":
        _photo(folder / "fine.png")
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    if setup == "small":
        _photo(folder / "tiny.png", (40, 40))
    if setup == "ok":
        _photo(folder / "fine.png")
    overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
    overrides.setdefault("instance_dir", str(folder))
    with pytest.raises(OpadError, match=message.format(tmp=tmp_path).replace("[", r"\[").replace("(", r"\(")):
        make_trainer(tmp_path / "out", **overrides)
    assert not (tmp_path / "out").exists()


def test_small_images_train_with_allow_upscale(tiny_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(folder / "tiny.png", (40, 40))
    trainer = make_trainer(tmp_path / "out", instance_dir=str(folder), class_name="dog", allow_upscale=True)
    assert trainer.data.images[0].shape == (3, 64, 64)


def test_output_dir_of_another_run_is_refused_unless_overwrite_or_resume(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OpadError, match="already holds files.*--resume.*--overwrite"):
        make_trainer(out)
    with pytest.raises(OpadError, match="nothing to resume.*no complete checkpoint"):
        make_trainer(out, resume=True)
    trainer = make_trainer(out, overwrite=True, max_steps=1)
    trainer.train()
    assert (out / "mine.txt").read_text() == "keep me" and (out / "concept").is_dir()


def test_resume_refuses_changed_algorithm_settings(tiny_dir, tmp_path):
    make_trainer(tmp_path / "out", max_steps=1).train()
    with pytest.raises(OpadError, match="differ from the run's config.json.*swd_weight"):
        make_trainer(tmp_path / "out", max_steps=2, resume=True, swd_weight=0.5)


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "opad.train", *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_cli_errors_and_help(tmp_path):
    r = _cli("--output-dir", str(tmp_path / "o"), "--discriminators", "dino_v1,bogus")
    assert r.returncode == 2 and "error: unknown discriminator 'bogus'" in r.stderr
    assert not (tmp_path / "o").exists()
    r = _cli("--config", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "config file not found" in r.stderr
    (tmp_path / "c.json").write_text('{"max_steps": 3, "colour": "red"}')
    r = _cli("--config", str(tmp_path / "c.json"))
    assert r.returncode == 2 and "unknown field(s) colour" in r.stderr
    r = _cli("--help")
    assert r.returncode == 0
    for flag in ("--teacher", "--student", "--instance-dir", "--class-name", "--token", "--init-word", "--output-dir",
                 "--max-steps", "--resolution", "--batch-size", "--seed", "--resume", "--teacher-lr", "--student-lr",
                 "--head-lr", "--swd-weight", "--discriminators", "--collab-start", "--config"):
        assert flag in r.stdout, flag


def test_config_file_with_flag_override(tiny_dir, tmp_path):
    (tmp_path / "c.yaml").write_text("max_steps: 1\nswd_weight: 0.0\ndiscriminators: clip\npreview_teacher_steps: 2\n")
    out = tmp_path / "run"
    r = _cli("--config", str(tmp_path / "c.yaml"), "--output-dir", str(out), "--id-weight", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    saved = json.loads((out / "config.json").read_text())
    assert (saved["max_steps"], saved["swd_weight"], saved["discriminators"], saved["id_weight"]) == (1, 0.0, ["clip"], 0.0)


@pytest.mark.parametrize("bad", ["corrupt", "class-dir"])
def test_a_bad_photo_is_refused_before_any_model_is_loaded_or_cached(tmp_path, bad):
    """Every input is checked before the preset's models are written to the cache or loaded: a refused
    run costs seconds and leaves nothing new (the world preset writes its pipelines on first use)."""
    photos, cache, out = tmp_path / "photos", tmp_path / "cache", tmp_path / "out"
    photos.mkdir()
    _photo(photos / "a.png", size=(72, 72))
    broken = photos / "b.jpg" if bad == "corrupt" else tmp_path / "class" / "c.jpg"
    broken.parent.mkdir(exist_ok=True)
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    extra = ["--class-dir", str(broken.parent)] if bad == "class-dir" else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPAD_CACHE": str(cache), "OPAD_PRESET": "world"}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "opad.train", "--instance-dir", str(photos), "--class-name", "mug",
                        "--output-dir", str(out), "--max-steps", "1", *extra],
                       capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 2 and f"could not read image {str(broken)!r}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not cache.exists() or not any(cache.iterdir()), sorted(p.name for p in cache.iterdir())
    assert not out.exists()
    assert time.perf_counter() - start < 60
