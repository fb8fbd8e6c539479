"""Frozen backbones: resize modes, out-of-range gradients, IP-Adapter projection, hub names offline,
and the paper's full-size default architectures from local files."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from opad.backbones import ImageProjection, build_backbone, resize_images
from opad.errors import OpadError
from opad.losses import cosine_distance


def _images(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["dino_v1", "dino_v2", "clip"])
def test_tiny_backbones_and_resize_modes(name):
    backbone = build_backbone(name, "tiny", resize="area")
    x = _images(2, 3, 531, 557)  # larger than every input size: antialiasing matters when shrinking
    size = backbone.input_size
    assert resize_images(x, size, "area").equal(F.interpolate(x, size=(size, size), mode="area"))
    plain = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    assert resize_images(x, size, "bilinear").equal(plain)
    smooth = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    assert resize_images(x, size, "antialias").equal(smooth)
    outs = {mode: backbone(x, resize=mode) for mode in ("area", "bilinear", "antialias")}
    assert backbone(x).equal(outs["area"])  # the module's default
    assert not outs["area"].equal(outs["bilinear"]) and not outs["bilinear"].equal(outs["antialias"])
    assert outs["area"].shape == (2, backbone.feature_dim) and backbone.tokens == 1


def test_normalize_off_feeds_raw_signed_pixels():
    backbone = build_backbone("dino_v1", "tiny", normalize=False)
    seen = []
    backbone.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = _images(1, 3, 224, 224)
    backbone(x)
    torch.testing.assert_close(seen[0], x * 2 - 1)


@pytest.mark.parametrize("name", ["dino_v1", "dino_v2", "clip"])
def test_out_of_range_pixels_keep_their_gradient(name):
    backbone = build_backbone(name, "tiny", ip_adapter="tiny" if name == "clip" else None)
    x = _images(1, 3, 64, 64, seed=1)
    x[:, :, :16, :16] = 1.7
    x[:, :, -16:, -16:] = -0.4
    x.requires_grad_(True)
    backbone(x).square().sum().backward()
    assert x.grad[:, :, :16, :16].abs().sum() > 0 and x.grad[:, :, -16:, -16:].abs().sum() > 0


def _projection_state(in_dim=32, tokens=4, token_dim=6, seed=0):
    torch.manual_seed(seed)
    proj = ImageProjection(in_dim, tokens, token_dim)
    for p in proj.parameters():
        p.data.normal_()
    return proj, {k: v.clone() for k, v in proj.state_dict().items()}


@pytest.mark.parametrize("layout", ["flat.safetensors", "nested.bin", "flat.bin"])
def test_ip_adapter_projection_files(tmp_path, layout):
    proj, state = _projection_state()
    path = tmp_path / f"ip-adapter.{layout.split('.')[1]}"
    flat = {f"image_proj.{k}": v for k, v in state.items()} | {"ip_adapter.1.to_k_ip.weight": torch.ones(2, 2)}
    if layout == "flat.safetensors":
        safetensors.torch.save_file(flat, path)
    elif layout == "nested.bin":
        torch.save({"image_proj": state, "ip_adapter": {"1.to_k_ip.weight": torch.ones(2, 2)}}, path)
    else:
        torch.save(flat, path)
    backbone = build_backbone("clip", "tiny", ip_adapter=str(path))
    assert backbone.tokens == 4 and backbone.feature_dim == 24
    x = _images(2, 3, 50, 70)
    pooled = build_backbone("clip", "tiny")(x)
    torch.testing.assert_close(backbone(x), proj(pooled))


def test_ip_adapter_projection_width_mismatch_names_both_widths(tmp_path):
    _, state = _projection_state(in_dim=1024)
    safetensors.torch.save_file(state, tmp_path / "p.safetensors")
    with pytest.raises(OpadError, match="takes 1024-wide image embeddings but the clip backbone gives 32"):
        build_backbone("clip", "tiny", ip_adapter=str(tmp_path / "p.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(OpadError, match="could not read the IP-Adapter projection"):
        build_backbone("clip", "tiny", ip_adapter=str(tmp_path / "junk.safetensors"))
    with pytest.raises(OpadError, match="applies to the clip backbone, not dino_v1"):
        build_backbone("dino_v1", "tiny", ip_adapter="tiny")


def test_ip_adapter_image_encoder_folder_in_transformers_format(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=24)
    model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(tmp_path / "image_encoder")
    backbone = build_backbone("clip", str(tmp_path / "image_encoder"))
    assert backbone.input_size == 56 and backbone.feature_dim == 24
    x = _images(2, 3, 90, 90)
    pixels = (F.interpolate(x, size=(56, 56), mode="bilinear", antialias=True) - backbone.mean) / backbone.std
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), model(pixel_values=pixels).image_embeds)


def test_cosine_distance_per_token():
    a, b = torch.randn(3, 4 * 5), torch.randn(3, 4 * 5)
    by_hand = torch.stack([
        torch.stack([1 - F.cosine_similarity(a[i, 5 * k : 5 * k + 5], b[i, 5 * k : 5 * k + 5], dim=0)
                     for k in range(4)]).mean() for i in range(3)])
    torch.testing.assert_close(cosine_distance(a, b, tokens=4), by_hand)
    torch.testing.assert_close(cosine_distance(a, b), 1 - F.cosine_similarity(a, b, dim=1))


HUB_SCRIPT = textwrap.dedent("""
    import sys
    from opad.backbones import build_backbone
    from opad.errors import OpadError
    name, kw = sys.argv[1], eval(sys.argv[2])
    try:
        build_backbone(name, kw.pop("source", "hub"), **kw)
    except OpadError as e:
        print(e)
""")


@pytest.mark.parametrize("name, kw, words", [
    ("clip", {}, ["open_clip ViT-H-14 pretrained 'laion2b_s32b_b79k'",
                  "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "--backbone-weights clip=FILE"]),
    ("dino_v2", {}, ["timm 'vit_large_patch14_dinov2.lvd142m'", "--backbone-weights dino_v2=FILE"]),
    ("dino_v1", {}, ["timm 'vit_small_patch16_224.dino'"]),
    ("clip", {"source": "tiny", "ip_adapter": "hub"}, ["h94/IP-Adapter models/ip-adapter_sd15.safetensors",
                                                       "--ip-adapter FILE"]),
])
def test_hub_without_network_names_what_it_would_download(name, kw, words):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", HUB_SCRIPT, name, repr(kw)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert time.perf_counter() - start < 60
    message = r.stdout.strip()
    assert message.startswith("could not download") and len(message.splitlines()) == 1, r.stdout + r.stderr
    for w in words:
        assert w in message, message


# Full size, random local weights of the paper's default architectures (2.5 GB / 1.2 GB in fp32).
# Measured on this 2-core CPU (2026-11-25): 24 s and 5.7 GB peak RSS for ViT-H/14, 21 s and 3.2 GB
# for DINOv2 ViT-L/14 (each including writing the file) -- under a minute, so they run in CI.
def test_default_clip_vit_h14_from_a_local_visual_only_file(tmp_path):
    from opad.backbones import _clip_vision_tower

    path = tmp_path / "vit_h14_visual.safetensors"
    visual = _clip_vision_tower("ViT-H-14")
    safetensors.torch.save_file({k: v.contiguous() for k, v in visual.state_dict().items()}, path)
    del visual
    backbone = build_backbone("clip", str(path))
    assert backbone.input_size == 224
    with torch.no_grad():
        assert backbone(_images(1, 3, 512, 512)).shape == (1, 1024)


def test_default_dinov2_large_from_a_local_file(tmp_path):
    import timm

    path = tmp_path / "dinov2_l14.safetensors"
    model = timm.create_model("vit_large_patch14_dinov2.lvd142m", pretrained=False, num_classes=0)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    del model
    backbone = build_backbone("dino_v2", str(path))
    assert backbone.input_size == 518
    with torch.no_grad():
        assert backbone(_images(1, 3, 512, 512)).shape == (1, 1024)
