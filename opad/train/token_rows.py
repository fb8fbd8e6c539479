"""Training the modifier tokens' embedding rows without touching the rest of the table."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TrainableTokenRows(nn.Module):
    """The modifier tokens' rows as one small parameter, substituted into an embedding's output.

    Equivalent to training the whole table with every other row's gradient masked to zero, but
    the optimizer state is (n, D) instead of (vocab, D) and the other rows stay bitwise intact.
    ``sync()`` writes the rows back into the table (for saving and for readers of the table).
    """

    def __init__(self, embedding: nn.Embedding, token_ids: list[int]) -> None:
        super().__init__()
        self.embedding = [embedding]  # a list: not a registered submodule, so not in state_dict()
        ids = torch.as_tensor(token_ids, device=embedding.weight.device)
        self.register_buffer("ids", ids, persistent=False)
        self.rows = nn.Parameter(embedding.weight[ids].detach().clone().float())
        self._hook = embedding.register_forward_hook(self._substitute)

    def _substitute(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        match = inputs[0][..., None] == self.ids  # (..., n)
        hit = match.any(-1, keepdim=True)
        rows = self.rows[match.to(torch.long).argmax(-1)].to(output.dtype)
        return torch.where(hit, rows, output)

    @torch.no_grad()
    def sync(self) -> None:
        weight = self.embedding[0].weight
        weight[self.ids] = self.rows.to(weight.dtype)

    def remove(self) -> None:
        self._hook.remove()
