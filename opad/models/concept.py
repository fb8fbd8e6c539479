"""A concept: modifier tokens plus a UNet's cross-attention K/V, in diffusers' Custom Diffusion format.

On disk (safetensors only), loadable by a plain diffusers pipeline::

    CONCEPT/pytorch_custom_diffusion_weights.safetensors   every attn2 K/V weight
    CONCEPT/<new1>.safetensors                              {"<new1>": embedding row}
    CONCEPT/opad_concept.json                               the tokens, in order

In memory OPAD trains the UNet's own ``attn2.to_k`` / ``attn2.to_v`` weights (no processor swap),
so the fast default attention keeps running; the file keys are those of diffusers'
``CustomDiffusionAttnProcessor``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from safetensors import SafetensorError
from transformers import CLIPTextModel, CLIPTokenizer

from opad.errors import OpadError
from opad.fsutil import staged_dir
from opad.models.attention import cross_attention_layers, fused_kv

WEIGHTS_NAME = "pytorch_custom_diffusion_weights.safetensors"
META_NAME = "opad_concept.json"
_K, _V = "to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight"


def kv_parameters(unet: UNet2DConditionModel) -> list[torch.nn.Parameter]:
    """The trainable set of a UNet: every cross-attention K and V projection weight."""
    return [p for m in cross_attention_layers(unet).values() for p in (m.to_k.weight, m.to_v.weight)]


def enable_kv_training(unet: UNet2DConditionModel) -> list[torch.nn.Parameter]:
    """Freeze the UNet except its cross-attention K/V weights; return those."""
    unet.requires_grad_(False)
    params = kv_parameters(unet)
    for p in params:
        p.requires_grad_(True)
    return params


def _detach_first_token(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


class _FlagHandle:
    """``remove()`` turns the provider's start-token detach off again, like a hook handle."""

    def __init__(self, kv) -> None:
        self.kv = kv

    def remove(self) -> None:
        self.kv.detach_first_token = False


def detach_start_token_kv(unet: UNet2DConditionModel) -> list[torch.utils.hooks.RemovableHandle]:
    """Stop gradients through the start token's cross-attention K/V, as Custom Diffusion does.

    The start token's features are the same for every prompt; Custom Diffusion's processor
    detaches its keys and values so K/V training follows only the prompt's own tokens. Values
    are unchanged; only gradients are affected. A UNet with the shared-K/V processors
    (:mod:`opad.models.attention`, whose projections bypass the modules' hooks) detaches there.
    """
    kv = fused_kv(unet)
    if kv is not None:
        kv.detach_first_token = True
        return [_FlagHandle(kv)]
    return [
        proj.register_forward_hook(_detach_first_token)
        for m in cross_attention_layers(unet).values()
        for proj in (m.to_k, m.to_v)
    ]


def _single_token_id(tokenizer: CLIPTokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise OpadError(
            f"initialiser word {word!r} is {len(ids)} tokens in the tokenizer; choose a word that is one token"
        )
    return ids[0]


def _check_new_tokens(tokenizer: CLIPTokenizer, tokens: list[str]) -> None:
    vocab = tokenizer.get_vocab()
    if len(set(tokens)) != len(tokens):
        raise OpadError(f"modifier tokens must be distinct, got {tokens}")
    for token in tokens:
        if not token or any(c.isspace() for c in token):
            raise OpadError(f"modifier token {token!r} must be non-empty and contain no whitespace")
        if {token, token.lower(), token.lower() + "</w>"} & vocab.keys():
            raise OpadError(f"modifier token {token!r} is already in the tokenizer's vocabulary; pick a new one")


def _append_embeddings(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, tokens: list[str], rows: list[torch.Tensor]
) -> list[int]:
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
    _check_new_tokens(tokenizer, tokens)
    init_ids = [_single_token_id(tokenizer, w) for w in init_words]
    table = text_encoder.get_input_embeddings().weight
    return _append_embeddings(tokenizer, text_encoder, tokens, [table[i].detach().clone() for i in init_ids])


def mask_embedding_grad(text_encoder: CLIPTextModel, token_ids: list[int]) -> torch.utils.hooks.RemovableHandle:
    """Make the token-embedding table trainable but zero every gradient row except ``token_ids``.

    One boolean row mask covers any number of tokens (Custom Diffusion's script masked the last
    of several tokens by an off-by-one).
    """
    weight = text_encoder.get_input_embeddings().weight
    weight.requires_grad_(True)
    keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    keep[torch.as_tensor(token_ids, device=weight.device)] = 1
    return weight.register_hook(lambda grad: grad * keep)


def concept_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The Custom Diffusion weight file's tensors for ``unet``.

    Every attention layer without weights (self-attention) gets an empty tensor: diffusers'
    loader reads an empty entry as "default processor here", and without them it cannot build a
    processor for every layer (the ``.bin`` format stored empty dicts, which safetensors cannot).
    """
    cross = cross_attention_layers(unet)
    state: dict[str, torch.Tensor] = {}
    for name in unet.attn_processors:
        layer = name.removesuffix(".processor")
        if layer in cross:
            state[f"{name}.{_K}"] = cross[layer].to_k.weight.detach().float().cpu().contiguous()
            state[f"{name}.{_V}"] = cross[layer].to_v.weight.detach().float().cpu().contiguous()
        else:
            state[name] = torch.empty(0)
    return state


def save_concept(
    out_dir: str | os.PathLike,
    unet: UNet2DConditionModel,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    tokens: list[str],
    *,
    replace: bool = True,
) -> Path:
    """Write the concept folder (complete or not at all)."""
    table = text_encoder.get_input_embeddings().weight
    added = tokenizer.get_added_vocab()
    unknown = [t for t in tokens if t not in added]
    if unknown:
        raise OpadError(f"cannot save concept: {unknown} were never added to the tokenizer")
    ids = [added[t] for t in tokens]
    state = concept_state_dict(unet)
    rows = {token: table[token_id].detach().float().cpu().contiguous() for token, token_id in zip(tokens, ids)}
    for key, value in {**state, **rows}.items():
        _check_finite(value, f"cannot save concept to {str(out_dir)!r}: {key!r}")
    with staged_dir(out_dir, replace=replace) as tmp:
        safetensors.torch.save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        for token, row in rows.items():
            safetensors.torch.save_file({token: row}, tmp / f"{token}.safetensors", metadata={"format": "pt"})
        (tmp / META_NAME).write_text(json.dumps({"tokens": tokens, "format": "custom-diffusion"}, indent=2) + "\n")
    return Path(out_dir)


def _check_finite(value: torch.Tensor, where: str) -> None:
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise OpadError(f"{where} holds values that are not finite (NaN or inf)")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise OpadError(f"{path} is not a readable safetensors file ({e})") from e


def _concept_tokens(concept_dir: Path) -> list[str]:
    meta = concept_dir / META_NAME
    if meta.is_file():
        try:
            tokens = json.loads(meta.read_text())["tokens"]
        except (ValueError, KeyError, TypeError) as e:
            raise OpadError(f"{meta} is not a valid concept description ({e})") from e
    else:  # a concept written by diffusers' own Custom Diffusion script
        tokens = sorted(p.stem for p in concept_dir.glob("*.safetensors") if p.name != WEIGHTS_NAME)
    for token in tokens:
        if not (concept_dir / f"{token}.safetensors").is_file():
            raise OpadError(f"concept {concept_dir} lists token {token!r} but has no {token}.safetensors")
    return tokens


def _checked_kv(concept_dir: Path, unet: UNet2DConditionModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    path = concept_dir / WEIGHTS_NAME
    if not path.is_file():
        raise OpadError(f"{concept_dir} is not a concept folder: it has no {WEIGHTS_NAME}")
    state = {k: v for k, v in _read_safetensors(path).items() if v.numel() > 0}
    targets = {}
    for layer, module in cross_attention_layers(unet).items():
        targets[f"{layer}.processor.{_K}"] = module.to_k.weight
        targets[f"{layer}.processor.{_V}"] = module.to_v.weight
    for key in state:
        if key not in targets:
            raise OpadError(f"{path}: key {key!r} is not a cross-attention K/V weight of this UNet")
    checked = {}
    for key, target in targets.items():
        if key not in state:
            raise OpadError(f"{path}: key {key!r} is missing (the concept was made for another UNet)")
        value = state[key]
        if value.shape != target.shape:
            raise OpadError(
                f"{path}: key {key!r} has shape {tuple(value.shape)} but the model's is {tuple(target.shape)}"
            )
        if not value.is_floating_point():
            raise OpadError(f"{path}: key {key!r} has dtype {value.dtype}; expected a floating-point tensor")
        _check_finite(value, f"{path}: key {key!r}")
        checked[key] = (value, target)
    return checked


def _checked_embeddings(concept_dir: Path, tokens: list[str], tokenizer: CLIPTokenizer, width: int) -> list[torch.Tensor]:
    _check_new_tokens(tokenizer, tokens)
    rows = []
    for token in tokens:
        path = concept_dir / f"{token}.safetensors"
        state = _read_safetensors(path)
        if list(state) != [token]:
            raise OpadError(f"{path}: expected one key {token!r}, found {sorted(state)}")
        row = state[token].reshape(-1) if state[token].dim() == 2 and state[token].shape[0] == 1 else state[token]
        if row.shape != (width,):
            raise OpadError(
                f"{path}: key {token!r} has shape {tuple(state[token].shape)} but the text encoder "
                f"needs ({width},)"
            )
        if not row.is_floating_point():
            raise OpadError(f"{path}: key {token!r} has dtype {row.dtype}; expected a floating-point tensor")
        _check_finite(row, f"{path}: key {token!r}")
        rows.append(row)
    return rows


@dataclass
class ConceptWeights:
    """A concept read and checked against a model, not applied: its tokens, their embedding rows,
    and every cross-attention K/V weight in model order (k_0, v_0, k_1, v_1, ...)."""

    tokens: list[str]
    rows: list[torch.Tensor]
    kv: list[torch.Tensor]


def read_concept(
    concept_dir: str | os.PathLike,
    unet: UNet2DConditionModel,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
) -> ConceptWeights:
    """Read a concept folder and check it (keys, shapes, dtypes, tokens) against these models."""
    concept_dir = Path(concept_dir)
    if not concept_dir.is_dir():
        raise OpadError(f"concept folder not found: {str(concept_dir)!r}")
    kv = _checked_kv(concept_dir, unet)
    tokens = _concept_tokens(concept_dir)
    width = text_encoder.get_input_embeddings().weight.shape[1]
    rows = _checked_embeddings(concept_dir, tokens, tokenizer, width)
    return ConceptWeights(tokens, rows, [value for value, _ in kv.values()])


def load_concept(
    concept_dir: str | os.PathLike,
    unet: UNet2DConditionModel,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
) -> list[str]:
    """Apply a concept to a UNet + tokenizer + text encoder; return its tokens.

    Everything is checked (keys, shapes, dtypes, tokens) before anything is changed, so a bad
    concept leaves the models as they were.
    """
    concept = read_concept(concept_dir, unet, tokenizer, text_encoder)
    with torch.no_grad():
        for value, target in zip(concept.kv, kv_parameters(unet)):
            target.copy_(value.to(target))
    _append_embeddings(tokenizer, text_encoder, concept.tokens, concept.rows)
    return concept.tokens
