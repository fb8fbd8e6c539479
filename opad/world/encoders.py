"""The mini world's self-supervised image encoders: the dino_v1- and dino_v2-family discriminator
backbones, and the held-out evaluation encoder that scores concept fidelity (the DINO-score analogue).

Each is a timm ViT of its family's architecture, world-sized (8x8 patches of 64x64 scenes, width 64,
4 layers): ``vit_small_patch16_224`` for dino_v1 and for the evaluation encoder (the DINO metric's
ViT-S/16), ``vit_small_patch14_dinov2`` (with DINOv2's LayerScale) for dino_v2. Each ships as timm's
own model folder, ``config.json`` (architecture, its arguments, input size and normalisation) and
``model.safetensors``, which ``timm.create_model("local-dir:DIR")`` reads; so the input size is the
backbone's own config (64 px here, 224 and 518 for the real ones).

Each objective sees two views of an object: random crops of one scene, or (``reposed``) a crop of
the scene and one of the same object re-posed in another context, which the world's renderer draws
(real self-supervised data gets such pairs from the many photos of one thing). Crops of one scene
share its background, and after 300 trial steps the features knew the context better than the
object: an object's photo was less like its re-posed photo than like other objects of its class
(47% for DINO; chance is 50%), where SimCLR on re-posed pairs reached 92%. But DINO on re-posed
pairs drifted to its uniform collapse (its loss rose to log K, the teacher's output flat): at
learning rate 1e-3 with every pair re-posed, and at 2.5e-4 with half of them (in fp32 and bf16,
and with KoLeo). SimCLR's negatives forbid that collapse. So the DINO family trains on crops of one scene, with DINO's
multi-crop (four 32 px local crops besides the two global ones), and the evaluation encoder on
re-posed pairs.

Objectives:

- dino_v1: DINO's self-distillation (Caron et al., 2021). A student matches its EMA teacher's
  centred, sharpened distribution over learned prototypes, across the two views; the teacher ships.
- dino_v2: the same plus DINOv2's KoLeo regulariser (Oquab et al., 2023), which spreads a batch's
  features apart. DINOv2's masked-patch (iBOT) term is left out: at 8x8 patches there is little to mask.
- eval_encoder: SimCLR's InfoNCE between the two views of each object against all others (Chen et
  al., 2020): another objective and another seed than the backbones; no opad training loss uses it.

The views also flip and jitter brightness and contrast, but keep hue: in this world colour names
an instance ("a red mug"), and an encoder taught to ignore it could not tell two instances apart.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models._hub import save_for_hf
from torch import nn

from opad.world import component
from opad.world.pool import Pool, to_model_range

KINDS = ("dino_v1", "dino_v2", "eval_encoder")
ARCHITECTURES = {"dino_v1": "vit_small_patch16_224", "dino_v2": "vit_small_patch14_dinov2",
                 "eval_encoder": "vit_small_patch16_224"}
VIT_ARGS = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2)
MEAN = STD = (0.5, 0.5, 0.5)  # the world models' [-1, 1] range, as config: x / 255 -> (x - 0.5) / 0.5
_COMMON = dict(steps=2000, batch=64, warmup=100, weight_decay=0.05, checkpoint_every=250, crop_scale=0.5, jitter=0.3,
               bf16=False)
_DINO = dict(lr=1e-3, reposed=0.0, prototypes=1024, student_temp=0.1, teacher_temp=0.04, center_momentum=0.9,
             teacher_momentum=0.996, local_crops=4, local_size=32, local_scale=0.1)
HPARAMS = {  # reposed: how often the second view is of the re-posed photo rather than of the same one
    "dino_v1": {**_COMMON, **_DINO},
    "dino_v2": {**_COMMON, **_DINO, "koleo": 0.1},
    "eval_encoder": {**_COMMON, "lr": 1e-3, "reposed": 1.0, "simclr_temp": 0.2},
}


def make_vit(kind: str) -> nn.Module:
    """The world ViT of ``kind``'s family, without a classifier: (B, 3, 64, 64) -> (B, 64) CLS feature.
    The DINO family's also takes DINO's small local crops (its position embedding is resampled to them)."""
    dynamic = {"dynamic_img_size": True} if kind != "eval_encoder" else {}
    return timm.create_model(ARCHITECTURES[kind], pretrained=False, num_classes=0, **VIT_ARGS, **dynamic)


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


def make_run(kind: str, folder: Path, pool: Pool, reposed: Pool, device: torch.device, *, seed: int,
             progress: bool = True, hparams: dict | None = None) -> component.Run:
    """``reposed``: ``pool``'s objects re-posed in other contexts, row for row (the second photos)."""
    h = {**HPARAMS[kind], **(hparams or {})}
    torch.manual_seed(seed)
    vit = make_vit(kind)
    width = vit.num_features
    if kind == "eval_encoder":
        model = nn.ModuleDict({"backbone": vit, "head": ProjectionHead(width)})
        trained = model
    else:
        head = ProjectionHead(width, prototypes=h["prototypes"])
        student = nn.ModuleDict({"backbone": vit, "head": head})
        model = nn.ModuleDict({"student": student, "teacher": copy.deepcopy(student).requires_grad_(False)})
        model.register_buffer("center", torch.zeros(h["prototypes"]))
        trained = student
    model.to(device)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=h["lr"], weight_decay=h["weight_decay"])
    bf16 = component.bf16_fast(device)

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
                local = torch.cat([views(first, g, h["local_scale"], h["jitter"], h["local_size"], h["crop_scale"])
                                   for _ in range(h["local_crops"])]).to(device)
                out = torch.cat([out, trained["head"](trained["backbone"](local)).float()])
                loss = dino_loss(out, teacher, model.center, h["student_temp"], h["teacher_temp"],
                                 2 + h["local_crops"])
                if kind == "dino_v2":
                    koleo = sum(koleo_loss(f) for f in features.chunk(2)) / 2
                    logged["koleo"] = koleo.item()
                    loss = loss + h["koleo"] * koleo
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
