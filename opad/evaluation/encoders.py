"""The image and text encoders the DreamBench metrics score with, each with the common protocol's
preprocessing.

- DINO: timm ``vit_small_patch16_224.dino`` (ViT-S/16), the CLS embedding; images resized to 256
  (bicubic), centre-cropped to 224, ImageNet mean/std. Or a timm model folder with its own input
  size and normalisation: the mini world's held-out evaluation encoder.
- CLIP: open_clip ``ViT-B-32`` by default (``ViT-L-14`` and others selectable), image and text
  embeddings, with open_clip's own evaluation transform for the architecture.

Weights come from a local file, from the hub only when asked (``hub`` / ``hub:TAG``), or ``tiny``:
random tiny models of the same families for tests, whose numbers are not comparable with anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from torchvision import transforms as T

from opad.errors import OpadError, first_line
from opad.fsutil import file_hash
from opad.models.towers import IMAGENET_MEAN, IMAGENET_STD, offline_error, timm_encoder

DINO_TIMM = "vit_small_patch16_224.dino"
CLIP_DEFAULT_ARCH = "ViT-B-32"
BATCH = 16


def _source_id(source: str) -> str:
    """What identifies the weights in a manifest and the embedding cache: a hub id, or the hash of the
    file (of a timm model folder's weights file)."""
    if source == "tiny" or source.startswith("hub"):
        return source
    path = Path(source)
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not (path / "config.json").is_file() or not weights:
            raise OpadError(f"{source!r} is not a timm model folder (config.json and a weights file)")
        path = weights[0]
    if not path.is_file():
        raise OpadError(f"weights file not found: {source!r}")
    return f"sha256:{file_hash(path)[:16]}"


class Encoder:
    """Embeddings of PIL images (and, for CLIP, of prompts) as float32 numpy rows."""

    name: str
    model_id: str  # the architecture and its weights, for manifests and the cache
    comparable: bool  # False for tiny random models
    device = torch.device("cpu")

    def to(self, device: torch.device) -> Encoder:
        self.model.to(device)
        self.device = device
        return self

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> np.ndarray:
        rows = []
        for start in range(0, len(images), BATCH):
            batch = torch.stack([self.transform(im) for im in images[start:start + BATCH]]).to(self.device)
            rows.append(self._embed_images(batch).float().cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


class DinoEncoder(Encoder):
    name = "dino"

    def __init__(self, source: str, seed: int = 0) -> None:
        self.model_id = f"timm:{DINO_TIMM}@{_source_id(source)}"
        self.comparable = source != "tiny"
        try:  # the backbones' timm loader: random tiny, hub (downloads) or a file
            model = timm_encoder("dino", DINO_TIMM, source, seed, flag="--dino-weights FILE")
        except (RuntimeError, ValueError, OSError) as e:
            raise OpadError(f"--dino-weights {source}: not a {DINO_TIMM} checkpoint ({first_line(e)})") from e
        self.model = model.eval()
        if Path(source).is_dir():  # a timm model folder (the mini world's): its own size and normalisation
            cfg = model.pretrained_cfg
            size, mean, std = cfg["input_size"][-1], cfg["mean"], cfg["std"]
            self.model_id = self.model_id.replace(DINO_TIMM, cfg["architecture"], 1)  # the folder's own architecture
            self.transform = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                                        T.ToTensor(), T.Normalize(mean, std)])
        else:  # the common protocol's 256 -> 224 centre crop
            self.transform = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                                        T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def _embed_images(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch)  # num_classes=0 with token pooling: the CLS embedding after the last norm


class ClipEncoder(Encoder):
    name = "clip"

    def __init__(self, source: str, arch: str = CLIP_DEFAULT_ARCH, seed: int = 0) -> None:
        if open_clip.get_model_config(arch) is None:
            raise OpadError(f"unknown open_clip architecture {arch!r} (--clip-arch), e.g. ViT-B-32 or ViT-L-14")
        self.model_id = f"open_clip:{arch}@{_source_id(source)}"
        self.comparable = source != "tiny"
        if source == "tiny":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                vision = dict(layers=2, width=32, head_width=16, patch_size=32, image_size=224)
                text = dict(context_length=77, vocab_size=49408, width=16, heads=2, layers=1)  # CLIP's tokenizer
                model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)
            self.transform = open_clip.image_transform(224, is_train=False)
        else:
            model, self.transform = self._load(source, arch)
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch if source != "tiny" else CLIP_DEFAULT_ARCH)

    @staticmethod
    def _load(source: str, arch: str):
        if source.startswith("hub"):
            tag = source.partition(":")[2] or "openai"
            cfg = open_clip.get_pretrained_cfg(arch, tag)
            if not cfg:
                raise OpadError(f"open_clip has no pretrained {arch!r} tagged {tag!r}; its tags: "
                                f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}")
            try:
                model, _, transform = open_clip.create_model_and_transforms(
                    arch, pretrained=tag, force_quick_gelu=bool(cfg.get("quick_gelu", False)))
            except Exception as e:  # noqa: BLE001 - network, offline mode or a hub error: say what was wanted
                raise offline_error("the CLIP metric model", f"open_clip {arch} pretrained {tag!r}",
                                     "--clip-weights FILE", e) from e
            return model, transform
        try:
            model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=source)
        except (RuntimeError, ValueError, OSError, KeyError) as e:
            raise OpadError(f"--clip-weights {source}: not an open_clip {arch} checkpoint ({first_line(e)})") from e
        return model, transform

    def _embed_images(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(batch)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> np.ndarray:
        if not prompts:
            return np.zeros((0, 0), np.float32)
        return self.model.encode_text(self.tokenizer(prompts).to(self.device)).float().cpu().numpy()


class WorldClipEncoder(Encoder):
    """The mini world's clip-family model (a transformers ``CLIPModel`` on 64 px scenes, both towers):
    the CLIP-I and CLIP-T analogues on the world. Its numbers compare runs on the world with each other,
    never with open_clip's on real photos."""

    name = "clip"
    comparable = True

    def __init__(self, folder: str | Path) -> None:
        from transformers import CLIPModel

        from opad.models.quiet import quiet_transformers

        folder = Path(folder)
        weights = folder / "model.safetensors"
        if not (folder / "config.json").is_file() or not weights.is_file():
            raise OpadError(f"--clip-weights {str(folder)!r} is not a world clip folder (config.json, model.safetensors)")
        with quiet_transformers():
            self.model = CLIPModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
        size = self.model.config.vision_config.image_size
        self.model_id = f"world-clip:{size}px@sha256:{file_hash(weights)[:16]}"
        # the world's own input range: [-1, 1] (opad.world.pool.to_model_range)
        self.transform = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                                    T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])

    def _embed_images(self, batch: torch.Tensor) -> torch.Tensor:
        from opad.world.components.clip import image_features

        return image_features(self.model, batch)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> np.ndarray:
        from opad.world.components.clip import text_features

        if not prompts:
            return np.zeros((0, 0), np.float32)
        return text_features(self.model, prompts).cpu().numpy()


WORLD = "world"  # --clip-weights / --dino-weights: the mini world's shipped clip / held-out evaluation encoder


def clip_encoder(source: str, arch: str = CLIP_DEFAULT_ARCH) -> Encoder:
    """``--clip-weights``: world (the mini world's shipped clip), a world clip folder, or open_clip's."""
    from opad.world.layout import SHIPPED

    if source == WORLD:
        return WorldClipEncoder(SHIPPED / "clip")
    if Path(source).is_dir():
        return WorldClipEncoder(source)
    return ClipEncoder(source, arch)


def dino_encoder(source: str) -> DinoEncoder:
    """``--dino-weights``: world (the mini world's held-out evaluation encoder), a timm folder, FILE, hub or tiny."""
    from opad.world.layout import SHIPPED

    return DinoEncoder(str(SHIPPED / "eval_encoder") if source == WORLD else source)

