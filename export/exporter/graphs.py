"""The exported graphs as torch modules (DESIGN.md §5), split at the concept boundary.

A Custom Diffusion or textual-inversion concept changes only the cross-attention K/V weights and
token rows, so:

- :class:`ConditioningGraph` (a): token embeddings (B, 77, D) -> text encoder -> every
  cross-attention layer's K and V, head-split (B, heads, 77, head_dim). It holds everything a
  concept owns except the token rows: the embedding lookup stays outside, so a new token never
  changes a shape.
- :class:`DenoiseDecodeGraph` (b): noise + the per-layer K/V -> the student UNet at its fixed
  timestep(s) (a 2- or 4-step student unrolled) -> x0 -> VAE decode -> the uint8 NHWC image, and
  the float image in [0, 1] before quantization (for parity checks). No such concept's weight is
  in it, so one file serves every one of them. (A lora or unet concept changes UNet weights too:
  exported with one, this graph holds it and serves that concept alone.)
- :class:`SingleGraph` (c): token embeddings -> image, the classic one-graph export.

Each equals :func:`opad.diffusion.sampling.sample_student` on the same noise (tests check it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import CLIPTextModel

from opad.diffusion.schedule import ddim_sample, trailing_timesteps, turbo_initial_latent, unet_prediction
from opad.models.attention import fused_kv, install_fused_kv
from opad.models.loading import ModelBundle


def encode_token_embeddings(text_encoder: CLIPTextModel, token_embeds: Tensor) -> Tensor:
    """CLIPTextModel's last hidden state from token embeddings instead of ids (causal, as its forward)."""
    model = getattr(text_encoder, "text_model", text_encoder)  # transformers < 5 wraps it in text_model
    hidden = model.embeddings(inputs_embeds=token_embeds)
    seq = hidden.shape[1]
    mask = torch.full((seq, seq), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device).triu(1)
    hidden = model.encoder(inputs_embeds=hidden, attention_mask=mask[None, None]).last_hidden_state
    return model.final_layer_norm(hidden)


def token_embedding_table(text_encoder: CLIPTextModel) -> Tensor:
    """The (vocab, D) table the runner looks token ids up in (a concept's rows included)."""
    return text_encoder.get_input_embeddings().weight


class ConditioningGraph(nn.Module):
    """(a) token embeddings -> (k_0, v_0, k_1, v_1, ...) for every cross-attention layer."""

    def __init__(self, bundle: ModelBundle) -> None:
        super().__init__()
        self.text_encoder = bundle.text_encoder
        self.unet = bundle.student_unet  # only its attn2.to_k / to_v run here
        self.kv = fused_kv(self.unet) or install_fused_kv(self.unet)

    def forward(self, token_embeds: Tensor) -> tuple[Tensor, ...]:
        context = encode_token_embeddings(self.text_encoder, token_embeds)
        return tuple(t for pair in self.kv.compute(context.to(self.unet.dtype)) for t in pair)


class DenoiseDecodeGraph(nn.Module):
    """(b) noise (B, 4, h, w) + K/V -> (uint8 image (B, H, W, 3), float image (B, 3, H, W) in [0, 1])."""

    def __init__(self, bundle: ModelBundle, steps: int) -> None:
        super().__init__()
        self.unet, self.vae = bundle.student_unet, bundle.vae
        self.kv = fused_kv(self.unet) or install_fused_kv(self.unet)
        cfg = bundle.student_scheduler.config
        self.timesteps = trailing_timesteps(steps, cfg.num_train_timesteps)
        # on the UNet's device: a CPU schedule would be a host->device copy per step (and inside a CUDA graph)
        self.register_buffer("alphas_cumprod", bundle.student_scheduler.alphas_cumprod.to(self.unet.device, copy=True),
                             persistent=False)
        self.prediction_type = cfg.prediction_type
        self.scaling_factor = bundle.vae.config.scaling_factor
        # read once: a diffusers model's .dtype walks every module, and torch.compile would trace that walk
        self.unet_dtype, self.vae_dtype = self.unet.dtype, self.vae.dtype
        self.context_dim = self.unet.config.cross_attention_dim

    def forward(self, noise: Tensor, *kv: Tensor) -> tuple[Tensor, Tensor]:
        return self.decode(self.denoise(noise, *kv))

    def denoise(self, noise: Tensor, *kv: Tensor) -> Tensor:
        """The UNet step(s): noise + K/V -> the clean latent z0."""
        pairs = list(zip(kv[0::2], kv[1::2]))
        # the UNet's signature wants a context; with the K/V given, only its batch size is read
        placeholder = noise.new_zeros(noise.shape[0], 1, self.context_dim)
        with self.kv.given(pairs):
            return ddim_sample(lambda z, t: unet_prediction(self.unet, z, t, placeholder, self.unet_dtype),
                               turbo_initial_latent(noise, self.timesteps[0], self.alphas_cumprod),
                               self.timesteps, self.alphas_cumprod, self.prediction_type)

    def decode(self, z0: Tensor) -> tuple[Tensor, Tensor]:
        return decode_to_images(self.vae, z0, self.scaling_factor, self.vae_dtype)


class SingleGraph(nn.Module):
    """(c) token embeddings + noise -> (uint8 image, float image): the classic single graph."""

    def __init__(self, bundle: ModelBundle, steps: int) -> None:
        super().__init__()
        self.conditioning = ConditioningGraph(bundle)
        self.denoise = DenoiseDecodeGraph(bundle, steps)

    def forward(self, token_embeds: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        return self.denoise(noise, *self.conditioning(token_embeds))


def decode_to_images(vae: nn.Module, z0: Tensor, scaling_factor: float,
                     dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """VAE decode -> (uint8 NHWC, rounded as :func:`opad.generate.to_pil`; float NCHW in [0, 1]);
    ``dtype``: the VAE's, when the caller knows it."""
    image = vae.decode((z0 / scaling_factor).to(dtype or vae.dtype)).sample.float()
    image = (image / 2 + 0.5).clamp(0, 1)
    return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1), image
