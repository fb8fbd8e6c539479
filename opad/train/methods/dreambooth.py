"""``--method dreambooth``: the whole student UNet fine-tuned on the photos, the subject named by the
rare token "sks" (frozen); prior preservation with ``--class-dir``."""

from __future__ import annotations

from torch import nn

from opad.train.methods.finetune import StudentFinetune


class DreamBooth(StudentFinetune):
    concept_format = "unet"
    trains_token = False

    def trainable_weights(self, unet: nn.Module) -> list[nn.Parameter]:
        unet.requires_grad_(True)
        return list(unet.parameters())
