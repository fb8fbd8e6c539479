"""A concept's modifier tokens (e.g. ``<new1>``): adding them, training their rows, and their files.

Every concept format stores each token's embedding row as ``CONCEPT/<token>.safetensors``
(``{token: row}``), which diffusers' ``pipe.load_textual_inversion(CONCEPT, weight_name=...)`` reads.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from opad.concept.tensors import check_finite, check_float, read_safetensors
from opad.errors import OpadError


def token_file(concept_dir: Path, token: str) -> Path:
    return concept_dir / f"{token}.safetensors"


def _single_token_id(tokenizer: CLIPTokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise OpadError(
            f"initialiser word {word!r} is {len(ids)} tokens in the tokenizer; choose a word that is one token"
        )
    return ids[0]


def check_new_tokens(tokenizer: CLIPTokenizer, tokens: list[str]) -> None:
    vocab = tokenizer.get_vocab()
    if len(set(tokens)) != len(tokens):
        raise OpadError(f"modifier tokens must be distinct, got {tokens}")
    for token in tokens:
        if not token or any(c.isspace() for c in token):
            raise OpadError(f"modifier token {token!r} must be non-empty and contain no whitespace")
        if {token, token.lower(), token.lower() + "</w>"} & vocab.keys():
            raise OpadError(f"modifier token {token!r} is already in the tokenizer's vocabulary; pick a new one")


def append_embeddings(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, tokens: list[str], rows: list[torch.Tensor]
) -> list[int]:
    """Add ``tokens`` to the tokenizer with these embedding rows; return their ids."""
    tokenizer.add_tokens(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token_id, row in zip(ids, rows):
            weight[token_id] = row.to(weight)
    return ids


def add_modifier_tokens(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, tokens: list[str], init_words: list[str]
) -> list[int]:
    """Add ``tokens`` (e.g. ``<new1>``), each initialised from one single-token word; return their ids."""
    if len(tokens) != len(init_words):
        raise OpadError(f"got {len(tokens)} modifier tokens but {len(init_words)} initialiser words")
    check_new_tokens(tokenizer, tokens)
    init_ids = [_single_token_id(tokenizer, w) for w in init_words]
    table = text_encoder.get_input_embeddings().weight
    return append_embeddings(tokenizer, text_encoder, tokens, [table[i].detach().clone() for i in init_ids])


def token_rows(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, tokens: list[str],
               where: str) -> dict[str, torch.Tensor]:
    """Each added token's embedding row (fp32, CPU), checked finite, to be saved."""
    added = tokenizer.get_added_vocab()
    unknown = [t for t in tokens if t not in added]
    if unknown:
        raise OpadError(f"cannot save concept: {unknown} were never added to the tokenizer")
    table = text_encoder.get_input_embeddings().weight
    rows = {token: table[added[token]].detach().float().cpu().contiguous() for token in tokens}
    for token, row in rows.items():
        check_finite(row, f"{where}: {token!r}")
    return rows


def write_token_rows(folder: Path, rows: dict[str, torch.Tensor]) -> None:
    for token, row in rows.items():
        safetensors.torch.save_file({token: row}, token_file(folder, token), metadata={"format": "pt"})


def checked_embeddings(concept_dir: Path, tokens: list[str], tokenizer: CLIPTokenizer,
                       width: int) -> list[torch.Tensor]:
    """Read and check each token's row file: one key, the text encoder's width, finite."""
    check_new_tokens(tokenizer, tokens)
    rows = []
    for token in tokens:
        path = token_file(concept_dir, token)
        state = read_safetensors(path)
        if list(state) != [token]:
            raise OpadError(f"{path}: expected one key {token!r}, found {sorted(state)}")
        row = state[token].reshape(-1) if state[token].dim() == 2 and state[token].shape[0] == 1 else state[token]
        if row.shape != (width,):
            raise OpadError(
                f"{path}: key {token!r} has shape {tuple(state[token].shape)} but the text encoder "
                f"needs ({width},)"
            )
        check_float(path, token, row)
        rows.append(row)
    return rows
