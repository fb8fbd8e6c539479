"""Frozen backbones: resize modes, out-of-range gradients, checkpoint layouts, IP-Adapter projection,
hub names offline, and the paper's full-size default architectures from local files."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import huggingface_hub.constants
import open_clip
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from opad.errors import OpadError
from opad.kernels.feature_pass import resize_images
from opad.models.backbones import build_backbone
from opad.models.towers import ImageProjection
from opad.train.losses import cosine_distance


def _images(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny transformers ``CLIPVisionModelWithProjection`` saved as IP-Adapter's image_encoder is."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=24)
    model = CLIPVisionModelWithProjection(config).eval()
    path = tmp_path_factory.mktemp("ip") / "image_encoder"
    model.save_pretrained(path)
    return path, model


def _t(values):
    return torch.tensor(values).view(1, -1, 1, 1)


def _backbone(name, clip_folder):
    if name == "clip_folder":
        return build_backbone("clip", str(clip_folder[0]))
    return build_backbone(name, "tiny", resize="area", ip_adapter="tiny" if name == "clip" else None)


@pytest.mark.parametrize("name", ["dino_v1", "dino_v2", "clip", "clip_folder"])
def test_resize_modes_and_out_of_range_gradients(name, clip_folder):
    backbone = _backbone(name, clip_folder)
    size = backbone.input_size
    seen = []
    backbone.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    odd = _images(2, 3, 77, 91)  # awkward size: each mode is exactly F.interpolate with its settings
    settings = {"area": dict(mode="area"), "bilinear": dict(mode="bilinear", align_corners=False),
                "antialias": dict(mode="bilinear", align_corners=False, antialias=True)}
    for mode, kw in settings.items():
        expected = F.interpolate(odd, size=(size, size), **kw)
        assert resize_images(odd, size, mode).equal(expected)
        backbone(odd, resize=mode)
        # in fp64: the fused feature pass is closer to exact than F.interpolate's fp32 weights
        exact = F.interpolate(odd.double(), size=(size, size), **kw)
        exact = (exact - _t(backbone.mean_std[0]).double()) / _t(backbone.mean_std[1]).double()
        torch.testing.assert_close(seen[-1], exact.float())
    big = _images(1, 3, 1100, 1200)  # shrinking to every input size: the three modes differ
    outs = {mode: resize_images(big, size, mode) for mode in settings}
    assert (outs["area"] - outs["bilinear"]).abs().max() > 1e-2
    assert (outs["antialias"] - outs["bilinear"]).abs().max() > 1e-2
    feats = backbone(big)
    assert feats.shape == (1, backbone.feature_dim) and feats.dtype == torch.float32
    assert backbone.tokens == (4 if name == "clip" else 1)

    x = _images(1, 3, 64, 64, seed=1)  # the raw decoder output overshoots [0, 1]; nothing is clamped
    x[:, :, :16, :16] = 1.7
    x[:, :, -16:, -16:] = -0.4
    x.requires_grad_(True)
    backbone(x).square().sum().backward()
    assert x.grad[:, :, :16, :16].abs().sum() > 0 and x.grad[:, :, -16:, -16:].abs().sum() > 0


def test_default_resize_and_normalize_off_feeds_raw_signed_pixels():
    backbone = build_backbone("dino_v1", "tiny", normalize=False)
    assert backbone.resize == "antialias"
    seen = []
    backbone.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = _images(1, 3, 300, 200) * 1.4 - 0.2
    backbone(x)
    torch.testing.assert_close(seen[0], (resize_images(x.double(), 224, "antialias") * 2 - 1).float())
    with pytest.raises(OpadError, match="unknown resize mode 'nearest'"):
        build_backbone("dino_v1", "tiny", resize="nearest")


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
    elif layout == "nested.bin":  # as ip-adapter_sd15.bin
        torch.save({"image_proj": state, "ip_adapter": {"1.to_k_ip.weight": torch.ones(2, 2)}}, path)
    else:
        torch.save(flat, path)
    backbone = build_backbone("clip", "tiny", ip_adapter=str(path))
    assert backbone.tokens == 4 and backbone.feature_dim == 24
    x = _images(2, 3, 50, 70)
    pooled = build_backbone("clip", "tiny")(x)
    out = backbone(x)
    assert out.shape == (2, 4 * 6)
    torch.testing.assert_close(out, proj(pooled))
    tokens = proj.proj(pooled).view(2, 4, 6)  # ImageProjModel: Linear, then LayerNorm per token
    torch.testing.assert_close(out, F.layer_norm(tokens, (6,), proj.norm.weight, proj.norm.bias).flatten(1))


def test_ip_adapter_projection_errors(tmp_path):
    _, state = _projection_state(in_dim=1024)
    safetensors.torch.save_file(state, tmp_path / "p.safetensors")
    with pytest.raises(OpadError, match="takes 1024-wide image embeddings but the clip backbone gives 32") as e:
        build_backbone("clip", "tiny", ip_adapter=str(tmp_path / "p.safetensors"))
    assert "\n" not in str(e.value)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(OpadError, match="could not read the IP-Adapter projection") as e:
        build_backbone("clip", "tiny", ip_adapter=str(tmp_path / "junk.safetensors"))
    assert "\n" not in str(e.value)
    safetensors.torch.save_file({"other.weight": torch.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(OpadError, match="is not an IP-Adapter image projection: no proj.weight"):
        build_backbone("clip", "tiny", ip_adapter=str(tmp_path / "other.safetensors"))
    with pytest.raises(OpadError, match="applies to the clip backbone, not dino_v1"):
        build_backbone("dino_v1", "tiny", ip_adapter="tiny")


def test_clip_image_encoder_folder_in_transformers_format(clip_folder, tmp_path):
    path, model = clip_folder
    backbone = build_backbone("clip", str(path), ip_adapter="tiny")
    assert backbone.input_size == 56 and backbone.feature_dim == 4 * 8 and backbone.tokens == 4
    pooled = build_backbone("clip", str(path))
    assert pooled.feature_dim == 24
    x = _images(2, 3, 90, 90)
    pixels = (F.interpolate(x, size=(56, 56), mode="bilinear", antialias=True) - _t(pooled.mean_std[0])) / _t(pooled.mean_std[1])
    with torch.no_grad():
        torch.testing.assert_close(pooled(x), model(pixel_values=pixels).image_embeds)
    model.half().save_pretrained(tmp_path / "fp16")  # as IP-Adapter ships it; loaded in float32
    model.float()
    assert all(p.dtype == torch.float32 for p in build_backbone("clip", str(tmp_path / "fp16")).parameters())


@pytest.fixture
def tiny_clip_arch(tmp_path):
    """A tiny architecture added to open_clip's own registry, to write real checkpoints of it."""
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                           "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "opad-test-tiny-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "opad-test-tiny-vit.json")
    return "opad-test-tiny-vit"


@pytest.mark.parametrize("layout", ["full.bin", "full.safetensors", "visual.safetensors", "visual-prefixed.bin"])
def test_clip_checkpoint_layouts(tmp_path, tiny_clip_arch, layout):
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip_arch).eval()
    full = {k: v.contiguous() for k, v in model.state_dict().items()}
    state = {"full": full, "visual": {k: v for k, v in model.visual.state_dict().items()},
             "visual-prefixed": {k: v for k, v in full.items() if k.startswith("visual.")}}[layout.split(".")[0]]
    path = tmp_path / f"clip.{layout.split('.')[1]}"
    safetensors.torch.save_file(state, path) if path.suffix == ".safetensors" else torch.save(state, path)
    backbone = build_backbone("clip", str(path), clip_arch=tiny_clip_arch)
    assert backbone.input_size == 32 and backbone.feature_dim == 16
    x = _images(2, 3, 40, 40)
    with torch.no_grad():
        mean, std = _t(open_clip.OPENAI_DATASET_MEAN), _t(open_clip.OPENAI_DATASET_STD)
        torch.testing.assert_close(backbone(x), model.visual((resize_images(x, 32, "antialias") - mean) / std))
    x.requires_grad_(True)  # weights assigned from the file: still frozen, the image still gets its gradient
    backbone(x * 1.5 - 0.25).sum().backward()
    assert x.grad.abs().sum() > 0 and not any(p.requires_grad for p in backbone.parameters())
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "wrong.bin")
    with pytest.raises(OpadError, match="could not load the clip backbone from") as e:
        build_backbone("clip", str(tmp_path / "wrong.bin"), clip_arch=tiny_clip_arch)
    assert "\n" not in str(e.value)


def test_cosine_distance_per_token():
    a, b = torch.randn(3, 4 * 5), torch.randn(3, 4 * 5)
    by_hand = torch.stack([
        torch.stack([1 - F.cosine_similarity(a[i, 5 * k : 5 * k + 5], b[i, 5 * k : 5 * k + 5], dim=0)
                     for k in range(4)]).mean() for i in range(3)])
    torch.testing.assert_close(cosine_distance(a, b, tokens=4), by_hand)
    assert cosine_distance(a, b).equal(1 - F.cosine_similarity(a, b, dim=1))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 in this process (huggingface_hub read the variable at import, so its constant
    is set too), an empty cache, and a record of any socket connection attempted (there must be none)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network use in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.mark.parametrize("name, kw, words", [
    ("clip", {}, ["open_clip ViT-H-14 pretrained 'laion2b_s32b_b79k'",
                  "(hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K)", "--backbone-weights clip=FILE"]),
    ("clip", {"clip_arch": "ViT-B-16"}, ["open_clip ViT-B-16 pretrained 'openai'",
                                         "(hf-hub:timm/vit_base_patch16_clip_224.openai)"]),
    ("dino_v2", {}, ["timm 'vit_large_patch14_dinov2.lvd142m'",
                     "(hf-hub:timm/vit_large_patch14_dinov2.lvd142m): offline mode (HF_HUB_OFFLINE=1)",
                     "--backbone-weights dino_v2=FILE"]),
    ("dino_v2", {"dino_v2_size": "small"}, ["timm 'vit_small_patch14_dinov2.lvd142m'"]),
    ("dino_v1", {}, ["timm 'vit_small_patch16_224.dino' (hf-hub:timm/vit_small_patch16_224.dino)"]),
    ("clip", {"source": "tiny", "ip_adapter": "hub"}, ["h94/IP-Adapter models/ip-adapter_sd15.safetensors",
                                                       "--ip-adapter FILE"]),
])
def test_hub_offline_names_what_it_would_download(offline, name, kw, words):
    start = time.perf_counter()
    with pytest.raises(OpadError) as e:
        build_backbone(name, kw.pop("source", "hub"), **kw)
    assert time.perf_counter() - start < 5  # fails before building any model
    message = str(e.value)
    assert message.startswith("could not download") and "\n" not in message
    for w in words:
        assert w in message, message
    assert offline == []


def test_hub_unknown_tags_are_named(offline):
    with pytest.raises(OpadError, match="open_clip has no pretrained 'ViT-H-14' tagged 'nope'; its tags: .*laion2b"):
        build_backbone("clip", "hub:nope")
    with pytest.raises(OpadError, match="timm has no hub weights 'vit_large_patch14_dinov2.nope'; its tags: lvd142m"):
        build_backbone("dino_v2", "hub:nope")


def test_hub_offline_from_the_environment_in_a_fresh_process(tmp_path):
    """The real case: HF_HUB_OFFLINE=1 set before anything is imported; fails fast, one line."""
    script = textwrap.dedent("""
        from opad.models.backbones import build_backbone
        from opad.errors import OpadError
        try:
            build_backbone("clip", "hub")
        except OpadError as e:
            print(e)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert time.perf_counter() - start < 60
    assert r.stdout.startswith("could not download the clip backbone: open_clip ViT-H-14 pretrained "
                               "'laion2b_s32b_b79k'") and len(r.stdout.strip().splitlines()) == 1, r.stdout + r.stderr


# Full size, random local weights of the paper's default architectures (2.5 GB / 1.2 GB in fp32).
# Measured on the 2-core CPU (2026-11-25): 14 s and 3.3 GB peak for ViT-H/14, 16 s and 3.2 GB for
# DINOv2 ViT-L/14, mostly writing the random file -- under a minute each, so they run in CI.
def test_default_clip_vit_h14_from_a_local_visual_only_file(tmp_path):
    from opad.models.towers import clip_vision_tower

    path = tmp_path / "vit_h14_visual.safetensors"
    visual = clip_vision_tower("ViT-H-14")
    safetensors.torch.save_file({k: v.contiguous() for k, v in visual.state_dict().items()}, path)
    del visual
    backbone = build_backbone("clip", str(path))
    assert backbone.input_size == 224 and backbone.feature_dim == 1024
    with torch.no_grad():
        assert backbone(_images(1, 3, 512, 512)).shape == (1, 1024)


def test_default_dinov2_large_from_a_local_file(tmp_path):
    import timm

    path = tmp_path / "dinov2_l14.safetensors"
    model = timm.create_model("vit_large_patch14_dinov2.lvd142m", pretrained=False, num_classes=0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, path)
    del model
    backbone = build_backbone("dino_v2", str(path))
    assert backbone.input_size == 518 and backbone.feature_dim == 1024
    # the file's weights, not a fresh init (running ViT-L/14 at 518 px cost half a minute here; the forward
    # path is the one the smaller dino_v2 models' tests run)
    loaded = dict(backbone.named_parameters())
    for key in ("cls_token", "blocks.23.mlp.fc2.weight", "norm.weight"):
        match = [v for k, v in loaded.items() if k.endswith(key)]
        assert len(match) == 1 and torch.equal(match[0].detach().float(), state[key].float()), key
