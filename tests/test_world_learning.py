"""Training learns: a short OPAD run on a mini-world concept makes the student's samples more like the
concept's photos, as the held-out evaluation encoder (which no training loss uses) sees them."""

from __future__ import annotations

from opad.config import TrainConfig
from opad.world.fidelity import FIDELITY_PROMPTS, concept_similarity, read_photos

# Measured by benchmarks/studies/world_learning_spread.py (rows in benchmarks/results/world_learning_spread.csv,
# 2026-12-06, 2-core CPU): 30 default steps on the checkered mug (three discriminators), training
# seeds 0-4: step-0 value -0.091 for every seed (nothing random happens before the first step), gain
# mean 0.445, sd 0.099, smallest 0.318 (two discriminators: 0.444, 0.092, 0.337). The margin is the mean less about three standard deviations: a trainer that learns
# has cleared it in every run measured, and one that does not move the student gains exactly 0.
MARGIN = 0.15


def test_thirty_opad_steps_raise_the_heldout_encoder_similarity_to_the_concept_photos(tmp_path, monkeypatch):
    from opad.train.loop import build_trainer

    monkeypatch.setenv("OPAD_PRESET", "world")
    trainer = build_trainer(TrainConfig(output_dir=str(tmp_path / "run"), max_steps=30, preview_every=10**6,
                                        checkpoint_every=30), progress=False)
    photos = read_photos(trainer.instance_dir)
    prompts = [p.format(trainer.subject) for p in FIDELITY_PROMPTS]

    def score() -> float:
        return concept_similarity(trainer.bundle, prompts, photos, text_encoder=trainer.method.student_text_encoder)

    before = score()
    assert score() == before  # the measure itself is deterministic: fixed seeds, fixed prompts
    trainer.train()
    after = score()
    assert after - before >= MARGIN, f"similarity {before:.4f} -> {after:.4f}"
