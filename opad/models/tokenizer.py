"""SD 2.x's CLIP tokenizer, built offline from the BPE vocabulary that open_clip ships.

SD 2.1 and SD-Turbo use OpenCLIP ViT-H's tokenizer: the standard 49408-token CLIP BPE with
``!`` (id 0) as the pad token. open_clip carries the same merges file, so the tokenizer can be
made with no download, and its ids equal open_clip's on ordinary text.
"""

from __future__ import annotations

import gzip

import torch
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

VOCAB_SIZE = 49408
MAX_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # merges CLIP keeps; the rest of the file is unused


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP BPE vocabulary (token -> id) and merge list, in the order CLIP assigns ids."""
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def prompt_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids (B, model_max_length) padded and truncated as diffusers' SD 2.x pipelines do."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def build_sd2_tokenizer() -> CLIPTokenizer:
    """A ``CLIPTokenizer`` configured as SD 2.1's ``tokenizer/`` folder (pad ``!``, 77 tokens)."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="!",
        model_max_length=MAX_LENGTH,
    )
