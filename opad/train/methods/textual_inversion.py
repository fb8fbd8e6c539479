"""``--method textual-inversion``: only the modifier token's embedding row trains."""

from __future__ import annotations

from torch import nn

from opad.train.methods.finetune import StudentFinetune


class TextualInversion(StudentFinetune):
    concept_format = "textual-inversion"

    def trainable_weights(self, unet: nn.Module) -> list[nn.Parameter]:
        return []
