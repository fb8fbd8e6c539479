"""The mini world's self-supervised image encoders: the dino_v1- and dino_v2-family discriminator
backbones, and the held-out evaluation encoder that scores concept fidelity (the DINO-score analogue).

Each is a timm ViT of its family's architecture, world-sized (8x8 patches of 64x64 scenes, width 64,
4 layers): ``vit_small_patch16_224`` for dino_v1 and for the evaluation encoder (the DINO metric's
ViT-S/16), ``vit_small_patch14_dinov2`` (with DINOv2's LayerScale) for dino_v2. Each ships as timm's
own model folder, ``config.json`` (architecture, its arguments, input size and normalisation) and
``model.safetensors``, which ``timm.create_model("local-dir:DIR")`` reads; so the input size is the
backbone's own config (64 px here, 224 and 518 for the real ones).

Each objective sees two views of one object: a mild crop of its scene (80-100% of it: a class shows
in its silhouette, which tight crops cut) and one of the same object re-posed in another context,
which the world's renderer draws. Each also has a caption term: LiT's locked-text contrastive loss
(Zhai et al., 2022), matching the image's embedding to its caption's, from the world clip's frozen
text tower, among all of the world's distinct captions; a caption names the class, so the features
must carry it (self-supervision plus a caption term is SLIP's recipe, Mu et al., 2022). The runs that
led here, with their numbers: docs/world.md, "Earlier runs".

Objectives:

- dino_v1: DINO's self-distillation (Caron et al., 2021). A student matches its EMA teacher's
  centred, sharpened distribution over learned prototypes, across the two views; the teacher ships.
  Plus the caption term, weighted 4 (DINO's loss is larger than SimCLR's).
- dino_v2: the same plus DINOv2's KoLeo regulariser (Oquab et al., 2023), which spreads a batch's
  features apart, for 4,000 steps, with LayerScale's gains starting at 1. DINOv2's masked-patch (iBOT)
  term is left out: at 8x8 patches there is little to mask.
- eval_encoder: SimCLR's InfoNCE between the two views of each object against all others (Chen et
  al., 2020), plus the caption term, weighted 2: another objective and another seed than the
  backbones; no opad training loss uses it.

The views also flip and jitter brightness and contrast, but keep hue: in this world colour names
an instance ("a red mug"), and an encoder taught to ignore it could not tell two instances apart.
DINO's multi-crop (small local crops) is in the code (``local_crops``) but off: it triples a step's
cost and did not help (docs/world.md, "Earlier runs").
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models._hub import save_for_hf
from torch import nn
from transformers import CLIPModel

from opad.models.quiet import quiet_transformers
from opad.world.components import component
from opad.world.components.clip import text_features
from opad.world.pool import Pool, to_model_range

KINDS = ("dino_v1", "dino_v2", "eval_encoder")
ARCHITECTURES = {"dino_v1": "vit_small_patch16_224", "dino_v2": "vit_small_patch14_dinov2",
                 "eval_encoder": "vit_small_patch16_224"}
VIT_ARGS = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2)
MEAN = STD = (0.5, 0.5, 0.5)  # the world models' [-1, 1] range, as config: x / 255 -> (x - 0.5) / 0.5
_COMMON = dict(steps=2500, batch=64, warmup=100, weight_decay=0.05, checkpoint_every=250, crop_scale=0.8, jitter=0.3,
               bf16=False, reposed=1.0, caption_weight=2.0, caption_temp=0.07)
_DINO = dict(lr=1e-3, prototypes=1024, student_temp=0.1, teacher_temp=0.04, center_momentum=0.9,
             teacher_momentum=0.996, local_crops=0, local_size=32, local_scale=0.1, caption_weight=4.0)
HPARAMS = {  # reposed: how often the second view is of the re-posed photo rather than of the same one
    "dino_v1": {**_COMMON, **_DINO},
    # layerscale_init: LayerScale's initial gain. timm's DINOv2 default, 1e-5, is for deep nets trained
    # 100x as long; at 1e-5 or 0.1 (CaiT's rule for shallow nets) these 4 layers learned class less well
    # (README: the earlier encoder runs), and 4,000 steps, not 2,500, took kNN class past its bar
    "dino_v2": {**_COMMON, **_DINO, "koleo": 0.1, "layerscale_init": 1.0, "steps": 4000},
    "eval_encoder": {**_COMMON, "lr": 1e-3, "simclr_temp": 0.2},
}


def make_vit(kind: str, layerscale_init: float | None = None) -> nn.Module:
    """The world ViT of ``kind``'s family, without a classifier: (B, 3, 64, 64) -> (B, 64) CLS feature.
    The DINO family's also takes DINO's small local crops (its position embedding is resampled to them).
    ``layerscale_init``: the initial LayerScale gain of an architecture that has one (dino_v2's)."""
    extra = {"dynamic_img_size": True} if kind != "eval_encoder" else {}
    if layerscale_init is not None:
        extra["init_values"] = layerscale_init
    return timm.create_model(ARCHITECTURES[kind], pretrained=False, num_classes=0, **VIT_ARGS, **extra)


def load_vit(folder: str | Path) -> nn.Module:
    """A shipped world encoder, through timm's own local-folder loader."""
    return timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)


def save_vit(model: nn.Module, out: Path, kind: str) -> None:
    """timm's model folder with fp16 weights and the world's input size and normalisation."""
    half = copy.deepcopy(model).half()
    save_for_hf(half, out, safe_serialization=True,
                model_config={"pretrained_cfg": {"tag": f"opad_world_{kind}"}},
                data_config=dict(input_size=(3, 64, 64), crop_pct=1.0, interpolation="bicubic", mean=MEAN, std=STD))


# ---------------------------------------------------------------------------- views
def views(x: torch.Tensor, g: torch.Generator, crop_scale: float, jitter: float, size: int | None = None,
          max_scale: float = 1.0) -> torch.Tensor:
    """A random view of each image (B, 3, H, W) in [-1, 1], ``size`` pixels a side (default H): a
    resized crop of area fraction ``crop_scale``..``max_scale`` (aspect 3/4..4/3), a left-right
    flip half the time, brightness and contrast scaled by 1 +- ``jitter``; hue is kept."""
    b = len(x)
    area = crop_scale + (max_scale - crop_scale) * torch.rand(b, generator=g)
    aspect = torch.exp((torch.rand(b, generator=g) * 2 - 1) * math.log(4 / 3))
    w = (area * aspect).sqrt().clamp(max=1)  # crop width and height as fractions of the side
    h = (area / aspect).sqrt().clamp(max=1)
    cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - w)  # crop centre, normalised coordinates
    cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    side = size or x.shape[-1]
    grid = F.affine_grid(theta.to(x), [b, x.shape[1], side, side], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    bright = ((torch.rand(b, generator=g) * 2 - 1) * jitter).to(x)[:, None, None, None]
    contrast = (1 + (torch.rand(b, generator=g) * 2 - 1) * jitter).to(x)[:, None, None, None]
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean + bright).clamp(-1, 1)


# ---------------------------------------------------------------------------- objectives
class ProjectionHead(nn.Module):
    """DINO's head: a 3-layer MLP to a unit bottleneck, then cosine to ``prototypes`` unit vectors
    (DINO's weight-normalised last layer with its gain fixed at 1). ``prototypes=0``: the MLP alone
    (SimCLR's projection)."""

    def __init__(self, width: int, hidden: int = 256, bottleneck: int = 64, prototypes: int = 0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck) * 0.02) if prototypes else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(features), dim=-1)
        return z if self.prototypes is None else z @ F.normalize(self.prototypes, dim=-1).t()


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float,
              teacher_temp: float, views: int = 2) -> torch.Tensor:
    """DINO's cross-entropy between the teacher's centred, sharpened distribution on each global view
    and the student's on every other view, averaged over those pairs. ``teacher`` is (2B, K), the two
    global views' rows; ``student`` (views·B, K), the same two first, then the local crops'."""
    log_p = (student / student_temp).log_softmax(-1).chunk(views)
    q = ((teacher - center) / teacher_temp).softmax(-1).detach().chunk(2)
    terms = [-(q_i * log_p_j).sum(-1).mean() for i, q_i in enumerate(q) for j, log_p_j in enumerate(log_p) if j != i]
    return sum(terms) / len(terms)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo term: minus the mean log distance of each unit feature to its nearest other one."""
    z = F.normalize(features.float(), dim=-1)
    self_pairs = torch.eye(len(z), dtype=torch.bool, device=z.device)
    distance = torch.cdist(z, z).masked_fill(self_pairs, float("inf"))
    return -torch.log(distance.min(dim=1).values + eps).mean()


def info_nce(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent on unit (2B, D) projections: row i's positive is its other view, the rest negatives."""
    n = len(z) // 2
    self_pairs = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = (z @ z.t() / temperature).masked_fill(self_pairs, float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


@dataclass
class Captions:
    """The frozen clip text tower's unit embeddings of every distinct caption (``bank``, (C, D)), and
    which row of it each pool image's caption is (``first``) and each re-posed image's (``second``)."""

    bank: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor


@torch.no_grad()
def caption_bank(clip_dir: Path, first: list[str], second: list[str]) -> Captions:
    """:class:`Captions` of a pool's captions and its re-posed pool's, by the world clip's text tower."""
    names = sorted({*first, *second})
    row = {c: i for i, c in enumerate(names)}
    with quiet_transformers():
        model = CLIPModel.from_pretrained(clip_dir, torch_dtype=torch.float32).eval()
    bank = torch.cat([text_features(model, names[i:i + 1024]) for i in range(0, len(names), 1024)])
    return Captions(bank, torch.tensor([row[c] for c in first]), torch.tensor([row[c] for c in second]))


def caption_loss(z: torch.Tensor, bank: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """LiT's locked-text contrastive loss, one way: each unit image embedding (B, D) against every
    distinct caption of the world (``bank`` (C, D)), its own (``target``) the positive. With the whole
    bank as the candidates, two images of one caption are never each other's negatives."""
    return F.cross_entropy(z @ bank.t() / temperature, target)


def make_run(kind: str, folder: Path, pool: Pool, reposed: Pool, device: torch.device, *, seed: int,
             progress: bool = True, hparams: dict | None = None, captions: Captions | None = None) -> component.Run:
    """``reposed``: ``pool``'s objects re-posed in other contexts, row for row (the second photos);
    ``captions``: their captions' embeddings, needed when the caption term is on."""
    h = {**HPARAMS[kind], **(hparams or {})}
    if h["caption_weight"] and captions is None:
        raise ValueError(f"{kind}'s caption term needs the captions' embeddings")
    torch.manual_seed(seed)
    vit = make_vit(kind, h.get("layerscale_init"))
    width = vit.num_features
    # the caption term's linear map from the CLS feature to the text embedding space (a CLIP projection)
    extra = {"caption": nn.Linear(width, captions.bank.shape[1])} if h["caption_weight"] else {}
    if kind == "eval_encoder":
        model = nn.ModuleDict({"backbone": vit, "head": ProjectionHead(width), **extra})
        trained = model
    else:
        head = ProjectionHead(width, prototypes=h["prototypes"])
        student = nn.ModuleDict({"backbone": vit, "head": head, **extra})
        model = nn.ModuleDict({"student": student, "teacher": copy.deepcopy(student).requires_grad_(False)})
        model.register_buffer("center", torch.zeros(h["prototypes"]))
        trained = student
    model.to(device)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=h["lr"], weight_decay=h["weight_decay"])
    bf16 = component.bf16_fast(device)
    bank = captions.bank.to(device) if captions is not None else None

    def step(i: int, g: torch.Generator) -> dict[str, float]:
        index = torch.randint(len(pool), (h["batch"],), generator=g)
        first = pool.batch(index)
        other = (torch.rand(len(index), generator=g) < h["reposed"])[:, None, None, None]
        second = torch.where(other, reposed.batch(index), first)
        x = torch.cat([views(v, g, h["crop_scale"], h["jitter"]) for v in (first, second)]).to(device)
        logged = {}
        with component.autocast(device, bf16 and h["bf16"]):
            features = trained["backbone"](x)
            out = trained["head"](features).float()
            if kind == "eval_encoder":
                loss = info_nce(out, h["simclr_temp"])
            else:
                with torch.no_grad():
                    teacher = model["teacher"]["head"](model["teacher"]["backbone"](x)).float()
                # DINO's multi-crop: small crops (mostly object or mostly ground) must predict the
                # teacher's view of the whole scene, so the features cannot be the background alone
                if h["local_crops"]:
                    local = torch.cat([views(first, g, h["local_scale"], h["jitter"], h["local_size"],
                                             h["crop_scale"]) for _ in range(h["local_crops"])]).to(device)
                    out = torch.cat([out, trained["head"](trained["backbone"](local)).float()])
                loss = dino_loss(out, teacher, model.center, h["student_temp"], h["teacher_temp"],
                                 2 + h["local_crops"])
                if kind == "dino_v2":
                    koleo = sum(koleo_loss(f) for f in features.chunk(2)) / 2
                    logged["koleo"] = koleo.item()
                    loss = loss + h["koleo"] * koleo
            if h["caption_weight"]:
                z = F.normalize(trained["caption"](features).float(), dim=-1)
                target = torch.cat([captions.first[index], torch.where(other.flatten(), captions.second[index],
                                                                       captions.first[index])])
                term = caption_loss(z, bank, target.to(device), h["caption_temp"])
                logged["caption"] = term.item()
                loss = loss + h["caption_weight"] * term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 3.0)
        optimizer.step()
        if kind != "eval_encoder":
            with torch.no_grad():
                model.center.lerp_(teacher.mean(0), 1 - h["center_momentum"])
                # the teacher's momentum rises along a cosine from its start to 1, as in DINO
                m = 1 - (1 - h["teacher_momentum"]) * (math.cos(math.pi * i / h["steps"]) + 1) / 2
                for p_t, p_s in zip(model["teacher"].parameters(), student.parameters()):
                    p_t.lerp_(p_s, 1 - m)
        return {"loss": loss.item(), **logged, "lr": optimizer.param_groups[0]["lr"]}

    return component.Run(
        name=kind, folder=folder, model=model, optimizer=optimizer, steps=h["steps"], seed=seed,
        progress=progress, lr=lambda i: component.cosine_lr(h["lr"], i, h["steps"], h["warmup"]), step=step,
        checkpoint_every=h["checkpoint_every"], hparams=h,
    )


def shipped_backbone(kind: str, model: nn.ModuleDict) -> nn.Module:
    """What ships of a trained run: DINO's teacher backbone, SimCLR's backbone."""
    return model["backbone"] if kind == "eval_encoder" else model["teacher"]["backbone"]


# ---------------------------------------------------------------------------- measures
@torch.no_grad()
def features(vit: nn.Module, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Unit CLS features (N, D) of uint8 images (N, 64, 64, 3)."""
    vit.eval()
    device = next(vit.parameters()).device
    x = to_model_range(images)
    return F.normalize(torch.cat([vit(x[i:i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)]),
                       dim=-1)


def instance_ranking(first: torch.Tensor, second: torch.Tensor, classes: list[str]) -> float:
    """How often an instance's first photo is more similar to its own second photo than to another
    instance's of the same class (unit features (N, D) of the two photos, row i the same instance)."""
    sim = first @ second.t()
    same_class = torch.tensor([[a == b for b in classes] for a in classes])
    others = same_class & ~torch.eye(len(classes), dtype=torch.bool)
    wins = (sim.diag()[:, None] > sim) & others
    return float(wins.sum() / others.sum())


def knn_accuracy(features: torch.Tensor, labels: list[str], k: int = 20) -> float:
    """DINO's weighted k-nearest-neighbour accuracy (temperature 0.07) on unit features (N, D), each
    row classified by the other rows (leave one out)."""
    names = sorted(set(labels))
    y = torch.tensor([names.index(v) for v in labels])
    sim = (features @ features.t()).fill_diagonal_(float("-inf"))
    top, index = sim.topk(min(k, len(labels) - 1), dim=1)
    votes = torch.zeros(len(labels), len(names)).scatter_add_(1, y[index], (top / 0.07).exp())
    return float((votes.argmax(1) == y).float().mean())
