"""Model loading: the bundle's contents and every error case."""

import json
import shutil

import pytest
import torch

from opad.errors import OpadError
from opad.models.loading import load_models


def test_bundle_shares_teacher_text_encoder_and_vae_and_is_frozen(bundle, tiny_dir):
    assert bundle.teacher_scheduler.config.prediction_type == "v_prediction"
    assert bundle.student_scheduler.config.prediction_type == "epsilon"
    assert bundle.student_scheduler.config.timestep_spacing == "trailing"
    for module in (bundle.text_encoder, bundle.vae, bundle.teacher_unet, bundle.student_unet):
        assert not any(p.requires_grad for p in module.parameters())
        assert not module.training
    assert bundle.default_resolution == 64
    assert bundle.teacher_source == str(tiny_dir / "teacher")


def test_device_and_dtype_are_applied(tiny_dir):
    b = load_models(str(tiny_dir / "teacher"), str(tiny_dir / "student"), dtype=torch.bfloat16)
    assert {p.dtype for m in (b.text_encoder, b.vae, b.teacher_unet, b.student_unet) for p in m.parameters()} == {torch.bfloat16}


def test_loading_prints_no_transformers_load_bar_and_leaves_its_setting_alone(tiny_dir, capfd):
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()
    load_models(str(tiny_dir / "teacher"), str(tiny_dir / "student"))
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()  # restored for the caller's own loads


def test_student_only_bundle_reads_just_the_student(tiny_dir):
    b = load_models(student=str(tiny_dir / "student"), load_teacher=False)
    assert b.teacher_unet is None and b.teacher_source is None


def test_defaults_are_the_tiny_preset(tiny_dir):
    b = load_models()
    assert b.student_source == str(tiny_dir / "student")


def _copy(tiny_dir, tmp_path, name="student"):
    dst = tmp_path / name
    shutil.copytree(tiny_dir / name, dst)
    return dst


def test_missing_folder(tiny_dir, tmp_path):
    with pytest.raises(OpadError, match="student model folder not found"):
        load_models(str(tiny_dir / "teacher"), str(tmp_path / "no-such-model"))
    with pytest.raises(OpadError, match="teacher model folder not found"):
        load_models("./relative/missing", str(tiny_dir / "student"))


def test_not_a_diffusers_pipeline(tiny_dir, tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(OpadError, match="not a diffusers pipeline: it has no model_index.json"):
        load_models(str(tiny_dir / "teacher"), str(tmp_path / "photos"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(OpadError, match="is a file"):
        load_models(str(tmp_path / "file.bin"), str(tiny_dir / "student"))
    teacher = _copy(tiny_dir, tmp_path, "teacher")
    shutil.rmtree(teacher / "vae")
    with pytest.raises(OpadError, match="missing vae/"):
        load_models(str(teacher), str(tiny_dir / "student"))
    (teacher / "model_index.json").write_text("{not json")
    with pytest.raises(OpadError, match="not valid JSON"):
        load_models(str(teacher), str(tiny_dir / "student"))


def test_mismatched_text_encoder_widths(tiny_dir, tmp_path):
    student = _copy(tiny_dir, tmp_path)
    config = json.loads((student / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 24
    (student / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(OpadError, match="text encoder width mismatch: the teacher's text encoder is 16 wide but the student UNet expects 24"):
        load_models(str(tiny_dir / "teacher"), str(student))


def test_corrupt_weights_are_reported(tiny_dir, tmp_path):
    student = _copy(tiny_dir, tmp_path)
    (student / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(OpadError, match=r"unet/diffusion_pytorch_model.safetensors is damaged or not a safetensors"):
        load_models(str(tiny_dir / "teacher"), str(student))
