"""The harness's outputs: table.md / table.csv (Table 5's shape, with intervals and paired
differences), results.csv per job, and the arm x prompt grids."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from opad.evaluation.metrics import bootstrap_interval
from opad.evaluation.reproduce.plan import METRICS, PAPER, WORLD_METRICS, Plan, job_dir


def write_table(out: Path, plan: Plan, note: str | None = None) -> None:
    done = {j: json.loads(p.read_text()) for j in plan.jobs() if (p := job_dir(out, *j) / "done.json").is_file()}
    metrics = [*METRICS, *(k for k in WORLD_METRICS
                           if done and all(k in sc for d in done.values() for sc in d["scores"].values()))]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "method", "seed", "steps", *metrics, "train_s", "iterations", "infer_s_per_image"])
        for (s, m, seed), d in sorted(done.items()):
            for steps, sc in d["scores"].items():
                writer.writerow([s, m, seed, steps, *(f"{sc[k]:.4f}" for k in metrics), f"{d['train_s']:.1f}",
                                 d["iterations"], f"{d['infer_s_per_image'][steps]:.4f}"])
    rows = []
    for m in plan.arms:
        failed = sum((job_dir(out, *j) / "failed.json").is_file() for j in plan.jobs() if j[1] == m)
        for steps in map(str, plan.sample_steps(m)):
            runs = {j: d for j, d in done.items() if j[1] == m and steps in d["scores"]}
            # a subject's value: the mean over its training seeds; the interval is over subjects
            by_subject: dict[str, list[dict]] = {}
            for (s, _, _), d in runs.items():
                by_subject.setdefault(s, []).append(d)
            row = {"method": m, "steps": int(steps), "subjects": len(by_subject), "runs": len(runs), "failed": failed}
            if runs:
                row["comparable"] = all(d["comparable"] for d in runs.values())
                for k in metrics:
                    values = [float(np.nanmean([d["scores"][steps][k] for d in ds])) for ds in by_subject.values()]
                    row[k], row[f"{k}_ci95"] = float(np.mean(values)), bootstrap_interval(values)
                row["train_s"] = float(np.mean([d["train_s"] for d in runs.values()]))
                row["iterations"] = next(iter(runs.values()))["iterations"]
                row["infer_s_per_image"] = float(np.mean([d["infer_s_per_image"][steps] for d in runs.values()]))
            rows.append(row)
    with (out / "table.csv").open("w", newline="") as f:
        fields = ["method", "steps", "subjects", "runs", "failed", *metrics, *(f"{k}_ci95" for k in metrics),
                  "train_s", "iterations", "infer_s_per_image", "comparable"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / "table.md").write_text(_markdown(rows, metrics, note) + _paired(done, plan, metrics))


def _paired(done: dict, plan: Plan, metrics: list[str]) -> str:
    """The first arm minus each other one, subject by subject (each the mean over its training seeds):
    the mean difference with a bootstrap 95% interval over subjects, and in how many subjects it is > 0."""
    def per_subject(arm: str) -> dict[str, dict[str, float]]:
        steps = str(plan.sample_steps(arm)[0])
        by: dict[str, list[dict]] = {}
        for (s, a, _), d in done.items():
            if a == arm and steps in d["scores"]:
                by.setdefault(s, []).append(d["scores"][steps])
        return {s: {k: float(np.nanmean([sc[k] for sc in group])) for k in metrics} for s, group in by.items()}

    first, *others = plan.arms
    base = per_subject(first)
    lines = []
    for arm in others:
        theirs = per_subject(arm)
        common = sorted(set(base) & set(theirs))
        if len(common) < 2:
            continue
        cells = []
        for k in metrics:
            diff = [base[s][k] - theirs[s][k] for s in common]
            low, high = bootstrap_interval(diff)
            cells.append(f"{np.mean(diff):+.3f} [{low:+.3f}, {high:+.3f}] ({sum(d > 0 for d in diff)}/{len(diff)})")
        lines.append(f"| {first} − {arm} | {' | '.join(cells)} |")
    if not lines:
        return ""
    return "\n".join(["", f"Paired by subject: {first} minus each arm (mean difference, bootstrap 95% interval over "
                                "subjects, subjects where it is above 0):", "",
                       "| pair | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics), *lines]) + "\n"


def _markdown(rows: list[dict], metrics: list[str], note: str | None = None) -> str:
    names = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO", "class_acc": "class %", "context_acc": "context %"}
    head = " | ".join(names[k] for k in metrics)
    lines = [f"| method | steps | {head} | train s | iterations | inference s/image | subjects (runs) |",
             "|---|---|" + "---|" * len(metrics) + "---|---|---|---|"]

    def cell(r: dict, k: str) -> str:
        scale, fmt = (100, ".0f") if k in WORLD_METRICS else (1, ".3f")
        low, high = r[f"{k}_ci95"]
        return f"{scale * r[k]:{fmt}} [{scale * low:{fmt}}, {scale * high:{fmt}}]"

    for r in rows:
        failed = f", {r['failed']} failed" if r["failed"] else ""
        if not r["runs"]:
            lines.append(f"| {r['method']} | {r['steps']} | " + "– | " * (len(metrics) + 3) + f"0 (0{failed}) |")
            continue
        cells = " | ".join(cell(r, k) for k in metrics)
        lines.append(f"| {r['method']} | {r['steps']} | {cells} | {r['train_s']:.0f} | {r['iterations']} | "
                     f"{r['infer_s_per_image']:.3f} | {r['subjects']} ({r['runs']}{failed}) |")
    shown = [r["method"] for r in rows if r["method"] in PAPER]
    paper = "; ".join(f"{m} {t:.3f} / {i:.3f} / {d:.3f}" for m, (t, i, d) in PAPER.items() if m in shown)
    lines += ["", ("Means over subjects (each the mean over its training seeds) with bootstrap 95% intervals over "
                   "subjects; raw cosines (`python -m opad.evaluate`)."),
              f"Paper (Tables 5, 9; CLIP-T / CLIP-I / DINO): {paper}."]
    if note:
        lines += ["", note]
    if any(r.get("comparable") is False for r in rows):
        lines += ["", "**Not comparable with the paper:** these runs used tiny models or tiny random encoders."]
    return "\n".join(lines) + "\n"


def write_grids(out: Path, plan: Plan, prompts: int) -> None:
    """grids/SUBJECT.png: a row per arm (the first training seed's image seed 0 of each prompt, at the
    arm's fewest steps), thumbnails."""
    (out / "grids").mkdir(parents=True, exist_ok=True)
    side, label_w = 96, 170
    seed = plan.train_seeds[0]
    for s in plan.subjects:
        rows = [(m, job_dir(out, s, m, seed) / "images" / f"steps{plan.sample_steps(m)[0]}") for m in plan.arms]
        rows = [(m, folder) for m, folder in rows if folder.is_dir()]
        if not rows:
            continue
        sheet = Image.new("RGB", (label_w + side * prompts, side * len(rows)), "white")
        draw = ImageDraw.Draw(sheet)
        for r, (m, folder) in enumerate(rows):
            draw.text((4, r * side + side // 2 - 6), m, fill="black")
            for c in range(prompts):
                path = folder / f"{c:02d}_seed0.png"
                if path.is_file():
                    sheet.paste(Image.open(path).convert("RGB").resize((side, side)), (label_w + c * side, r * side))
        sheet.save(out / "grids" / f"{s}.png")
