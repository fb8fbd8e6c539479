"""Trainer options beyond the defaults: each runs and logs its own term."""

import math

import pytest
import safetensors.torch
import timm
import torch
from trainutil import make_trainer, write_class_images

from opad.errors import OpadError
from opad.models.backbones import build_backbone


def _one_iteration(trainer) -> dict[str, float]:
    values = trainer.iteration().values
    assert all(math.isfinite(v) for v in values.values()), values
    return values


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(r1_weight=0.1, discriminators=["clip"]), "loss/r1_clip"),
        (dict(disc_loss="hinge", discriminators=["dino_v1"]), "loss/d_dino_v1"),
        (dict(lpips_weight=0.5, discriminators=["clip"]), "loss/lpips"),
        (dict(id_encoder="dino_v1", discriminators=["clip"]), "loss/id"),
        (dict(disc_normalize=False, discriminators=["dino_v2"], dino_v2_size="large"), "loss/adv_dino_v2"),
    ],
)
def test_option_runs_and_logs_its_term(tiny_dir, tmp_path, overrides, key):
    trainer = make_trainer(tmp_path / "run", **overrides)
    assert key in _one_iteration(trainer)


def test_class_prior_images_add_the_prior_loss(tiny_dir, tmp_path):
    trainer = make_trainer(tmp_path / "run", class_dir=write_class_images(tmp_path / "class"), discriminators=["clip"])
    assert "loss/prior" in _one_iteration(trainer)


def test_collaborative_stage_mixes_student_samples_into_batches(tiny_dir, tmp_path):
    trainer = make_trainer(tmp_path / "run", collab_start=0.0, collab_buffer=3, collab_mix=1.0,
                           collab_disc_real="mixed", discriminators=["clip"])
    trainer.method.refresh_collab_buffer()
    assert trainer.method.collab_images.shape == (3, 3, 64, 64) and len(trainer.method.collab_prompts) == 3
    batch = trainer.method.next_batch()
    assert set(batch.prompts) <= set(trainer.method.collab_prompts)  # mix 1.0: every item from the buffer
    assert batch.masks.min() == 1
    _one_iteration(trainer)


def test_backbone_weights_from_a_local_file(tmp_path):
    model = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0)
    path = tmp_path / "dino.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    backbone = build_backbone("dino_v1", str(path))
    loaded = backbone.encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert backbone.feature_dim == 384 and backbone.input_size == 224
    with pytest.raises(OpadError, match="weights file not found"):
        build_backbone("clip", str(tmp_path / "missing.bin"))
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(OpadError, match="could not load the dino_v1 backbone"):
        build_backbone("dino_v1", str(tmp_path / "bad.safetensors"))


def test_real_models_need_backbone_weights(tiny_dir, tmp_path):
    with pytest.raises(OpadError, match="the dino_v1 backbone needs weights: pass --backbone-weights dino_v1=FILE"):
        make_trainer(tmp_path / "run", teacher=str(tiny_dir / "teacher"), student=str(tiny_dir / "student"))


def test_zero_adversarial_weight_skips_the_generator_terms(tiny_dir, tmp_path):
    values = _one_iteration(make_trainer(tmp_path / "run", disc_weight=0.0, discriminators=["clip"]))
    assert "loss/adv_clip" not in values and "loss/d_clip" in values
