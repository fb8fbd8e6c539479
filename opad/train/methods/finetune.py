"""What the Table-5 baselines share: the student UNet personalized directly, as on a multi-step model.

Each iteration is one step of Custom Diffusion's denoising loss on the subject's photos at a random
timestep (masked to the photo's area), plus the class-prior loss with ``--class-dir`` (DreamBooth's
prior preservation). No teacher, no discriminators: the paper's point is that this fails on a
one-step student. A baseline chooses what trains and the concept format it writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from opad.concept.folder import save_concept
from opad.train.methods.base import Method, StepOutcome
from opad.train.token_rows import TrainableTokenRows

if TYPE_CHECKING:
    from opad.train.context import TrainContext


class StudentFinetune(Method):
    concept_format = ""  # opad.concept.folder's format name of the concept it writes
    trains_token = True  # the modifier token's embedding row trains too

    def __init__(self, ctx: TrainContext) -> None:
        super().__init__(ctx)
        b = self.bundle
        self.token_rows = (TrainableTokenRows(b.text_encoder.get_input_embeddings(), ctx.token_ids)
                           if self.trains_token else None)
        self.weights = self.trainable_weights(b.student_unet)
        rows = [self.token_rows.rows] if self.token_rows is not None else []
        self.params = [*self.weights, *rows]
        self.opt = ctx.make_optimizer(self.weights, rows, self.cfg.student_lr)

    @classmethod
    def default_init_word(cls, tokenizer, class_name: str) -> str:
        # a frozen token must not start as the class word, or "<new1> dog" would just say "dog dog"
        return class_name if cls.trains_token else rare_word(tokenizer, class_name)

    def trainable_weights(self, unet: nn.Module) -> list[nn.Parameter]:
        """Make the UNet weights this baseline trains trainable (the rest frozen); return them."""
        raise NotImplementedError

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer | None]:
        return {"student": self.opt}

    def parameters(self) -> list[Tensor]:
        return list(self.params)

    def iteration(self, step: int) -> StepOutcome:
        b, out = self.bundle, StepOutcome()
        batch = self.data.sample(self.cfg.batch_size, self.generators["data"])
        unet, sched = b.student_unet, b.student_scheduler
        loss = self.denoising_loss(unet, sched, batch, self.ctx.encode(b.text_encoder, batch.prompts), "student")
        out.values["loss/denoise"] = loss.item()
        if self.class_data is not None:
            prior = self.class_data.sample(self.cfg.batch_size, self.generators["real"])
            prior_loss = self.denoising_loss(unet, sched, prior, self.ctx.encode(b.text_encoder, prior.prompts), "real")
            out.values["loss/prior"] = prior_loss.item()
            loss = loss + self.cfg.prior_loss_weight * prior_loss
        out.values["loss/student"] = loss.item()
        self.ctx.optimizer_step(self.opt, self.params, loss, "student", out)
        if self.token_rows is not None:
            self.token_rows.sync()
        return out

    def state_dict(self) -> dict:
        state = {"student_weights": [p.detach().cpu().clone() for p in self.weights]}
        if self.token_rows is not None:
            state["student_tokens"] = self.token_rows.rows.detach().cpu().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for p, v in zip(self.weights, state["student_weights"]):
            p.copy_(v)
        if self.token_rows is not None:
            self.token_rows.rows.copy_(state["student_tokens"])
            self.token_rows.sync()

    def log_columns(self) -> list[str]:
        return ["loss/denoise", *(["loss/prior"] if self.class_data is not None else []), "loss/student",
                "grad_norm/student"]

    def save_concepts(self, out: Path) -> None:
        b = self.bundle
        if self.token_rows is not None:
            self.token_rows.sync()
        save_concept(out / self.cfg.concept_folder, b.student_unet, b.tokenizer, b.text_encoder, [self.cfg.token],
                     format=self.concept_format, method=self.cfg.method)


def rare_word(tokenizer, class_name: str) -> str:
    """DreamBooth's identifier: the rare single token "sks" (its frozen embedding names the subject);
    the class word in a tokenizer where "sks" is not one token."""
    return "sks" if len(tokenizer.encode("sks", add_special_tokens=False)) == 1 else class_name
