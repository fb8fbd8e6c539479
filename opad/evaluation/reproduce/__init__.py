"""``python -m opad.reproduce``: the paper's Table 5 on DreamBench (or Tables 5 and 9 on the mini
world's held-out concepts, ``--world``), one command.

For every (subject, arm, training seed) job: train on the subject's photos, generate the 25 prompts
x ``--seeds`` image seeds (the student at 1 step, ``--steps 1,2,4`` for more; an arm that fine-tunes
the teacher at 25 DDIM steps with CFG), score them with ``opad.evaluation.evaluate``, and record train time,
iterations and per-image inference time. An arm is a trainer ``--method`` or one of the ablations
(``opad-no-discriminators``, ``opad-no-teacher``, ``custom-diffusion-teacher``). Then write
``table.md`` / ``table.csv`` (Table 5's shape: CLIP-T, CLIP-I, DINO with 95% intervals over subjects,
each subject's value the mean over its training seeds; train s, inference s), ``results.csv`` (per
job) and ``grids/SUBJECT.png`` (arm x prompt).

Each job runs in its own process and folder (``runs/SUBJECT/ARM/seedN/``): a finished job
(``done.json``) is skipped when the command runs again, an interrupted one resumes its training
from its checkpoint, and a failed one is recorded (``failed.json``, the error line) while the
others go on. With several GPUs visible, jobs run one per GPU in parallel.
"""

from __future__ import annotations

import sys

from opad.errors import command_main
from opad.evaluation.reproduce.jobs import run_harness, run_job
from opad.evaluation.reproduce.plan import ARMS, PAPER, WORLD_ARMS, Arm, Plan, apply_world, build_parser, check_args

__all__ = ["ARMS", "PAPER", "WORLD_ARMS", "Arm", "Plan", "apply_world", "build_parser", "check_args", "main", "run_harness",
           "run_job"]


@command_main()
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    apply_world(args)
    if args.job:
        subject, arm, seed = args.job
        run_job(args, subject, arm, int(seed))
        return 0
    out = run_harness(args, argv)
    print((out / "table.md").read_text())
    print(f"table, per-subject results and grids in {out}")
    return 0
