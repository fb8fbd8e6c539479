"""``python -m opad.world.scenes OUT``: draw the first N scenes of a mini world to a folder.

The command only: the scenes, their captions and their drawing are :mod:`opad.world.render.scenes`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opad.errors import OpadError, command_main
from opad.fsutil import check_output_folder, staged_dir
from opad.world.render.contexts import CONTEXTS
from opad.world.render.objects import CLASSES
from opad.world.render.scenes import grid, iter_world

GRID_MAX = 256  # grid.png shows the first images only: 100k scenes would make a 20k-pixel sheet


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m opad.world.scenes",
        description="Draw the first N scenes of the mini world SEED (procedural objects in contexts, "
        f"classes: {', '.join(CLASSES)}; contexts: {', '.join(CONTEXTS)}). Writes OUT/images/NNNNN.png, "
        f"OUT/captions.jsonl (file, caption and every scene parameter per line) and OUT/grid.png (the first "
        f"{GRID_MAX} images in one sheet). The same SEED gives the same scenes and captions on every machine, and "
        "the same pixels wherever Pillow is the same version.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out", metavar="OUT", help="output folder (must not exist or be empty)")
    p.add_argument("--n", type=int, default=64, help="how many scenes")
    p.add_argument("--seed", type=int, default=0, help="which world; scene i depends only on (seed, i)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--columns", type=int, default=None, help="images per grid row; None: a square grid")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT folder")
    return p


def run(args: argparse.Namespace) -> Path:
    if args.n < 1:
        raise OpadError(f"--n must be at least 1, got {args.n}")
    if args.seed < 0:
        raise OpadError(f"--seed must be at least 0, got {args.seed}")
    if args.size < 16:
        raise OpadError(f"--size must be at least 16, got {args.size}")
    if args.columns is not None and args.columns < 1:
        raise OpadError(f"--columns must be at least 1, got {args.columns}")
    check_output_folder(args.out, args.overwrite, flag="OUT")
    images = []
    with staged_dir(args.out, replace=args.overwrite) as tmp:
        (tmp / "images").mkdir()
        with (tmp / "captions.jsonl").open("w") as f:
            for i, (image, text, scene) in enumerate(iter_world(args.n, args.seed, args.size)):
                name = f"images/{i:05d}.png"
                image.save(tmp / name)
                if i < GRID_MAX:
                    images.append(image)
                f.write(json.dumps({"file": name, "caption": text, "scene": scene.to_dict()}) + "\n")
        grid(images, args.columns).save(tmp / "grid.png")
    return Path(args.out)


@command_main()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = run(args)
    print(f"wrote {args.n} scene(s), captions.jsonl and grid.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
