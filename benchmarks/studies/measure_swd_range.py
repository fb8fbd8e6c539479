"""How much larger MS-SWD is on [-1, 1] input (the release's bug) than on [0, 1] input.

The release feeds the raw decoder output in [-1, 1] to an sRGB->Lab conversion made for [0, 1]
(train_opad.py L2414), with weight 0.1. The paper profile feeds [0, 1] and scales the weight by the
ratio measured here, so the term pulls as hard as in the authors' runs. Pairs: two photos of the
same DreamBench subject (what the student and teacher images of one prompt resemble), at 256 px,
the same projections for both ranges. Writes benchmarks/results/swd_range.csv and prints the summary.

    python benchmarks/studies/measure_swd_range.py [--dreambench ../shared/datasets/dreambooth] [--size 256]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from opad.train.losses import ms_swd, random_projections

HERE = Path(__file__).resolve().parent.parent  # benchmarks/


def load(path: Path, size: int) -> torch.Tensor:
    with Image.open(path) as im:
        x = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dreambench", default=str(HERE.parent.parent / "shared" / "datasets" / "dreambooth"))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--projections", type=int, default=128)
    args = p.parse_args(argv)
    root = Path(args.dreambench)
    subjects = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not subjects:
        print(f"error: no DreamBench subject folders under {root}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    proj = [random_projections(args.projections, 3, 11, g) for _ in range(5)]
    rows = []
    for subject in subjects:
        photos = sorted(f for f in subject.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))[:2]
        if len(photos) < 2:
            continue
        x, y = (load(f, args.size) for f in photos)
        with torch.no_grad():
            unit = ms_swd(x, y, projections=proj).item()
            signed = ms_swd(x * 2 - 1, y * 2 - 1, projections=proj).item()
        rows.append({"subject": subject.name, "unit": unit, "signed": signed, "ratio": signed / unit})
    ratios = [r["ratio"] for r in rows]
    out = HERE / "results" / "swd_range.csv"
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["subject", "unit", "signed", "ratio", "size", "date"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()},
                             "size": args.size, "date": datetime.date.today().isoformat()})
    print(f"{len(rows)} subjects: MS-SWD([-1,1]) / MS-SWD([0,1]) median {statistics.median(ratios):.3f}, "
          f"mean {statistics.mean(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}; rows in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
