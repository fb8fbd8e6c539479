"""The world classifier: names a 64x64 scene's object class, context and colour.

It is the judge of the quality bars (``python -m opad.world.check``: does a teacher or student
sample show the prompted class in the prompted context?) and no training loss ever uses it. A
small CNN (four stride-2 convolution stages, global average pooling, one linear head per
question), trained with cross-entropy on world 0 and measured on the held-out world.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from opad.world.components import component
from opad.world.pool import Pool
from opad.world.render.contexts import CONTEXTS
from opad.world.render.objects import CLASSES
from opad.world.render.scenes import COLOURS, Scene

HEADS: dict[str, tuple[str, ...]] = {"category": tuple(CLASSES), "context": tuple(CONTEXTS),
                                     "colour": tuple(COLOURS)}
WIDTHS = (32, 64, 96, 128)
HPARAMS = dict(steps=1500, batch=64, lr=2e-3, warmup=50, checkpoint_every=250)
CONFIG, WEIGHTS = "config.json", "model.safetensors"


class WorldClassifier(nn.Module):
    def __init__(self, widths: tuple[int, ...] = WIDTHS, heads: dict[str, tuple[str, ...]] = HEADS):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c_in = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.labels = {k: list(v) for k, v in heads.items()}
        self.heads = nn.ModuleDict({k: nn.Linear(c_in, len(v)) for k, v in heads.items()})
        self.widths = tuple(widths)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for images ``x`` (B, 3, 64, 64) in [-1, 1]."""
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 128) -> dict[str, list[str]]:
        """Label names per head for images (B, 3, H, W) in [0, 1] (a sampler's output)."""
        self.eval()
        out: dict[str, list[str]] = {k: [] for k in self.heads}
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(next(self.parameters()).device).float() * 2 - 1
            for k, logits in self(x).items():
                out[k] += [self.labels[k][j] for j in logits.argmax(1).tolist()]
        return out

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG).write_text(json.dumps({"widths": self.widths, "heads": self.labels}, indent=2) + "\n")
        save_file({k: v.detach().half().contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS)

    @classmethod
    def load(cls, folder: Path) -> WorldClassifier:
        config = json.loads((Path(folder) / CONFIG).read_text())
        model = cls(tuple(config["widths"]), {k: tuple(v) for k, v in config["heads"].items()})
        model.load_state_dict({k: v.float() for k, v in load_file(Path(folder) / WEIGHTS).items()})
        return model.eval()


def targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([labels.index(getattr(s, k)) for s in scenes]) for k, labels in HEADS.items()}


def make_run(folder: Path, pool: Pool, device: torch.device, *, seed: int, progress: bool = True,
             hparams: dict | None = None) -> component.Run:
    h = {**HPARAMS, **(hparams or {})}
    torch.manual_seed(seed)
    model = WorldClassifier().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=h["lr"], weight_decay=0.01)
    labels = targets(pool.scenes)
    bf16 = component.bf16_fast(device)

    def step(i: int, g: torch.Generator) -> dict[str, float]:
        index = torch.randint(len(pool), (h["batch"],), generator=g)
        x = pool.batch(index)
        flip = torch.rand(len(index), generator=g) < 0.5  # no label depends on left or right
        x = torch.where(flip[:, None, None, None], x.flip(3), x).to(device)
        with component.autocast(device, bf16):
            logits = model(x)
        losses = {k: nn.functional.cross_entropy(v.float(), labels[k][index].to(device)) for k, v in logits.items()}
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {**{f"ce_{k}": v.item() for k, v in losses.items()}, "lr": optimizer.param_groups[0]["lr"]}

    return component.Run(
        name="classifier", folder=folder, model=model, optimizer=optimizer, steps=h["steps"], seed=seed,
        progress=progress, lr=lambda i: component.cosine_lr(h["lr"], i, h["steps"], h["warmup"]), step=step,
        checkpoint_every=h["checkpoint_every"], hparams=h,
    )


def accuracy(model: WorldClassifier, images: np.ndarray, scenes: list[Scene]) -> dict[str, float]:
    """Fraction right per head on (N, H, W, 3) uint8 images of known scenes."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    predicted = model.predict(x)
    return {k: float(np.mean([p == getattr(s, k) for p, s in zip(predicted[k], scenes)])) for k in HEADS}


def finish(model: WorldClassifier, heldout: Pool, out: Path) -> dict:
    model.save(out)
    shipped = WorldClassifier.load(out).to(next(model.parameters()).device)
    return {f"heldout_accuracy_{k}": round(v, 4) for k, v in accuracy(shipped, heldout.images, heldout.scenes).items()}
