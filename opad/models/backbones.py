"""Frozen image backbones for the discriminators and the identity loss, and the trainable heads.

Backbones by name, each with its own input size and normalisation:

- ``dino_v1``: timm ``vit_small_patch16_224.dino`` at 224 px, ImageNet mean/std;
- ``dino_v2``: timm ``vit_large_patch14_dinov2.lvd142m`` (the paper's; or ``vit_small_...``) at 518 px;
- ``clip``: an open_clip vision tower, by default ``ViT-H-14`` ``laion2b_s32b_b79k`` (the image
  encoder IP-Adapter ships, as in the release) at 224 px, OpenAI CLIP mean/std; optionally followed
  by IP-Adapter's image projection (4 tokens), whose per-token cosine is the identity feature.

Weights come from a local file, a model folder that carries its own input size and normalisation
(for dino_v1/dino_v2 timm's, ``config.json`` + ``model.safetensors``; for clip a transformers
``CLIPVisionModelWithProjection`` or ``CLIPModel`` folder such as IP-Adapter's ``models/image_encoder``;
the mini world ships one of each family at 64 px), from the hub only when asked (``hub`` /
``hub:TAG``), or, for the tiny preset, are random tiny models of the same families (``tiny``).

Resizing to the input size is bilinear with antialiasing by default; ``area`` is the release's for
its discriminators and ``bilinear`` (no antialiasing) its identity input. ``normalize=False`` feeds
the release's raw ``x * 2 - 1`` instead of the mean/std normalisation. Resizing and normalising
is the fused feature pass (opad/kernels/feature_pass.py): :func:`backbone_features` makes every backbone's
input from one image in one op, then runs the encoders, on their own CUDA streams on a GPU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import open_clip
import safetensors.torch
import timm
import torch
from torch import Tensor, nn

from opad.config import RESIZE_MODES
from opad.errors import OpadError, first_line
from opad.kernels.feature_pass import BackboneInput, feature_pass

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


class FrozenBackbone(nn.Module):
    """Resize + normalise images on the [0, 1] scale, then a frozen encoder's feature (B, D).

    The input is never clamped: the trainer feeds the raw decoder output, which overshoots [0, 1],
    and every pixel must keep its gradient. ``tokens`` is how many equal-size tokens the feature
    is made of (4 with IP-Adapter's projection), for the per-token identity cosine.
    """

    def __init__(self, name: str, encoder: nn.Module, input_size: int, mean, std, *, normalize: bool = True,
                 resize: str = "antialias", projection: ImageProjection | None = None) -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise OpadError(f"unknown resize mode {resize!r}; choose from {', '.join(RESIZE_MODES)}")
        self.name = name
        self.encoder = encoder.eval().requires_grad_(False)
        self.projection = projection.eval().requires_grad_(False) if projection is not None else None
        self.input_size = input_size
        self.normalize = normalize
        self.resize = resize
        self.tokens = projection.tokens if projection is not None else 1
        self._feature_dim = projection.tokens * projection.token_dim if projection is not None else _width(encoder)
        self.mean_std = (tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def train(self, mode: bool = True) -> "FrozenBackbone":
        return super().train(False)  # always in eval mode

    @property
    def feature_dim(self) -> int:
        """Width D of the feature; read from the model (a forward pass only for unknown encoders)."""
        if self._feature_dim is None:
            with torch.no_grad():
                device = next(self.encoder.parameters()).device
                self._feature_dim = self(torch.zeros(1, 3, 8, 8, device=device)).shape[1]
        return self._feature_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the encoder's blocks in backward instead of keeping their activations (timm and open_clip
        encoders; transformers' checkpoints only in training mode, so a frozen one is left as it is)."""
        if hasattr(self.encoder, "set_grad_checkpointing"):
            self.encoder.set_grad_checkpointing(enable)

    def input_spec(self, resize: str | None = None) -> BackboneInput:
        """What this backbone's input is made of; ``resize`` overrides the default mode."""
        mean, std = self.mean_std if self.normalize else (None, None)  # release: raw [-1, 1]
        return BackboneInput(self.input_size, resize or self.resize, mean, std)

    def encode(self, inputs: Tensor) -> Tensor:
        """Prepared inputs (see :meth:`input_spec`) -> (B, D) float32 features."""
        features = self.encoder(inputs.to(next(self.encoder.parameters()).dtype)).float()
        return self.projection(features) if self.projection is not None else features

    def forward(self, images: Tensor, resize: str | None = None) -> Tensor:
        """(B, 3, H, W) images, nominally [0, 1] -> (B, D) float32; ``resize`` overrides the default mode."""
        return self.encode(feature_pass(images, [self.input_spec(resize)])[0])


def backbone_features(images: Tensor, uses: Sequence[tuple[FrozenBackbone, str | None]]) -> list[Tensor]:
    """Features of one image batch for each (backbone, resize override) in ``uses``.

    One fused pass makes every input (and its backward sums every input gradient in one write);
    on a GPU each encoder then runs on its own CUDA stream, so small backbones overlap.
    """
    inputs = feature_pass(images, [backbone.input_spec(resize) for backbone, resize in uses])
    if images.device.type != "cuda" or len(uses) < 2:
        return [backbone.encode(x) for (backbone, _), x in zip(uses, inputs)]
    main = torch.cuda.current_stream(images.device)
    streams = _side_streams(images.device, len(uses))
    features = []
    for (backbone, _), x, stream in zip(uses, inputs, streams):
        stream.wait_stream(main)  # the fused inputs were written on the main stream
        with torch.cuda.stream(stream):
            x.record_stream(stream)  # made on main, read here: not to be reused before this stream is done
            features.append(backbone.encode(x))
    for stream, f in zip(streams, features):
        main.wait_stream(stream)
        f.record_stream(main)  # made here, read on main from now on
    return features  # autograd runs each encoder's backward on the stream of its forward


_STREAMS: dict[torch.device, list[torch.cuda.Stream]] = {}


def _side_streams(device: torch.device, n: int) -> list[torch.cuda.Stream]:
    """``n`` CUDA streams kept for the process (a stream per call would leak driver objects)."""
    pool = _STREAMS.setdefault(device, [])
    while len(pool) < n:
        pool.append(torch.cuda.Stream(device))
    return pool[:n]


class _TransformersVision(nn.Module):
    """A transformers ``CLIPVisionModelWithProjection`` as a plain encoder: pixels -> image_embeds."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model(pixel_values=pixels).image_embeds


def _width(encoder: nn.Module) -> int | None:
    """The pooled feature width of an open_clip, timm or transformers encoder (None if unknown)."""
    if isinstance(encoder, _TransformersVision):
        return encoder.model.config.projection_dim
    width = getattr(encoder, "output_dim", None) or getattr(encoder, "head_hidden_size", None)  # open_clip / timm
    return width if isinstance(width, int) else None


# ---------------------------------------------------------------------------- reading weights
def _read_state_dict(path: str, prefix: str = "") -> dict[str, Tensor]:
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


def _offline_error(what: str, target: str, flag: str, error: Exception) -> OpadError:
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
        raise _offline_error(f"the {name} backbone", f"timm {timm_name!r} (hf-hub:{cfg.hf_hub_id})",
                             flag or f"--backbone-weights {name}=FILE", e) from e


def _timm_encoder(name: str, timm_name: str, source: str, seed: int, flag: str | None = None) -> nn.Module:
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


def _clip_vision_tower(arch: str, quick_gelu: bool | None = None) -> nn.Module:
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
    state = _read_state_dict(path, prefix="visual.")
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    with torch.device("meta"):
        visual = _clip_vision_tower(arch, quick_gelu)
    visual.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*visual.named_parameters(), *visual.named_buffers()] if t.is_meta]
    if left:  # a buffer the checkpoint does not hold (none in open_clip's ViTs today)
        raise ValueError(f"the checkpoint leaves {', '.join(left[:3])} unset")
    return visual.float()


def _clip_encoder(arch: str, source: str, seed: int) -> tuple[nn.Module, int, Sequence[float], Sequence[float]]:
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
        return (_TransformersVision(model), model.config.image_size, norm.get("image_mean", openai[0]),
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
            raise _offline_error("the clip backbone", f"open_clip {arch} pretrained {tag!r} ({where})",
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
def _ip_adapter_projection(source: str, in_dim: int, seed: int) -> ImageProjection:
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
            raise _offline_error("IP-Adapter's image projection", f"{IP_ADAPTER_HUB[0]} {IP_ADAPTER_HUB[1]}",
                                 "--ip-adapter FILE", e) from e
    if not Path(source).is_file():
        raise OpadError(f"IP-Adapter projection file not found: {source!r}")
    try:
        state = _read_state_dict(source, prefix="image_proj.")
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


# ---------------------------------------------------------------------------- the entry point
def build_backbone(
    name: str, source: str, *, dino_v2_size: str = "large", clip_arch: str = "ViT-H-14", normalize: bool = True,
    resize: str = "antialias", ip_adapter: str | None = None, seed: int = 0,
) -> FrozenBackbone:
    """A frozen backbone; ``source`` is ``tiny``, ``hub`` / ``hub:TAG``, a weights file or (clip) a
    transformers folder; ``ip_adapter`` (clip only) adds IP-Adapter's image projection."""
    if name not in ("dino_v1", "dino_v2", "clip"):
        raise OpadError(f"unknown backbone {name!r}; choose from dino_v1, dino_v2, clip")
    if ip_adapter is not None and name != "clip":
        raise OpadError(f"the IP-Adapter projection applies to the clip backbone, not {name}")
    if resize not in RESIZE_MODES:  # before loading any weights
        raise OpadError(f"unknown resize mode {resize!r}; choose from {', '.join(RESIZE_MODES)}")
    local = source not in ("tiny",) and not source.startswith("hub")
    if local and not (Path(source).is_file() or Path(source).is_dir()):
        raise OpadError(f"{name} backbone weights file not found: {source!r}")
    if local and Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise OpadError(f"{name} backbone folder {source!r} has no config.json: not a "
                        f"{'transformers CLIP' if name == 'clip' else 'timm'} model folder")
    projection = None
    try:
        if name == "clip":
            encoder, size, mean, std = _clip_encoder(clip_arch, source, seed)
        else:
            if name == "dino_v2" and ("dino_v2", dino_v2_size) not in TIMM_NAMES:
                raise OpadError(f"unknown DINOv2 size {dino_v2_size!r} (--dino-v2-size); choose small or large")
            timm_name = TIMM_NAMES["dino_v1"] if name == "dino_v1" else TIMM_NAMES[("dino_v2", dino_v2_size)]
            encoder = _timm_encoder(name, timm_name, source, seed)
            if Path(source).is_dir():  # a timm model folder (the mini world's): its own input size and normalisation
                cfg = encoder.pretrained_cfg
                size, mean, std = cfg["input_size"][-1], cfg["mean"], cfg["std"]
            else:
                size, mean, std = (224 if name == "dino_v1" else 518), IMAGENET_MEAN, IMAGENET_STD
        if ip_adapter is not None:
            pooled = FrozenBackbone(name, encoder, size, mean, std).feature_dim
            projection = _ip_adapter_projection(ip_adapter, pooled, seed)
    except OpadError:
        raise
    except Exception as e:  # noqa: BLE001 - timm/open_clip/transformers raise many types for a bad file
        first = first_line(e, 300)
        raise OpadError(f"could not load the {name} backbone from {source!r}: {first}") from e
    return FrozenBackbone(name, encoder, size, mean, std, normalize=normalize, resize=resize, projection=projection)


class DiscriminatorHead(nn.Module):
    """The release's head on a pooled feature: Linear(d, 512) - ReLU - Linear(512, 1)."""

    def __init__(self, feature_dim: int, hidden: int = 512, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # each head's init is its own: removing one leaves the others equal
            self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)
