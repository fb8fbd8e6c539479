"""What the commands run on when no model is named: the mini world by default, the tiny preset on request."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from opad import generate
from opad.config import TrainConfig
from opad.errors import OpadError
from opad.models.loading import load_models
from opad.presets import PRESETS, default_preset
from opad.train import cli as train
from opad.world.components.clip import load_text_encoder
from opad.world.layout import SHIPPED
from opad.world.render.concepts import CONCEPTS, concepts_dir


def test_the_preset_is_the_flag_then_opad_preset_then_the_world(monkeypatch):
    monkeypatch.delenv("OPAD_PRESET", raising=False)
    assert default_preset().name == "world"
    monkeypatch.setenv("OPAD_PRESET", "tiny")
    assert default_preset().name == "tiny" and default_preset("world").name == "world"
    monkeypatch.setenv("OPAD_PRESET", "large")
    with pytest.raises(OpadError, match="OPAD_PRESET 'large' is not a preset; use one of: world, tiny"):
        default_preset()


@pytest.mark.parametrize("argv, env, message", [
    (["--preset", "huge"], None, "--preset must be one of world, tiny, got 'huge'"),
    ([], "huge", "OPAD_PRESET 'huge' is not a preset"),
    (["--preset", "tiny", "--teacher", "somewhere"], None, "--preset picks the models only when neither"),
])
def test_a_bad_preset_is_one_clear_line(tmp_path, monkeypatch, capsys, argv, env, message):
    if env:
        monkeypatch.setenv("OPAD_PRESET", env)
    assert train.main([*argv, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_world_defaults_fill_only_what_the_user_left_unset():
    world = TrainConfig().resolved(PRESETS["world"])
    assert (world.preset, world.max_steps, world.teacher_lr, world.student_lr, world.head_lr, world.ip_adapter) == (
        "world", *(PRESETS["world"].train_defaults[k] for k in ("max_steps", "teacher_lr", "student_lr", "head_lr",
                                                                "ip_adapter")))
    mine = TrainConfig(max_steps=7, teacher_lr=1e-5, student_lr=3e-5, head_lr=1e-4, ip_adapter="tiny")
    assert (lambda c: (c.max_steps, c.teacher_lr, c.student_lr, c.head_lr, c.ip_adapter))(
        mine.resolved(PRESETS["world"])) == (7, 1e-5, 3e-5, 1e-4, "tiny")
    real = TrainConfig().resolved()  # real models: the paper's values
    assert (real.preset, real.max_steps, real.teacher_lr, real.student_lr, real.head_lr) == (
        None, 1000, 1e-5, 2e-5, 1e-4)


def test_the_world_preset_is_the_shipped_models_as_pipeline_folders(monkeypatch):
    monkeypatch.setenv("OPAD_PRESET", "world")
    folder = default_preset().folder()
    stamp = (folder / "student" / "model_index.json").stat().st_mtime_ns
    bundle = load_models()
    assert str(folder) in bundle.teacher_source and str(folder) in bundle.student_source
    assert bundle.default_resolution == 64 and bundle.teacher_scheduler.config.prediction_type == "v_prediction"
    text = load_text_encoder(SHIPPED / "clip")
    for name, p in text.state_dict().items():  # the frozen text tower, shared by teacher and student
        assert torch.equal(p, bundle.text_encoder.state_dict()[name]), name
    assert default_preset().folder() == folder  # written once, then reused
    assert (folder / "student" / "model_index.json").stat().st_mtime_ns == stamp


def test_generate_draws_the_world_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("OPAD_PRESET", "world")
    out = tmp_path / "images"
    assert generate.main(["--prompt", "a photo of a red car in the snow", "--num-images", "2", "--out", str(out),
                          "--device", "cpu"]) == 0
    image = np.asarray(Image.open(out / "000_seed0.png"))
    assert image.shape == (64, 64, 3) and image.std() > 10  # a picture, not a flat field


def test_train_with_no_arguments_learns_a_world_concept_with_the_worlds_backbones(tmp_path, monkeypatch):
    monkeypatch.setenv("OPAD_PRESET", "world")
    trainer = train.run(["--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--preview-every", "2",
                         "--checkpoint-every", "2"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["preset"] == "world" and saved["teacher_lr"] == PRESETS["world"].train_defaults["teacher_lr"]
    mug = next(c for c in CONCEPTS if c.name == "checkered_mug")
    assert trainer.subject == f"<new1> {mug.class_word}"
    photos = sorted((concepts_dir() / mug.name).glob("*.png"))
    assert len(trainer.data.images) == len(photos) == 5
    # the paper's three discriminators, the world's own trained backbones at their own 64 px
    assert saved["discriminators"] == ["dino_v1", "dino_v2", "clip"]
    assert set(trainer.method.backbones) == {"dino_v1", "dino_v2", "clip"}
    assert all(b.input_size == 64 for b in trainer.method.backbones.values())
    grid = Image.open(tmp_path / "run" / "samples" / "step-000002.png")
    assert grid.size == (2 * 128, 14 + 3 * 128)  # student | teacher; at home, on the beach, in the snow
    # a resumed run keeps the preset its config.json records, whatever OPAD_PRESET says now...
    monkeypatch.setenv("OPAD_PRESET", "tiny")
    resumed = train.run(["--output-dir", str(tmp_path / "run"), "--resume", "--max-steps", "3",
                         "--preview-every", "100"])
    assert resumed.preset.name == "world" and resumed.step == 3
    # ...and asking for another one is refused
    with pytest.raises(OpadError, match="preset: run 'world', now 'tiny'"):
        train.run(["--output-dir", str(tmp_path / "run"), "--resume", "--max-steps", "4", "--preset", "tiny"])
