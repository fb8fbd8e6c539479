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
``hub:TAG``), or, for the tiny preset, are random tiny models of the same families (``tiny``); the towers
and their weights are :mod:`opad.models.towers`.

Resizing to the input size is bilinear with antialiasing by default; ``area`` is the release's for
its discriminators and ``bilinear`` (no antialiasing) its identity input. ``normalize=False`` feeds
the release's raw ``x * 2 - 1`` instead of the mean/std normalisation. Resizing and normalising
is the fused feature pass (opad/kernels/feature_pass.py): :func:`backbone_features` makes every backbone's
input from one image in one op, then runs the encoders, on their own CUDA streams on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from opad.config import RESIZE_MODES
from opad.errors import OpadError, first_line
from opad.kernels.feature_pass import BackboneInput, feature_pass
from opad.models.towers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TIMM_NAMES,
    ImageProjection,
    clip_encoder,
    feature_width,
    ip_adapter_projection,
    timm_encoder,
)


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
        self._feature_dim = projection.tokens * projection.token_dim if projection is not None else feature_width(encoder)
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
            encoder, size, mean, std = clip_encoder(clip_arch, source, seed)
        else:
            if name == "dino_v2" and ("dino_v2", dino_v2_size) not in TIMM_NAMES:
                raise OpadError(f"unknown DINOv2 size {dino_v2_size!r} (--dino-v2-size); choose small or large")
            timm_name = TIMM_NAMES["dino_v1"] if name == "dino_v1" else TIMM_NAMES[("dino_v2", dino_v2_size)]
            encoder = timm_encoder(name, timm_name, source, seed)
            if Path(source).is_dir():  # a timm model folder (the mini world's): its own input size and normalisation
                cfg = encoder.pretrained_cfg
                size, mean, std = cfg["input_size"][-1], cfg["mean"], cfg["std"]
            else:
                size, mean, std = (224 if name == "dino_v1" else 518), IMAGENET_MEAN, IMAGENET_STD
        if ip_adapter is not None:
            pooled = FrozenBackbone(name, encoder, size, mean, std).feature_dim
            projection = ip_adapter_projection(ip_adapter, pooled, seed)
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
