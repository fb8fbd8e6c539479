"""``--method custom-diffusion``: Custom Diffusion on the student directly (cross-attention K/V + token)."""

from __future__ import annotations

from torch import nn

from opad.concept.folder import detach_start_token_kv, enable_kv_training
from opad.train.methods.finetune import StudentFinetune


class CustomDiffusion(StudentFinetune):
    concept_format = "custom-diffusion"

    def trainable_weights(self, unet: nn.Module) -> list[nn.Parameter]:
        params = enable_kv_training(unet)
        if self.cfg.detach_start_token:
            detach_start_token_kv(unet)
        return params
