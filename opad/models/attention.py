"""Cross-attention with every layer's K/V computed together, once per (UNet, context).

Every cross-attention layer of a UNet projects the same text context with its own ``to_k`` /
``to_v``. :func:`install_fused_kv` gives the UNet one :class:`CrossAttentionKV`, which computes
all layers' K and V in one :func:`opad.kernels.kv_proj.kv_project` call (the Triton kernel or the
per-layer reference, as ``OPAD_KERNELS`` chooses) the first time a layer asks for a context, and
a :class:`FusedKVAttnProcessor` per layer, which is diffusers' ``AttnProcessor2_0`` with K/V
taken from there. Numerically the processor equals diffusers' (the reference path is the same
``F.linear``; the kernel is within fp32 rounding).

The K/V are computed when the UNet is called, before its blocks run: afresh for every call while
autograd records (a graph must not be reused after its backward), and under ``no_grad`` only when
the context tensor or a weight changed (the sampler's steps reuse them). A gradient-checkpointed
block recomputing itself in backward reads the same cached K/V.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import Tensor

from opad.kernels.kv_proj import kv_project


def cross_attention_layers(unet: UNet2DConditionModel) -> dict[str, Attention]:
    """The UNet's cross-attention modules (``...attn2``) by name, in model order."""
    return {
        name.removesuffix(".processor"): unet.get_submodule(name.removesuffix(".processor"))
        for name in unet.attn_processors
        if name.endswith("attn2.processor")
    }


def _plain_linear(m: torch.nn.Module) -> bool:
    # hooks, a bias or a wrapped layer (LoRA) mean the module itself must run
    return (type(m) is torch.nn.Linear and m.bias is None and not m._forward_hooks and not m._forward_pre_hooks)


class CrossAttentionKV:
    """K/V of every cross-attention layer of one UNet, computed in one go per context."""

    def __init__(self, layers: list[Attention]) -> None:
        self.layers = layers
        self.detach_first_token = False  # Custom Diffusion's start-token detach (values unchanged)
        self._key: tuple | None = None
        self._context: Tensor | None = None
        self._version = 0
        self._kv: list[tuple[Tensor, Tensor]] = []
        self._given: list[tuple[Tensor, Tensor]] | None = None
        self.computations = 0  # how many times all layers' K/V were computed (tests read it)

    @contextmanager
    def given(self, kv: Sequence[tuple[Tensor, Tensor]]) -> Iterator[None]:
        """Inside, every layer takes its (key, value) from ``kv`` and the context is ignored: the
        export's concept-agnostic denoise graph gets the K/V as inputs (DESIGN.md §5)."""
        if len(kv) != len(self.layers):
            raise ValueError(f"{len(kv)} K/V pairs given for {len(self.layers)} cross-attention layers")
        self._given = list(kv)
        try:
            yield
        finally:
            self._given = None

    def prepare(self, context: Tensor, fresh: bool) -> None:
        """Compute every layer's K/V for ``context`` unless cached (``fresh``: always compute)."""
        if self._given is not None:
            return
        key = self._cache_key(context)
        if fresh or key != self._key or not self._same_context(context):
            self._kv = self._compute(context)
            self._key, self._context, self._version = key, context, context._version
            self.computations += 1

    def _same_context(self, context: Tensor) -> bool:
        # the sampler's CFG concatenates [uncond, cond] anew each step: equal values count too, but
        # only outside autograd (K/V recorded from another tensor would send its gradient there)
        cached = self._context
        if cached is context:
            return context._version == self._version
        return (not torch.is_grad_enabled() and cached is not None and cached.shape == context.shape
                and cached.dtype == context.dtype
                and cached.device == context.device and torch.equal(cached, context))

    def get(self, index: int, context: Tensor) -> tuple[Tensor, Tensor]:
        """(key, value) of layer ``index`` for ``context``, each (B, heads, S, head_dim)."""
        if self._given is not None:
            return self._given[index]
        self.prepare(context, fresh=False)
        return self._kv[index]

    def _weights(self) -> list[Tensor]:
        return [w for m in self.layers for w in (m.to_k.weight, m.to_v.weight)]

    def _cache_key(self, context: Tensor) -> tuple:
        # every parameter of the projection modules, and the modules themselves: a LoRA adapter
        # wraps to_k / to_v (new modules), and trains its own weights beside the base weight
        projections = [p for m in self.layers for p in (m.to_k, m.to_v)]
        params = tuple((id(w), w._version) for proj in projections for w in proj.parameters())
        return (torch.is_grad_enabled(), torch.is_autocast_enabled(context.device.type),
                self.detach_first_token, tuple(map(id, projections)), params)

    def compute(self, context: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every layer's (key, value) for ``context``, uncached (the export's conditioning graph)."""
        return self._compute(context)

    def _compute(self, context: Tensor) -> list[tuple[Tensor, Tensor]]:
        B, S = context.shape[:2]
        fused = all(_plain_linear(m.to_k) and _plain_linear(m.to_v) and not m.norm_cross for m in self.layers)
        if fused:
            heads = [m.heads for m in self.layers for _ in (0, 1)]
            outs = kv_project(context, self._weights(), heads)
        else:
            outs = []
            for m in self.layers:
                x = m.norm_encoder_hidden_states(context) if m.norm_cross else context
                outs += [p(x).view(B, S, m.heads, -1).transpose(1, 2) for p in (m.to_k, m.to_v)]
        if self.detach_first_token:
            outs = [torch.cat([o[:, :, :1].detach(), o[:, :, 1:]], dim=2) for o in outs]
        return list(zip(outs[0::2], outs[1::2]))


class FusedKVAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` for cross-attention, with K/V from the UNet's shared provider."""

    def __init__(self, kv: CrossAttentionKV, index: int) -> None:
        self.kv, self.index = kv, index

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        if encoder_hidden_states is None:
            raise ValueError("FusedKVAttnProcessor is for cross-attention and needs encoder_hidden_states")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length = encoder_hidden_states.shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key, value = self.kv.get(self.index, encoder_hidden_states)
        head_dim = key.shape[-1]
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                       dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_fused_kv(unet: UNet2DConditionModel) -> CrossAttentionKV:
    """Give ``unet``'s cross-attention layers the shared-K/V processor; return the provider."""
    existing = fused_kv(unet)
    if existing is not None:
        return existing
    layers = cross_attention_layers(unet)
    kv = CrossAttentionKV(list(layers.values()))
    processors = dict(unet.attn_processors)
    for index, name in enumerate(layers):
        processors[f"{name}.processor"] = FusedKVAttnProcessor(kv, index)
    unet.set_attn_processor(processors)

    def compute_before_the_blocks(module, args, kwargs):
        # Outside every block, so gradient checkpointing's recomputation of a block finds the
        # same K/V (and saves no tensors the forward did not). While autograd records, always
        # fresh: a graph must not be reused after its backward.
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if context is not None:
            kv.prepare(context, fresh=torch.is_grad_enabled())

    unet.register_forward_pre_hook(compute_before_the_blocks, with_kwargs=True)
    unet._opad_kv = kv
    return kv


def fused_kv(unet: UNet2DConditionModel) -> CrossAttentionKV | None:
    """The provider :func:`install_fused_kv` gave ``unet``, if its processors are still in place."""
    kv = getattr(unet, "_opad_kv", None)
    if kv is None or not any(isinstance(p, FusedKVAttnProcessor) for p in unet.attn_processors.values()):
        return None
    return kv
