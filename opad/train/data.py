"""Training data: the subject's photos, prompt templates and Custom Diffusion's augmentations.

All randomness comes from one ``torch.Generator`` owned by the caller, so a run is reproducible
and resumable bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from opad.errors import OpadError, warn

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

# Textual Inversion's 27 "a photo of a {}" templates, as Custom Diffusion and the release use.
TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
]
# The release drops the two "close-up" templates when it augments (train_opad.py L407, L473).
RELEASE_TEMPLATES = [t for t in TEMPLATES if "close" not in t]
FAR_HINTS, NEAR_HINTS = ("a far away", "very small"), ("zoomed in", "close up")


MAX_ASPECT = 2.5  # beyond this a centre crop keeps less than 40% of the photo: warn


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode; transparency is composited onto white, 16/32-bit grey scaled (not clipped)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # PIL's convert("RGB") clips these to 0..255: white
        peak = max(65535, img.getextrema()[1])  # 16-bit range (a 32-bit "I" image beyond it: its own max)
        grey = (np.asarray(img, dtype=np.float64) / peak * 255).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def image_files(folder: Path) -> list[Path]:
    """The image files of ``folder``; other entries with an image suffix (folders, pipes, broken links)
    are skipped with a warning: opening a FIFO would wait forever."""
    files = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
            continue
        if p.is_file():
            files.append(p)
        else:
            warn(f"skipping {str(p)!r}: not a regular file")
    return files


def read_image(path: Path) -> Image.Image:
    """One photo as RGB, upright (EXIF orientation applied); warns about animations (first frame used)."""
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                warn(f"{str(path)!r} is animated ({im.n_frames} frames); using its first frame")
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as e:
        raise OpadError(f"image {str(path)!r} is too large to open safely ({e})") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise OpadError(f"could not read image {str(path)!r}: it is corrupt or not an image ({e})") from e


def _listed_images(folder: str | os.PathLike, what: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise OpadError(f"{what} folder not found: {str(folder)!r}")
    files = image_files(folder)
    if not files:
        raise OpadError(f"{what} folder {str(folder)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_images(folder: str | os.PathLike, what: str = "instance") -> list[tuple[Path, Image.Image]]:
    """Every image in ``folder``, decoded: the trainer reads them before anything is loaded or cached,
    so a bad photo costs seconds (the size checks wait for the resolution, which comes with the model)."""
    return [(path, read_image(path)) for path in _listed_images(folder, what)]


def load_images(folder: str | os.PathLike, resolution: int, *, allow_upscale: bool, what: str = "instance",
                crop: str = "center") -> list[Tensor]:
    """Every image in ``folder`` as :func:`square_images` makes it."""
    return square_images(read_images(folder, what), resolution, allow_upscale=allow_upscale, crop=crop)


def square_images(photos: list[tuple[Path, Image.Image]], resolution: int, *, allow_upscale: bool,
                  crop: str = "center") -> list[Tensor]:
    """Each photo as a square (3, S, S) float tensor in [0, 1], S >= ``resolution``.

    Images are centre-cropped (or, ``crop="stretch"``, squeezed) to a square and kept at up to 1.4x
    the resolution (the largest zoom of the scale augmentation). Errors name the file and the problem.
    """
    keep = round(1.4 * resolution)
    images = []
    for path, img in photos:
        w, h = img.size
        if min(w, h) < resolution and not allow_upscale:
            raise OpadError(
                f"image {str(path)!r} is {w}x{h}, smaller than the training resolution {resolution}; "
                "use larger photos, a lower --resolution, or pass --allow-upscale"
            )
        if max(w, h) > MAX_ASPECT * min(w, h):
            kept = "squeezed" if crop == "stretch" else f"the centre crop keeps {min(w, h) / max(w, h):.0%} of it"
            warn(f"{str(path)!r} is {w}x{h}, an extreme aspect ratio: {kept}")
        side = min(w, h)
        if crop == "stretch":  # the release resizes the whole photo to a square (train_opad.py L310)
            img = img.resize((side, side), Image.Resampling.BICUBIC)
        else:
            img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        target = min(max(side, resolution), keep)
        if target != side:
            img = img.resize((target, target), Image.Resampling.BICUBIC)
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
    return images


@dataclass
class Batch:
    pixels: Tensor  # (B, 3, R, R) in [-1, 1]
    masks: Tensor  # (B, 1, R/f, R/f) at latent resolution: where the loss counts
    prompts: list[str]


def _randint(low: int, high: int, g: torch.Generator) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _choice(options: list, g: torch.Generator):
    return options[_randint(0, len(options) - 1, g)]


def _resize(img: Tensor, size: int) -> Tensor:
    return F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def with_hint(prompt: str, hint: str, style: str) -> str:
    """Custom Diffusion prefixes the scale hint; the release inserts it as the second word (L482)."""
    if style == "release":
        words = prompt.split()
        return " ".join([*words[:1], hint, *words[1:]])
    return f"{hint} {prompt}"


def augment(
    img: Tensor, prompt: str, resolution: int, latent_factor: int, g: torch.Generator, *, flip: bool, scale_aug: bool,
    prompt_style: str = "custom_diffusion",
) -> tuple[Tensor, Tensor, str]:
    """Custom Diffusion's augmentation on one square image in [0, 1].

    With scale augmentation the subject is shrunk onto a mid-grey canvas (0 in [-1, 1], as in
    Custom Diffusion and the release; 2/3 of the time, prompt hint "a far away" / "very small"
    when small) or enlarged and cropped ("zoomed in" / "close up"); the loss mask covers only the
    pasted region.
    """
    if flip and float(torch.rand((), generator=g)) < 0.5:
        img = img.flip(-1)
    scale = resolution
    if scale_aug:
        if float(torch.rand((), generator=g)) < 0.66:
            scale = _randint(resolution // 3, resolution, g)
        else:
            scale = _randint(int(1.2 * resolution), int(1.4 * resolution), g)
    img = _resize(img, scale)
    lat = resolution // latent_factor
    mask = torch.ones(1, lat, lat)
    if scale > resolution:
        top, left = _randint(0, scale - resolution, g), _randint(0, scale - resolution, g)
        out = img[:, top : top + resolution, left : left + resolution]
        prompt = with_hint(prompt, _choice(list(NEAR_HINTS), g), prompt_style)
    elif scale < resolution:
        top, left = _randint(0, resolution - scale, g), _randint(0, resolution - scale, g)
        out = torch.full((3, resolution, resolution), 0.5)
        out[:, top : top + scale, left : left + scale] = img
        mask = torch.zeros(1, lat, lat)
        # the latent cells fully inside the pasted image
        mask[:, top // latent_factor + 1 : (top + scale) // latent_factor - 1,
             left // latent_factor + 1 : (left + scale) // latent_factor - 1] = 1
        if mask.sum() == 0:  # too small for any whole cell: count the cells it touches
            mask[:, top // latent_factor : -(-(top + scale) // latent_factor),
                 left // latent_factor : -(-(left + scale) // latent_factor)] = 1
        if scale < 0.6 * resolution:
            prompt = with_hint(prompt, _choice(list(FAR_HINTS), g), prompt_style)
    else:
        out = img
    return out, mask, prompt


class ConceptData:
    """Draws augmented batches of (photo, prompt) for the subject; optional class-prior images.

    ``sampling="random"`` draws the photo and the template of each item independently;
    ``"epoch"`` walks all (photo, template) pairs in an order reshuffled every epoch, as the
    release's DataLoader does (L1732). Its position is ``cursor``, saved with checkpoints.
    """

    def __init__(
        self,
        images: list[Tensor],
        subject: str,
        resolution: int,
        latent_factor: int,
        *,
        flip: bool = True,
        scale_aug: bool = True,
        prompt_style: str = "custom_diffusion",
        sampling: str = "random",
        seed: int = 0,
    ) -> None:
        self.images = images
        self.subject = subject  # "<new1> dog"
        self.resolution = resolution
        self.latent_factor = latent_factor
        self.flip = flip
        self.scale_aug = scale_aug
        self.prompt_style = prompt_style
        self.templates = RELEASE_TEMPLATES if prompt_style == "release" and scale_aug else TEMPLATES
        self.sampling = sampling
        self.seed = seed
        self.cursor = 0  # items drawn so far ("epoch" sampling)

    def prompt(self, g: torch.Generator) -> str:
        return _choice(self.templates, g).format(self.subject)

    def _next_pair(self, g: torch.Generator) -> tuple[int, str]:
        """(photo index, prompt) of the next item."""
        if self.sampling == "epoch":
            pairs = len(self.images) * len(self.templates)
            epoch, pos = divmod(self.cursor, pairs)
            order = torch.randperm(pairs, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            image, template = divmod(int(order[pos]), len(self.templates))
            self.cursor += 1
            return image, self.templates[template].format(self.subject)
        return _randint(0, len(self.images) - 1, g), self.prompt(g)

    def sample(self, batch_size: int, g: torch.Generator) -> Batch:
        pixels, masks, prompts = [], [], []
        for _ in range(batch_size):
            index, prompt = self._next_pair(g)
            out, mask, prompt = augment(self.images[index], prompt, self.resolution, self.latent_factor, g,
                                        flip=self.flip, scale_aug=self.scale_aug, prompt_style=self.prompt_style)
            pixels.append(out)
            masks.append(mask)
            prompts.append(prompt)
        return Batch(torch.stack(pixels) * 2 - 1, torch.stack(masks), prompts)

    def real_images(self, batch_size: int, g: torch.Generator) -> Tensor:
        """Photos for the discriminators' "real" side: flipped and resized, not scale-augmented."""
        out = []
        for _ in range(batch_size):
            img = self.images[_randint(0, len(self.images) - 1, g)]
            if self.flip and float(torch.rand((), generator=g)) < 0.5:
                img = img.flip(-1)
            out.append(_resize(img, self.resolution))
        return torch.stack(out)
