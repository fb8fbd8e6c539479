"""A concept: modifier tokens plus the UNet weights a method trained, in one of four formats.

On disk (safetensors only), every format loadable by a plain diffusers pipeline::

    CONCEPT/<new1>.safetensors       {"<new1>": embedding row}   (every format; load_textual_inversion)
    CONCEPT/opad_concept.json        {"tokens", "format", "method"}
    custom-diffusion  CONCEPT/pytorch_custom_diffusion_weights.safetensors  every attn2 K/V weight
    lora              CONCEPT/pytorch_lora_weights.safetensors  (pipe.load_lora_weights; concept_lora)
    unet              CONCEPT/unet/  a whole fine-tuned UNet  (from_pretrained; concept_unet)
    textual-inversion only the token rows

A folder without opad_concept.json is diffusers' own Custom Diffusion output. Custom Diffusion
and textual-inversion concepts change only the cross-attention K/V and token rows, so one engine
serves many of them (:func:`read_concept`); lora and unet concepts change other weights too and
are applied to the model (:func:`load_concept`).

In memory OPAD trains the UNet's own ``attn2.to_k`` / ``attn2.to_v`` weights (no processor swap),
so the fast default attention keeps running; the Custom Diffusion file keys are those of
diffusers' ``CustomDiffusionAttnProcessor``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from opad.concept.base import base_record
from opad.concept.lora import LORA_NAME, check_lora, has_adapter, lora_state, merge_lora, write_lora
from opad.concept.tensors import check_finite, check_weight, read_safetensors
from opad.concept.tokens import (
    add_modifier_tokens,
    append_embeddings,
    checked_embeddings,
    token_file,
    token_rows,
    write_token_rows,
)
from opad.concept.unet import check_savable_unet, check_unet, load_unet_weights, write_unet
from opad.errors import OpadError
from opad.fsutil import staged_dir
from opad.models.attention import cross_attention_layers, fused_kv

WEIGHTS_NAME = "pytorch_custom_diffusion_weights.safetensors"
META_NAME = "opad_concept.json"
FORMATS = ("custom-diffusion", "lora", "unet", "textual-inversion")
KV_FORMATS = ("custom-diffusion", "textual-inversion")  # change only the cross-attention K/V and token rows
_K, _V = "to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight"

__all__ = [
    "FORMATS", "KV_FORMATS", "LORA_NAME", "META_NAME", "WEIGHTS_NAME", "ConceptWeights", "add_modifier_tokens",
    "concept_format", "concept_state_dict", "cross_attention_layers", "detach_start_token_kv",
    "enable_kv_training", "kv_parameters", "load_concept", "read_concept", "save_concept",
]


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


Writer = Callable[[Path], None]  # writes a format's weight files into the staging folder


def _custom_diffusion_writer(unet: UNet2DConditionModel, where: str) -> Writer:
    if has_adapter(unet):
        raise OpadError(f"{where}: the UNet carries a LoRA adapter; save it as format='lora'")
    state = concept_state_dict(unet)
    for key, value in state.items():
        check_finite(value, f"{where}: {key!r}")
    return lambda folder: safetensors.torch.save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})


def _lora_writer(unet: UNet2DConditionModel, where: str) -> Writer:
    state, config = lora_state(unet)
    for key, value in state.items():
        check_finite(value, f"{where}: {key!r}")
    return lambda folder: write_lora(folder, state, config)


def _writer(format: str, unet: UNet2DConditionModel, where: str) -> Writer:
    """Gather and check the weights first, so a bad model writes nothing."""
    if format == "custom-diffusion":
        return _custom_diffusion_writer(unet, where)
    if format == "lora":
        return _lora_writer(unet, where)
    if format == "unet":
        check_savable_unet(unet, where)
        return lambda folder: write_unet(folder, unet)
    return lambda folder: None  # textual-inversion: the token rows are the concept


def save_concept(
    out_dir: str | os.PathLike,
    unet: UNet2DConditionModel,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    tokens: list[str],
    *,
    format: str = "custom-diffusion",
    method: str | None = None,
    replace: bool = True,
) -> Path:
    """Write the concept folder in ``format`` (complete or not at all); ``method`` (default: the
    format's name) records which training method made it."""
    if format not in FORMATS:
        raise OpadError(f"unknown concept format {format!r}; choose from {', '.join(FORMATS)}")
    if format == "textual-inversion" and not tokens:
        raise OpadError("a textual-inversion concept is its token rows: give at least one token")
    where = f"cannot save concept to {str(out_dir)!r}"
    rows = token_rows(tokenizer, text_encoder, tokens, where)
    write = _writer(format, unet, where)
    meta = {"tokens": tokens, "format": format, "method": method or format}
    if format != "unet":  # a whole-UNet concept changes the probed weights too
        meta["base"] = base_record(unet)
    with staged_dir(out_dir, replace=replace) as tmp:
        write(tmp)
        write_token_rows(tmp, rows)
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out_dir)


def read_description(concept_dir: Path) -> dict:
    """A concept folder's opad_concept.json (``tokens``, ``format``, ``method``, ``base`` when recorded),
    checked; a folder without one is diffusers' own Custom Diffusion output, its tokens the names of
    its other safetensors files."""
    meta = concept_dir / META_NAME
    if not meta.is_file():
        tokens = sorted(p.stem for p in concept_dir.glob("*.safetensors") if p.name != WEIGHTS_NAME)
        return {"tokens": tokens, "format": "custom-diffusion", "method": "custom-diffusion"}
    try:
        data = json.loads(meta.read_text())
        tokens, format = data["tokens"], data.get("format", "custom-diffusion")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise OpadError(f"{meta} is not a valid concept description ({e})") from e
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise OpadError(f"{meta} is not a valid concept description (tokens must be a list of strings)")
    if format not in FORMATS:
        raise OpadError(f"{meta}: unknown concept format {format!r}; opad reads {', '.join(FORMATS)}")
    return {**data, "format": format, "method": data.get("method", format)}


def _read_meta(concept_dir: Path) -> tuple[str, list[str]]:
    """(format, tokens) of a concept folder."""
    data = read_description(concept_dir)
    return data["format"], data["tokens"]


def _existing(concept_dir: str | os.PathLike) -> Path:
    concept_dir = Path(concept_dir)
    if not concept_dir.is_dir():
        raise OpadError(f"concept folder not found: {str(concept_dir)!r}")
    return concept_dir


def concept_format(concept_dir: str | os.PathLike) -> str:
    """The format of a concept folder (one of :data:`FORMATS`), read from its opad_concept.json."""
    return _read_meta(_existing(concept_dir))[0]


def _checked_rows(concept_dir: Path, tokens: list[str], tokenizer: CLIPTokenizer,
                  text_encoder: CLIPTextModel) -> list[torch.Tensor]:
    for token in tokens:
        if not token_file(concept_dir, token).is_file():
            raise OpadError(f"concept {concept_dir} lists token {token!r} but has no {token}.safetensors")
    width = text_encoder.get_input_embeddings().weight.shape[1]
    return checked_embeddings(concept_dir, tokens, tokenizer, width)


def _checked_kv(concept_dir: Path, unet: UNet2DConditionModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    path = concept_dir / WEIGHTS_NAME
    if not path.is_file():
        raise OpadError(f"{concept_dir} is not a concept folder: it has no {WEIGHTS_NAME}")
    state = {k: v for k, v in read_safetensors(path).items() if v.numel() > 0}
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
        check_weight(path, key, state[key], target.shape)
        checked[key] = (state[key], target)
    return checked


def _copy_kv(checked: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for value, target in checked.values():
            target.copy_(value.to(target))


def _checked_weights(format: str, concept_dir: Path, unet: UNet2DConditionModel) -> Callable[[], None]:
    """Read and check a format's UNet weights; return what applies them (nothing changed yet)."""
    if format == "custom-diffusion":
        kv = _checked_kv(concept_dir, unet)
        return lambda: _copy_kv(kv)
    if format == "lora":
        lora = check_lora(concept_dir / LORA_NAME, unet)
        return lambda: merge_lora(unet, lora)
    if format == "unet":
        state = check_unet(concept_dir, unet)
        return lambda: load_unet_weights(unet, state)
    return lambda: None  # textual-inversion: only token rows


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
    """Read a concept folder and check it (keys, shapes, dtypes, tokens) against these models: the
    K/V view one engine serving many concepts uses. A textual-inversion concept has the UNet's own
    K/V; lora and unet concepts are refused (they change weights outside the K/V)."""
    concept_dir = _existing(concept_dir)
    format, tokens = _read_meta(concept_dir)
    if format not in KV_FORMATS:
        raise OpadError(
            f"{concept_dir} is a {format} concept: it changes UNet weights outside the cross-attention K/V, so "
            "it cannot share an engine with other concepts; use it alone with python -m opad.generate --concept "
            "DIR, or bake it into the graphs with python export/export_onnx.py --concept DIR")
    if format == "custom-diffusion":
        kv = [value for value, _ in _checked_kv(concept_dir, unet).values()]
    else:
        kv = [w.detach().clone() for w in kv_parameters(unet)]
    rows = _checked_rows(concept_dir, tokens, tokenizer, text_encoder)
    return ConceptWeights(tokens, rows, kv)


def load_concept(
    concept_dir: str | os.PathLike,
    unet: UNet2DConditionModel,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
) -> list[str]:
    """Apply a concept of any format to a UNet + tokenizer + text encoder; return its tokens.

    Everything is checked (files, keys, shapes, dtypes, values, tokens, the UNet's config) before
    anything is changed, so a bad concept leaves the models as they were. A lora concept is merged
    into the base weights: the UNet stays a plain UNet.
    """
    concept_dir = _existing(concept_dir)
    format, tokens = _read_meta(concept_dir)
    apply = _checked_weights(format, concept_dir, unet)
    rows = _checked_rows(concept_dir, tokens, tokenizer, text_encoder)
    apply()
    append_embeddings(tokenizer, text_encoder, tokens, rows)
    return tokens
