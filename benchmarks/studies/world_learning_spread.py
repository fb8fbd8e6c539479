"""How much a short OPAD run on the mini world raises the held-out-encoder similarity, and how much
that gain varies from run to run: the evidence behind the margin of tests/test_world_learning.py.

For each training seed: the default world run (``python -m opad.train`` with no model arguments) cut
to ``--steps`` iterations; the student's 1-step samples of the concept's prompts are scored against
its photos by the held-out evaluation encoder (opad.world.fidelity) at step 0 and at the end.
Writes one row per seed to ``benchmarks/results/world_learning_spread.csv`` and prints the summary.

    python benchmarks/studies/world_learning_spread.py --seeds 0 1 2 3 4 --steps 30
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from opad.config import TrainConfig
from opad.presets import WORLD_CONCEPT
from opad.world.fidelity import FIDELITY_PROMPTS, concept_similarity, read_photos

OUT = Path(__file__).resolve().parents[1] / "results" / "world_learning_spread.csv"


def one_run(seed: int, steps: int, concept: str) -> dict:
    from opad.train.loop import build_trainer

    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(TrainConfig(output_dir=out, seed=seed, max_steps=steps, preview_every=10**6,
                                            checkpoint_every=10**6, preset="world"), progress=False)
        photos = read_photos(trainer.instance_dir)
        prompts = [p.format(trainer.subject) for p in FIDELITY_PROMPTS]
        score = lambda: concept_similarity(trainer.bundle, prompts, photos,  # noqa: E731
                                           text_encoder=trainer.method.student_text_encoder)
        before = score()
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        after = score()
    return {"seed": seed, "steps": steps, "concept": concept,
            "discriminators": "+".join(trainer.cfg.discriminators), "step0": round(before, 4), "final": round(after, 4),
            "gain": round(after - before, 4), "train_s": round(seconds, 1), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    os.environ["OPAD_PRESET"] = "world"
    rows = [one_run(seed, args.steps, WORLD_CONCEPT) for seed in args.seeds]
    new = not OUT.is_file()
    with OUT.open("a", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    gains = [r["gain"] for r in rows]
    print(*rows, sep="\n")
    print(f"gain: mean {statistics.mean(gains):.4f}, sd {statistics.stdev(gains) if len(gains) > 1 else 0:.4f}, "
          f"min {min(gains):.4f}; step-0 values {[r['step0'] for r in rows]}")


if __name__ == "__main__":
    main()
