"""``python -m opad.train``: train a one-step concept with OPAD (teacher + student + discriminators),
or with a baseline method (``--method``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from opad.config import add_config_arguments, config_from_args, declared
from opad.errors import command_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m opad.train",
        description="Personalize a one-step student (SD-Turbo-like) on a few photos of a subject by training it "
        "jointly with a multi-step teacher (SD 2.1-like) and an ensemble of discriminators (OPAD). With no "
        "arguments: the mini world's trained models, backbones and one of its held-out concepts (a checkered mug), "
        "written to ./opad-output (--preset tiny or OPAD_PRESET=tiny: the random tiny preset instead). Outputs: "
        "concept/ (student, Custom Diffusion format), teacher_concept/, samples/, log.csv, tensorboard/, "
        "loss_curve.png, checkpoints/, config.json. Ctrl-C writes a checkpoint; --resume continues. --method "
        "picks a baseline instead (custom-diffusion, dreambooth, lora, textual-inversion: the student alone) or "
        "teacher-first; each writes concept/ in its own format (see --method).",
    )
    p.add_argument("--config", default=None, help="JSON or YAML file of the fields below; flags override it")
    add_config_arguments(p)
    return p


def run(argv: list[str] | None = None):
    """Parse ``argv`` as the command line does and train; returns the trainer (raises OpadError)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "resume", False) and args.config is None:
        # a resumed run starts from its own config.json; flags given now override it
        saved = Path(getattr(args, "output_dir", declared("output_dir"))) / "config.json"
        if saved.is_file():
            args.config = str(saved)
    cfg = config_from_args(args)
    from opad.train.loop import build_trainer  # heavy imports after the arguments are known to be valid

    trainer = build_trainer(cfg)
    trainer.train()
    return trainer


@command_main()
def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    trainer = run(argv)
    out = trainer.out
    if trainer.step < trainer.cfg.max_steps:
        return 130  # interrupted, checkpoint written
    if not trainer.is_main:
        return 0
    minutes = (time.perf_counter() - start) / 60
    concept = out / trainer.cfg.concept_folder
    print(f"done in {minutes:.1f} min: concept in {concept}, previews in {out / 'samples'}")
    print(json.dumps({"concept": str(concept), "steps": trainer.step}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
