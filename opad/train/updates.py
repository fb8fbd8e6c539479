"""The guarded optimizer step every method's update goes through: backward, clip, step, unless the
loss or gradient is non-finite (then the update is skipped and recorded, for the loop's rollbacks)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from torch import Tensor

if TYPE_CHECKING:
    from opad.train.methods.base import StepOutcome


def finite(x: Tensor | float) -> bool:
    return bool(torch.isfinite(torch.as_tensor(x)).all())


class GuardedStep:
    """Call it to update one model; counts the updates tried and applied per model (both checkpointed)."""

    def __init__(self, accelerator: Accelerator, max_grad_norm: float) -> None:
        self.accelerator = accelerator
        self.max_grad_norm = max_grad_norm
        self.attempts: dict[str, int] = {}
        self.updates: dict[str, int] = {}

    def track(self, models: list[str]) -> None:
        """Start counting for ``models`` (the method's optimizer names), from zero."""
        self.attempts = dict.fromkeys(models, 0)
        self.updates = dict.fromkeys(models, 0)

    def __call__(self, opt: torch.optim.Optimizer, params: list[Tensor], loss: Tensor, name: str, out: StepOutcome,
                 clip_groups: list[tuple[list[Tensor], float]] | None = None) -> None:
        """Backward, clip, and step unless the loss or gradient is non-finite (then skip and record).

        ``clip_groups`` are (parameters, max norm) pairs, each clipped on its own (0: no clip); by
        default all ``params`` against --max-grad-norm. The logged norm is the total before clipping.
        """
        opt.zero_grad(set_to_none=True)
        self.attempts[name] += 1
        if not finite(loss):
            out.nonfinite.append(f"{name}:loss")
            return
        self.accelerator.backward(loss)
        if self.accelerator.num_processes > 1:
            for p in params:
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        norms = [torch.nn.utils.clip_grad_norm_([p for p in group if p.grad is not None],
                                                limit if limit > 0 else math.inf)
                 for group, limit in clip_groups or [(params, self.max_grad_norm)]]
        norm = torch.stack([n.float() for n in norms]).norm()
        out.values[f"grad_norm/{name}"] = float(norm)
        if not finite(norm):
            opt.zero_grad(set_to_none=True)
            out.nonfinite.append(f"{name}:grad")
            return
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.updates[name] += 1
