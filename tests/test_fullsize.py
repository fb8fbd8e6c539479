"""The full-size preset writer (opad.fullsize): the published architectures, counted on the meta device,
and the writer itself run on small stand-ins of the same classes (CI never writes the 7 GiB)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from opad.fullsize import writer as fullsize

# stabilityai/stable-diffusion-2-1 unet/config.json, as published
SD21_UNET = {
    "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True, "upcast_attention": True,
}
SD_TURBO_UNET = {**SD21_UNET, "sample_size": 64, "upcast_attention": False}
SD21_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3,
    "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 768,
    "scaling_factor": 0.18215,
}
SD21_TEXT_ENCODER = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
    "projection_dim": 512, "hidden_act": "gelu", "vocab_size": 49408, "max_position_embeddings": 77,
    "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1,
}
SD_TURBO_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "interpolation_type": "linear",
    "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "trailing", "use_karras_sigmas": False,
}
# parameter counts of the published checkpoints
PUBLISHED = {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840, "clip": 632_076_800,
             "ip_adapter": 3_150_336, "dino_v2": 304_367_616, "dino_v1": 21_665_664}


def _subset(config: dict, keys) -> dict:
    return {k: (list(config[k]) if isinstance(config[k], tuple) else config[k]) for k in keys}


def test_models_have_the_published_sizes_on_the_meta_device():
    teacher, student = fullsize.build_unet(fullsize.TEACHER_UNET), fullsize.build_unet(fullsize.STUDENT_UNET)
    vae, text = fullsize.build_vae(), fullsize.build_text_encoder()
    assert all(p.is_meta for m in (teacher, student, vae, text) for p in m.parameters())
    assert fullsize.parameter_count(teacher) == fullsize.parameter_count(student) == PUBLISHED["unet"]
    assert fullsize.parameter_count(vae) == PUBLISHED["vae"]
    # SD 2.1's text_encoder: OpenCLIP-H's text tower cut at its penultimate layer (23 of 24 blocks, no projection)
    assert fullsize.parameter_count(text) == PUBLISHED["text_encoder"]
    backbones = fullsize.build_backbones()
    assert {name: fullsize.parameter_count(m) for name, m in backbones.items()} == {
        k: PUBLISHED[k] for k in ("clip", "ip_adapter", "dino_v2", "dino_v1")}
    assert fullsize.PUBLISHED_PARAMETERS == PUBLISHED
    # the models' own configs are the published ones
    assert _subset(teacher.config, SD21_UNET) == SD21_UNET
    assert _subset(student.config, SD_TURBO_UNET) == SD_TURBO_UNET
    assert _subset(vae.config, SD21_VAE) == SD21_VAE
    assert {k: getattr(text.config, k) for k in SD21_TEXT_ENCODER} == SD21_TEXT_ENCODER


def test_written_configs_are_the_published_ones(tmp_path):
    """What save_pretrained writes as config.json (the same call the writer makes), for every part."""
    fullsize.build_unet(fullsize.TEACHER_UNET).save_config(tmp_path / "teacher_unet")
    fullsize.build_unet(fullsize.STUDENT_UNET).save_config(tmp_path / "student_unet")
    fullsize.build_vae().save_config(tmp_path / "vae")
    fullsize.build_text_encoder().config.save_pretrained(tmp_path / "text_encoder")
    fullsize._teacher_scheduler().save_pretrained(tmp_path / "teacher_scheduler")
    fullsize.student_scheduler().save_pretrained(tmp_path / "student_scheduler")

    def read(name, file="config.json"):
        return json.loads((tmp_path / name / file).read_text())

    assert _subset(read("teacher_unet"), SD21_UNET) == SD21_UNET
    assert _subset(read("student_unet"), SD_TURBO_UNET) == SD_TURBO_UNET
    assert _subset(read("vae"), SD21_VAE) == SD21_VAE
    assert _subset(read("text_encoder"), SD21_TEXT_ENCODER) == SD21_TEXT_ENCODER
    assert _subset(read("teacher_scheduler", "scheduler_config.json"), SD21_SCHEDULER) == SD21_SCHEDULER
    assert _subset(read("student_scheduler", "scheduler_config.json"), SD_TURBO_SCHEDULER) == SD_TURBO_SCHEDULER


def test_fill_scales_by_fan_in_and_keeps_activations_sane():
    from torch import nn

    with fullsize.init_empty_weights():
        net = nn.Sequential(nn.Linear(300, 700), nn.LayerNorm(700), nn.Linear(700, 500), nn.Embedding(50, 8))
    fullsize.fill(net, seed=3, dtype=torch.float32)
    assert abs(float(net[0].weight.std()) - 300**-0.5) < 0.05 * 300**-0.5
    assert abs(float(net[2].weight.std()) - 700**-0.5) < 0.05 * 700**-0.5
    assert float(net[0].bias.abs().max()) == 0 and bool((net[1].weight == 1).all())
    assert abs(float(net[3].weight.std()) - 0.02) < 0.004
    y = net[2](net[0](torch.randn(64, 300)))
    assert 0.7 < float(y.std()) < 1.3  # each layer keeps its input's scale
    # the same seed gives the same values; another gives others
    with fullsize.init_empty_weights():
        again, other = nn.Linear(300, 700), nn.Linear(300, 700)
    fullsize.fill(again, seed=3, dtype=torch.float32, prefix="0.")
    fullsize.fill(other, seed=4, dtype=torch.float32, prefix="0.")
    assert torch.equal(again.weight, net[0].weight) and not torch.equal(other.weight, net[0].weight)


@pytest.fixture()
def small_stand_ins(monkeypatch):
    """The writer with small models of the same classes and loaders: tiny UNet/VAE/text widths,
    ViT-S-32 for ViT-H-14, DINOv2 ViT-S/14 for ViT-L/14."""
    monkeypatch.setattr(fullsize, "TEACHER_UNET", {**fullsize.TEACHER_UNET, "block_out_channels": [32, 32, 64, 64],
                                                   "attention_head_dim": [2, 2, 4, 4], "cross_attention_dim": 32,
                                                   "norm_num_groups": 8, "sample_size": 12})
    monkeypatch.setattr(fullsize, "STUDENT_UNET", {**fullsize.TEACHER_UNET, "sample_size": 8,
                                                   "upcast_attention": False})
    monkeypatch.setattr(fullsize, "VAE", {**fullsize.VAE, "block_out_channels": [16, 16, 32, 32],
                                          "norm_num_groups": 8, "layers_per_block": 1})
    monkeypatch.setattr(fullsize, "TEXT_ENCODER", {**fullsize.TEXT_ENCODER, "hidden_size": 32,
                                                   "intermediate_size": 64, "num_attention_heads": 4,
                                                   "num_hidden_layers": 2, "projection_dim": 32})
    monkeypatch.setattr(fullsize, "CLIP_ARCH", "ViT-S-32")
    monkeypatch.setattr(fullsize, "DINO_V2", "vit_small_patch14_dinov2.lvd142m")


def test_writer_writes_loadable_pipelines_and_backbones(small_stand_ins, tmp_path, capsys):
    from opad.diffusion.sampling import sample_student
    from opad.models.backbones import build_backbone
    from opad.models.loading import load_models

    out = tmp_path / "fs"
    assert fullsize.main([str(out)]) == 0
    printed = capsys.readouterr()
    assert "--backbone-weights dino_v1=" in printed.out and "--ip-adapter " in printed.out
    assert printed.err.count("parameters") == 10  # a line per component
    # teacher and student share the text encoder and VAE files (hard links where possible)
    for part in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        t, s = out / "teacher" / part, out / "student" / part
        assert t.read_bytes() == s.read_bytes()
        if os.name == "posix":
            assert os.path.samefile(t, s)
    teacher_unet = (out / "teacher/unet/diffusion_pytorch_model.safetensors").read_bytes()
    assert teacher_unet != (out / "student/unet/diffusion_pytorch_model.safetensors").read_bytes()
    bundle = load_models(str(out / "teacher"), str(out / "student"))
    assert bundle.teacher_unet.dtype == torch.float32  # fp16 files, loaded as asked
    assert bundle.default_resolution == 64
    images = sample_student(bundle, ["a photo of a dog"], generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(images).all() and float(images.std()) > 0
    # the backbones read by opad's own loaders, as the printed flags pass them
    bb = out / "backbones"
    clip = build_backbone("clip", str(bb / fullsize.BACKBONE_FILES["clip"]), clip_arch="ViT-S-32",
                          ip_adapter=str(bb / fullsize.BACKBONE_FILES["ip_adapter"]))
    assert clip.tokens == 4 and clip.feature_dim == 4 * 768
    dino_v2 = build_backbone("dino_v2", str(bb / fullsize.BACKBONE_FILES["dino_v2"]), dino_v2_size="small")
    dino_v1 = build_backbone("dino_v1", str(bb / fullsize.BACKBONE_FILES["dino_v1"]))
    x = torch.rand(1, 3, 64, 64)
    for backbone in (clip, dino_v2, dino_v1):
        f = backbone(x)
        assert torch.isfinite(f).all() and float(f.std()) > 0


def test_writer_refuses_existing_folder_and_bad_options(tmp_path, capsys):
    assert fullsize.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path} already exists; choose a new folder for the full-size preset")
    assert fullsize.main([str(tmp_path / "x"), "--only", "teacher,nope"]) == 2
    assert "--only takes a comma list of teacher, student, backbones" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
