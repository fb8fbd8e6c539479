"""The pretrained vision towers behind the backbones, and where their weights come from: timm's DINO
ViTs, open_clip's (or a transformers folder's) CLIP vision tower, IP-Adapter's image projection;
from a local file or folder, from the hub only when asked (``hub`` / ``hub:TAG``), or random tiny
models of the same families (``tiny``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import open_clip
import safetensors.torch
import timm
import torch
from torch import Tensor, nn

from opad.errors import OpadError, first_line

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TIMM_NAMES = {
    "dino_v1": "vit_small_patch16_224.dino",
    ("dino_v2", "small"): "vit_small_patch14_dinov2.lvd142m",
    ("dino_v2", "large"): "vit_large_patch14_dinov2.lvd142m",
}
CLIP_DEFAULT_TAGS = {"ViT-H-14": "laion2b_s32b_b79k"}  # other architectures: "openai"
IP_ADAPTER_HUB = ("h94/IP-Adapter", "models/ip-adapter_sd15.safetensors")
_TINY_VIT = dict(embed_dim=24, depth=2, num_heads=2)


class ImageProjection(nn.Module):
    """IP-Adapter's image projection: Linear(D, T·d), then LayerNorm over each of the T tokens."""

    def __init__(self, in_dim: int, tokens: int, token_dim: int) -> None:
        super().__init__()
        self.tokens, self.token_dim = tokens, token_dim
        self.proj = nn.Linear(in_dim, tokens * token_dim)
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        return self.norm(self.proj(embeds).view(-1, self.tokens, self.token_dim)).flatten(1)


class TransformersVision(nn.Module):
    """A transformers ``CLIPVisionModelWithProjection`` as a plain encoder: pixels -> image_embeds."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model(pixel_values=pixels).image_embeds


def feature_width(encoder: nn.Module) -> int | None:
    """The pooled feature width of an open_clip, timm or transformers encoder (None if unknown)."""
    if isinstance(encoder, TransformersVision):
        return encoder.model.config.projection_dim
    width = getattr(encoder, "output_dim", None) or getattr(encoder, "head_hidden_size", None)  # open_clip / timm
    return width if isinstance(width, int) else None


# ---------------------------------------------------------------------------- reading weights
def read_state_dict(path: str, prefix: str = "") -> dict[str, Tensor]:
    """A flat tensor dict from .safetensors or a plain torch file (weights only: never unpickles code).

    With ``prefix``, a .safetensors file yields only the keys that start with it when it has any
    (ViT-H-14's visual tower without reading the 1.4 GB text tower)."""
    if path.endswith(".safetensors"):
        with safetensors.safe_open(path, framework="pt") as f:
            keys = [k for k in f.keys() if k.startswith(prefix)] or list(f.keys())
            return {k: f.get_tensor(k) for k in keys}
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError("the file holds no state dict")
    return state


def offline_error(what: str, target: str, flag: str, error: Exception) -> OpadError:
    """One line: what it would have downloaded, a short reason, and the flag that takes a local file."""
    from huggingface_hub.constants import is_offline_mode

    if is_offline_mode():
        reason = "offline mode (HF_HUB_OFFLINE=1)"
    else:
        text = " ".join(str(error).split())
        reason = f"{type(error).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}" if text \
            else type(error).__name__
    return OpadError(f"could not download {what}: {target}: {reason}; download it elsewhere and pass {flag}")


# ---------------------------------------------------------------------------- encoders
def _timm_hub_file(name: str, timm_name: str, source: str, flag: str | None = None) -> str:
    """Download timm's weights of ``timm_name`` (``hub:TAG`` swaps its pretrained tag) before building
    the model, so that an offline run fails at once; returns the local file."""
    from huggingface_hub import hf_hub_download

    tag = source.partition(":")[2]
    timm_name = f"{timm_name.split('.')[0]}.{tag}" if tag else timm_name
    try:
        cfg = timm.models.get_pretrained_cfg(timm_name, allow_unregistered=False)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None or not cfg.hf_hub_id:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(timm_name.split(".")[0] + ".*")]
        raise OpadError(f"timm has no hub weights {timm_name!r}; its tags: {', '.join(tags) or 'none'}")
    filename = cfg.hf_hub_filename or "model.safetensors"  # timm's own choice (load_state_dict_from_hf)
    try:
        return hf_hub_download(cfg.hf_hub_id, filename)
    except Exception as e:  # noqa: BLE001 - network, offline mode or a hub error: say what was wanted
        raise offline_error(f"the {name} backbone", f"timm {timm_name!r} (hf-hub:{cfg.hf_hub_id})",
                             flag or f"--backbone-weights {name}=FILE", e) from e


def timm_encoder(name: str, timm_name: str, source: str, seed: int, flag: str | None = None) -> nn.Module:
    """A timm ViT without classifier: random tiny, or with weights from the hub or a file (timm's own
    loader: it reads weights only and converts e.g. the official DINOv2 checkpoints' layout)."""
    if source == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return timm.create_model(timm_name, pretrained=False, num_classes=0, **_TINY_VIT)
    if source.startswith("hub"):
        source = _timm_hub_file(name, timm_name, source, flag)
    if Path(source).is_dir():  # timm's own model folder: config.json names the architecture and its size
        return timm.create_model(f"local-dir:{source}", pretrained=True, num_classes=0)
    return timm.create_model(timm_name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": source})


def clip_vision_tower(arch: str, quick_gelu: bool | None = None) -> nn.Module:
    """The open_clip vision tower of ``arch`` alone (random init; ViT-H-14's text tower is 1.4 GB more).

    ``quick_gelu`` overrides the architecture's activation (OpenAI's weights were trained with QuickGELU;
    open_clip's ``*-quickgelu`` architectures say so themselves)."""
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise OpadError(f"unknown open_clip architecture {arch!r} (--clip-arch), e.g. ViT-H-14 or ViT-B-16")
    vision_cfg = open_clip.model.CLIPVisionCfg(**cfg["vision_cfg"])
    quick_gelu = cfg.get("quick_gelu", False) if quick_gelu is None else quick_gelu
    return open_clip.model._build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=quick_gelu)


def _load_clip_visual(arch: str, path: str, quick_gelu: bool | None = None) -> nn.Module:
    """An open_clip checkpoint of ``arch``: a whole CLIP state dict or only its visual tower (keys
    with or without ``visual.``). The tower is built on the meta device and takes the file's tensors
    (as float32), so no random init is computed and only one copy of the weights is held."""
    state = read_state_dict(path, prefix="visual.")
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    with torch.device("meta"):
        visual = clip_vision_tower(arch, quick_gelu)
    visual.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*visual.named_parameters(), *visual.named_buffers()] if t.is_meta]
    if left:  # a buffer the checkpoint does not hold (none in open_clip's ViTs today)
        raise ValueError(f"the checkpoint leaves {', '.join(left[:3])} unset")
    return visual.float()


def clip_encoder(arch: str, source: str, seed: int) -> tuple[nn.Module, int, Sequence[float], Sequence[float]]:
    """(encoder, input size, mean, std) for the clip backbone: OpenAI CLIP's normalisation, or a
    transformers folder's own (its ``preprocessor_config.json``; the mini world's is [-1, 1])."""
    openai = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    if source == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.CLIP(
                embed_dim=32,
                vision_cfg=dict(layers=2, width=32, head_width=16, patch_size=16, image_size=224),
                text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
            )
        return model.visual, 224, *openai
    if Path(source).is_dir():  # IP-Adapter's models/image_encoder (transformers format)
        from transformers import AutoConfig, CLIPConfig, CLIPVisionModelWithProjection

        from opad.models.quiet import quiet_transformers

        # float32 as the release (util_disc.py IPAdapterDisc: dtype=torch.float32); transformers 5
        # would otherwise keep the checkpoint's dtype (IP-Adapter's image_encoder is stored in fp16)
        config = AutoConfig.from_pretrained(source, local_files_only=True)
        if isinstance(config, CLIPConfig):  # a whole CLIPModel (the mini world's): its image tower
            config.vision_config.projection_dim = config.projection_dim
            config = config.vision_config
        with quiet_transformers():  # a CLIPModel's text tower is not wanted: no table of unused weights
            model = CLIPVisionModelWithProjection.from_pretrained(source, config=config, local_files_only=True,
                                                                  dtype=torch.float32)
        processor = Path(source) / "preprocessor_config.json"  # IP-Adapter's image_encoder has none
        norm = json.loads(processor.read_text()) if processor.is_file() else {}
        return (TransformersVision(model), model.config.image_size, norm.get("image_mean", openai[0]),
                norm.get("image_std", openai[1]))
    if source.startswith("hub"):
        tag = source.partition(":")[2] or CLIP_DEFAULT_TAGS.get(arch, "openai")
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        if not cfg:
            raise OpadError(f"open_clip has no pretrained {arch!r} tagged {tag!r}; its tags: "
                            f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}")
        where = f"hf-hub:{cfg['hf_hub'].rstrip('/')}" if cfg.get("hf_hub") else cfg.get("url", "")
        try:
            path = open_clip.pretrained.download_pretrained(cfg)
        except Exception as e:  # noqa: BLE001 - network, offline mode or a hub error: say what was wanted
            raise offline_error("the clip backbone", f"open_clip {arch} pretrained {tag!r} ({where})",
                                 "--backbone-weights clip=FILE", e) from e
        if not path:
            raise OpadError(f"could not download the clip backbone: open_clip {arch} pretrained {tag!r} ({where})")
        # the tag knows whether its weights need QuickGELU (OpenAI's); open_clip's create_model only warns
        return _load_clip_visual(arch, path, cfg.get("quick_gelu", False)), _clip_input_size(arch), *openai
    return _load_clip_visual(arch, source), _clip_input_size(arch), *openai


def _clip_input_size(arch: str) -> int:
    size = open_clip.get_model_config(arch)["vision_cfg"].get("image_size", 224)
    return size if isinstance(size, int) else size[0]


# ---------------------------------------------------------------------------- IP-Adapter projection
def ip_adapter_projection(source: str, in_dim: int, seed: int) -> ImageProjection:
    """IP-Adapter's image projection from ``tiny`` (random, 4 tokens), ``hub`` or a file."""
    if source == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7)
            return ImageProjection(in_dim, tokens=4, token_dim=8)
    if source == "hub":
        from huggingface_hub import hf_hub_download

        try:
            source = hf_hub_download(*IP_ADAPTER_HUB)
        except Exception as e:  # noqa: BLE001
            raise offline_error("IP-Adapter's image projection", f"{IP_ADAPTER_HUB[0]} {IP_ADAPTER_HUB[1]}",
                                 "--ip-adapter FILE", e) from e
    if not Path(source).is_file():
        raise OpadError(f"IP-Adapter projection file not found: {source!r}")
    try:
        state = read_state_dict(source, prefix="image_proj.")
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file
        raise OpadError(f"could not read the IP-Adapter projection {source!r}: {first_line(e)}") from e
    # as util_disc.py IPAdapterDisc.load_ip_adapter_only_proj: nested (ip-adapter_sd15.bin) or flat
    # "image_proj."-prefixed keys (the .safetensors); the "ip_adapter" attention weights are not needed
    if isinstance(state.get("image_proj"), dict):
        state = state["image_proj"]
    state = {k.removeprefix("image_proj."): v for k, v in state.items() if not k.startswith("ip_adapter.")}
    need = ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
    missing = [k for k in need if k not in state]
    if missing:
        raise OpadError(f"{source!r} is not an IP-Adapter image projection: no {', '.join(missing)}")
    rows, width = state["proj.weight"].shape
    token_dim = state["norm.weight"].shape[0]
    if width != in_dim:
        raise OpadError(f"IP-Adapter projection {source!r} takes {width}-wide image embeddings but the clip "
                        f"backbone gives {in_dim}; it belongs to another image encoder "
                        "(IP-Adapter SD1.5's is ViT-H-14)")
    if rows % token_dim:
        raise OpadError(f"IP-Adapter projection {source!r}: {rows} outputs are not a whole number of "
                        f"{token_dim}-wide tokens")
    projection = ImageProjection(in_dim, rows // token_dim, token_dim)
    projection.load_state_dict({k: state[k] for k in need})
    return projection
