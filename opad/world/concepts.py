"""``python -m opad.world.concepts OUT``: write the mini world's held-out concepts to a folder, laid out
like DreamBench.

The command only: the concepts, their photos and the prompt file are :mod:`opad.world.render.concepts`.
"""

from __future__ import annotations

import argparse
import sys

from opad.errors import command_main
from opad.fsutil import check_output_folder, staged_dir
from opad.world.render.concepts import CONCEPTS, PHOTOS, write_concepts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m opad.world.concepts",
        description=f"Write the mini world's {len(CONCEPTS)} held-out concepts to OUT, laid out like DreamBench: "
        f"OUT/<subject>/00.png..{PHOTOS - 1:02d}.png ({PHOTOS} photos of one instance no pretraining scene shows), "
        "OUT/prompts_and_classes.txt (DreamBench's format: classes and 25 prompts) and OUT/concepts.json (each "
        f"photo's scene). Subjects: {', '.join(c.name for c in CONCEPTS)}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out", metavar="OUT", help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT folder")
    return p


@command_main()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_output_folder(args.out, args.overwrite, flag="OUT")
    with staged_dir(args.out, replace=args.overwrite) as tmp:
        write_concepts(tmp)
    print(f"wrote {len(CONCEPTS)} concepts x {PHOTOS} photos and prompts_and_classes.txt to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
