"""What the mini world's DINO / CLIP-I / CLIP-T analogues give images whose answer is known, for
reading the experiment's table (``python -m opad.reproduce --world``): for each held-out concept, the
same metrics as ``opad.evaluation.evaluate`` (mean cosine to the concept's five photos; cosine to the prompt with
its token removed) on reference sets drawn by the world itself.

- ``photos, leave-one-out``: each photo against the other four (its DINO / CLIP-I ceiling);
- ``the instance in the prompts' contexts``: the concept itself redrawn in each context its 25 prompts
  name (a perfect recontextualization; scored on those prompts for CLIP-T);
- ``same class, world instances``: training-world scenes of the concept's class (right object,
  wrong instance);
- ``the photos' tiles, shuffled``: each photo cut into 8x8-pixel tiles put back in random places
  (the concept's colours and texture with no object);
- ``other concepts' photos``: another held-out instance of another class.

Beside them, the world classifier's class % (and, for the prompted set, its context %), as the
experiment's table reports them.

Writes ``benchmarks/results/world_metric_sanity.csv`` (a row per concept and reference set, plus the means)
and prints the mean table.

    python benchmarks/studies/world_metric_sanity.py
"""

from __future__ import annotations

import csv
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from opad.evaluation.dreambench import read_dreambench
from opad.evaluation.encoders import clip_encoder, dino_encoder
from opad.evaluation.metrics import cosine, strip_modifiers, text_scores
from opad.world.components.classifier import WorldClassifier
from opad.world.fidelity import CLASSIFIER, prompt_context
from opad.world.render.concepts import CONCEPTS, concepts_dir, photo_scenes
from opad.world.render.scenes import render, repose, world_scenes

OUT = Path(__file__).resolve().parents[1] / "results" / "world_metric_sanity.csv"
TILE = 8
SAME_CLASS = 20  # training-world scenes of the concept's class


def shuffled_tiles(image: Image.Image, rng: random.Random) -> Image.Image:
    a = np.asarray(image)
    n = a.shape[0] // TILE
    tiles = [a[i * TILE:(i + 1) * TILE, j * TILE:(j + 1) * TILE] for i in range(n) for j in range(n)]
    rng.shuffle(tiles)
    rows = [np.concatenate(tiles[i * n:(i + 1) * n], axis=1) for i in range(n)]
    return Image.fromarray(np.concatenate(rows, axis=0))


def main() -> None:
    root = concepts_dir()
    bench = read_dreambench(root / "prompts_and_classes.txt")
    dino, clip = dino_encoder("world"), clip_encoder("world")
    classifier = WorldClassifier.load(CLASSIFIER)
    pool = world_scenes(4000, 1)
    rows = []
    for k, concept in enumerate(CONCEPTS):
        photos = [Image.open(p).convert("RGB") for p in sorted((root / concept.name).glob("*.png"))]
        real = {"dino": dino.images(photos), "clip_i": clip.images(photos)}
        prompts = bench.prompts_for(concept.name, "<new1>")
        rng = random.Random(f"sanity:{concept.name}")
        home = photo_scenes(concept)[0]
        recontext = [render(repose(home, rng, prompt_context(p) or concept.homes[0])) for p in prompts]
        other = CONCEPTS[(k + 1) % len(CONCEPTS)]
        sets = {
            "photos, leave-one-out": (photos, None),
            "the instance in the prompts' contexts": (recontext, prompts),
            "same class, world instances": ([render(s) for s in pool if s.category == concept.class_word][:SAME_CLASS],
                                            None),
            "the photos' tiles, shuffled": ([shuffled_tiles(p, rng) for p in photos], None),
            "other concepts' photos": ([Image.open(p).convert("RGB") for p in sorted((root / other.name).glob("*.png"))],
                                       None),
        }
        for name, (images, texts) in sets.items():
            row = {"concept": concept.name, "set": name, "images": len(images)}
            for metric, encoder in (("dino", dino), ("clip_i", clip)):
                sims = cosine(encoder.images(images), real[metric])
                if name == "photos, leave-one-out":
                    sims = sims[~np.eye(len(images), dtype=bool)]
                row[metric] = round(float(sims.mean()), 4)
            pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
            predicted = classifier.predict(pixels)
            row["class_acc"] = round(float(np.mean([c == concept.class_word for c in predicted["category"]])), 4)
            if texts is not None:
                prompts_scored = clip.texts([strip_modifiers(p, ()) for p in texts])
                row["clip_t"] = round(float(text_scores(clip.images(images), prompts_scored).mean()), 4)
                named = [(prompt_context(p), got) for p, got in zip(texts, predicted["context"]) if prompt_context(p)]
                row["context_acc"] = round(float(np.mean([want == got for want, got in named])), 4)
            rows.append(row)
    means = []
    for name in dict.fromkeys(r["set"] for r in rows):
        group = [r for r in rows if r["set"] == name]
        mean = {"concept": "mean", "set": name, "images": sum(r["images"] for r in group)}
        for metric in ("dino", "clip_i", "clip_t", "class_acc", "context_acc"):
            if metric in group[0]:
                mean[metric] = round(float(np.mean([r[metric] for r in group])), 4)
        means.append(mean)
    with OUT.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["concept", "set", "images", "dino", "clip_i", "clip_t", "class_acc", "context_acc",
                                    "date"])
        writer.writeheader()
        writer.writerows({**r, "date": time.strftime("%Y-%m-%d")} for r in rows + means)
    for m in means:
        print(f"{m['set']:40s} DINO {m['dino']:.3f}  CLIP-I {m['clip_i']:.3f}  class {100 * m['class_acc']:.0f}%" +
              (f"  CLIP-T {m['clip_t']:.3f}  context {100 * m['context_acc']:.0f}%" if "clip_t" in m else ""))


if __name__ == "__main__":
    main()
