"""``--method lora``: DreamBooth with LoRA adapters (peft) on every attention projection of the
student; the concept is diffusers' LoRA file."""

from __future__ import annotations

import torch
from peft import LoraConfig
from torch import nn

from opad.train.methods.finetune import StudentFinetune

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' train_dreambooth_lora.py's


class Lora(StudentFinetune):
    concept_format = "lora"
    trains_token = False

    def trainable_weights(self, unet: nn.Module) -> list[nn.Parameter]:
        # gaussian A, zero B: the adapted UNet starts equal to the base; A drawn from --seed, so
        # runs repeat (peft draws from torch's global generator)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            unet.add_adapter(LoraConfig(r=self.cfg.lora_rank, lora_alpha=self.cfg.lora_alpha,
                                        init_lora_weights="gaussian", target_modules=TARGETS))
        return [p for p in unet.parameters() if p.requires_grad]
