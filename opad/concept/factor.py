"""A concept as low-rank weight deltas from its base model: what LoRA files carry.

Custom Diffusion stores whole K/V weights; a LoRA file stores ``up @ down * alpha / rank``, added to
the base. :func:`concept_deltas` applies a concept to its base (opad's own checked loader) and takes
the difference of every weight it changed; :func:`factor` is the best rank-r approximation of one
delta (truncated SVD, Eckart-Young), exact at the delta's full rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from opad.concept.folder import LORA_NAME, load_concept, read_description
from opad.concept.lora import check_lora, split_key
from opad.concept.tokens import token_rows
from opad.errors import OpadError
from opad.models.attention import cross_attention_layers
from opad.models.loading import ModelBundle

FACTORABLE = ("custom-diffusion", "lora", "textual-inversion")


@dataclass
class ConceptDeltas:
    """A concept as its base model sees it: each changed linear layer's weight delta (fp32, CPU) with the
    largest rank a factorisation of it can need, and the modifier tokens' embedding rows."""

    description: dict  # the concept's opad_concept.json (tokens, format, method, base when recorded)
    deltas: dict[str, torch.Tensor]  # module name -> W_concept - W_base, shape (out, in)
    full_ranks: dict[str, int]  # module name -> min(out, in), or the LoRA's own rank when smaller
    rows: dict[str, torch.Tensor]  # token -> embedding row


def _changed_linear(format: str, concept_dir: Path, bundle: ModelBundle) -> dict[str, int]:
    """The linear layers a concept of ``format`` changes, each with the rank its delta can have."""
    unet = bundle.student_unet
    if format == "custom-diffusion":
        layers = cross_attention_layers(unet)
        linear = {f"{name}.{proj}": getattr(layer, proj) for name, layer in layers.items() for proj in ("to_k", "to_v")}
        return {name: min(m.weight.shape) for name, m in linear.items()}
    if format == "lora":
        lora = check_lora(concept_dir / LORA_NAME, unet)
        downs = [(split_key(lora.path, key), value) for key, value in lora.state.items()]
        return {module: min(down.shape[0], *unet.get_submodule(module).weight.shape)
                for (module, kind), down in downs if kind == "down"}
    check_factorable(concept_dir, format)
    return {}  # textual-inversion: only token rows


def check_factorable(concept_dir: Path, format: str) -> None:
    """Refuse, in one line, a concept whose changes a LoRA file cannot carry exactly."""
    if format not in FACTORABLE:
        raise OpadError(
            f"{concept_dir} is a {format} concept: it changes every UNet weight (convolutions and norms too), "
            f"which a LoRA file cannot carry exactly; only {', '.join(FACTORABLE)} concepts convert (to extract an "
            "approximate LoRA from a whole fine-tuned UNet, use kohya's networks/extract_lora_from_models.py)")


def concept_deltas(concept_dir: str | Path, bundle: ModelBundle) -> ConceptDeltas:
    """Apply the concept to ``bundle`` (its base, checked by opad's loader) and return what changed."""
    concept_dir = Path(concept_dir)
    description = read_description(concept_dir)
    modules = _changed_linear(description["format"], concept_dir, bundle)
    unet = bundle.student_unet
    before = {name: unet.get_submodule(name).weight.detach().float().cpu().clone() for name in modules}
    tokens = load_concept(concept_dir, unet, bundle.tokenizer, bundle.text_encoder)
    deltas = {}
    for name, base in before.items():
        delta = unet.get_submodule(name).weight.detach().float().cpu() - base
        if delta.abs().max() > 0:  # a layer the concept left alone needs no LoRA weights
            deltas[name] = delta
    rows = token_rows(bundle.tokenizer, bundle.text_encoder, tokens, f"cannot convert {concept_dir}")
    return ConceptDeltas(description, deltas, {m: modules[m] for m in deltas}, rows)


@dataclass
class Factors:
    """``up @ down`` approximates a delta: up (out, r), down (r, in), both fp32."""

    up: torch.Tensor
    down: torch.Tensor
    relative_error: float  # ||delta - up @ down||_F / ||delta||_F of the exact SVD truncation
    discarded: float  # sum of the dropped singular values squared (for the overall error)
    total: float  # sum of all singular values squared (||delta||_F squared)


def factor(delta: torch.Tensor, rank: int) -> Factors:
    """The best rank-``rank`` factorisation of ``delta``, the singular values split evenly between the
    factors (sqrt(S) each, so neither is tiny when the other is large in fp16). Computed in float64."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s[:rank].sqrt()
    total = float(s.square().sum())
    discarded = float(s[rank:].square().sum())
    return Factors(up=(u[:, :rank] * root).float().contiguous(), down=(root[:, None] * vh[:rank]).float().contiguous(),
                   relative_error=(discarded / total) ** 0.5 if total > 0 else 0.0, discarded=discarded, total=total)
