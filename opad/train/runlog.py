"""A run's logs: ``log.csv`` (one row per step), TensorBoard events and the final loss-curve PNG."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class RunLog:
    """Appends one row per step; on resume, rows from ``start_step`` on are dropped first."""

    def __init__(self, out_dir: Path, columns: list[str], *, start_step: int = 0) -> None:
        self.path = out_dir / "log.csv"
        self.columns = ["step", *columns, "event"]
        rows = []
        if start_step > 0 and self.path.is_file():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < start_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows)
        self._file = self.path.open("a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=self.columns)
        self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step if start_step else None)

    def write(self, step: int, values: dict[str, float], event: str = "") -> None:
        row = {"step": step, "event": event}
        for key in self.columns[1:-1]:
            if key in values:
                row[key] = f"{values[key]:.6g}"
                if math.isfinite(values[key]):
                    self._tb.add_scalar(key, values[key], step)
        self._csv.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        self._tb.close()


class NullLog:
    """What non-main processes log to."""

    def write(self, step: int, values: dict[str, float], event: str = "") -> None:
        pass

    def close(self) -> None:
        pass


def read_log(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def plot_losses(log_csv: Path, out_png: Path) -> None:
    """One panel per loss family (loss/*, grad_norm/*), steps on x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_csv)
    if not rows:
        return
    keys = [k for k in rows[0] if k.startswith(("loss/", "grad_norm/"))]
    families = {"loss": [k for k in keys if k.startswith("loss/")], "grad_norm": [k for k in keys if k.startswith("grad_norm/")]}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, (family, names) in zip(axes, families.items()):
        for name in names:
            pts = [(int(r["step"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]
            pts = [(s, v) for s, v in pts if math.isfinite(v)]
            if pts:
                ax.plot(*zip(*pts), label=name.split("/", 1)[1])
        ax.set_title(family)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
