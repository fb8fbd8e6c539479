"""The tiny preset and the CLIs, run as a user runs them (the console script in its own process; the
modules' mains in this one, where a fresh interpreter would only add its start-up time)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from opad import cli, generate
from opad.presets import tiny


def _run(*args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, **kw)


def test_tiny_preset_is_small_complete_and_offline(tiny_dir):
    size = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file())
    assert size <= 20 * 1024 * 1024, size
    for name in ("teacher", "student"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_dir / name, local_files_only=True)
        assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.unet.config.use_linear_projection
        assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    for part in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        t, s = load_file(tiny_dir / "teacher" / part), load_file(tiny_dir / "student" / part)
        assert t.keys() == s.keys() and all(torch.equal(t[k], s[k]) for k in t)
    teacher_unet = load_file(tiny_dir / "teacher/unet/diffusion_pytorch_model.safetensors")
    student_unet = load_file(tiny_dir / "student/unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(teacher_unet[k], student_unet[k]) for k in teacher_unet)


def test_tiny_schedulers_are_sd21_and_sd_turbo(tiny_dir):
    t = json.loads((tiny_dir / "teacher/scheduler/scheduler_config.json").read_text())
    s = json.loads((tiny_dir / "student/scheduler/scheduler_config.json").read_text())
    assert t["_class_name"] == "DDIMScheduler" and t["prediction_type"] == "v_prediction"
    assert s["_class_name"] == "EulerDiscreteScheduler" and s["prediction_type"] == "epsilon"
    assert s["timestep_spacing"] == "trailing"
    for cfg in (t, s):
        assert (cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")


def test_tiny_preset_is_deterministic(tiny_dir, tmp_path):
    tiny.write_tiny_preset(tmp_path / "again")
    for part in ("teacher/unet/diffusion_pytorch_model.safetensors", "student/text_encoder/model.safetensors"):
        a, b = load_file(tiny_dir / part), load_file(tmp_path / "again" / part)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_cli_refuses_existing_folder(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert tiny.main([str(tmp_path / "x")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert list((tmp_path / "x").iterdir()) == []


def test_generate_cli_writes_images_and_metadata(tiny_dir, tmp_path):
    out = tmp_path / "imgs"
    assert generate.main(["--prompt", "a red cube", "--steps", "2", "--seed", "7", "--num-images", "3",
                          "--out", str(out)]) == 0
    meta = json.loads((out / "generation.json").read_text())
    assert [i["file"] for i in meta["images"]] == ["000_seed7.png", "001_seed8.png", "002_seed9.png"]
    assert all(i["seconds"] > 0 for i in meta["images"])
    assert (meta["prompt"], meta["steps"], meta["resolution"], meta["concept"]) == ("a red cube", 2, 64, None)
    assert sorted(p.name for p in out.iterdir()) == ["000_seed7.png", "001_seed8.png", "002_seed9.png", "generation.json"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "  "], "--prompt is empty"),
        (["--num-images", "0"], "--num-images must be at least 1"),
        (["--resolution", "60"], "multiple of 8"),
        (["--concept", "/no/such/concept"], "concept folder not found"),
        (["--student", "/no/such/model"], "student model folder not found"),
    ],
)
def test_generate_bad_input_writes_nothing(tiny_dir, tmp_path, args, message, capsys):
    out = tmp_path / "out"
    assert generate.main([*args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_generate_refuses_non_empty_out_unless_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert generate.main(["--out", str(out), "--num-images", "1"]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert generate.main(["--out", str(out), "--num-images", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000_seed0.png", "generation.json"]


def test_console_script_and_help(capsys):
    script = shutil.which("opad", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert script, "the opad console script is not installed"
    r = subprocess.run([script, "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--instance-dir" in r.stdout and "--method" in r.stdout
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("train", "generate", "tiny"))
    assert cli.main(["bogus"]) == 2 and "unknown command" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        generate.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--concept" in out and "--steps" in out
