"""The files community tools load: kohya's LoRA layout (kohya-ss, ComfyUI, AUTOMATIC1111 / Forge), the
SD 2.x embedding file, and diffusers' PEFT LoRA layout.

kohya names a UNet layer ``lora_unet_`` + its diffusers module name with every ``.`` made ``_``
(``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`` ->
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k``), with tensors
``.lora_down.weight`` (rank, in), ``.lora_up.weight`` (out, rank) and ``.alpha`` (a scalar; the
applied delta is ``up @ down * alpha / rank``). ComfyUI's ``comfy/lora.py`` (``model_lora_keys_unet``)
builds exactly these names from ``comfy.utils.unet_to_diffusers``; A1111's Lora extension maps them
to its LDM names by regex (``convert_diffusers_name_to_compvis``). An SD 2.x embedding file holds one
tensor, (vectors, text width), under ``emb_params`` (kohya's key; A1111, ComfyUI and diffusers read a
file's single tensor whatever its key); the prompt word is the file's name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import safetensors.torch
import torch
from peft import LoraConfig

import opad
from opad.concept.lora import write_lora

KOHYA_PREFIX = "lora_unet_"
EMBEDDING_KEY = "emb_params"
WORD = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")  # a file name on every OS and one prompt word


def kohya_name(module: str) -> str:
    """kohya's name of a UNet layer, from its diffusers module name."""
    return KOHYA_PREFIX + module.replace(".", "_")


def base_model_version(cross_attention_dim: int) -> str:
    """kohya's ``ss_base_model_version`` for a UNet of this text width (SD 1.x: 768, SD 2.x: 1024)."""
    return {768: "sd_v1", 1024: "sd_v2"}.get(cross_attention_dim, "unknown")


def _strings(metadata: dict) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def kohya_state(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """kohya's tensors for ``{module: (up, down)}``, alpha = rank (a scale of 1)."""
    state = {}
    for module, (up, down) in factors.items():
        name = kohya_name(module)
        state[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        state[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
    return state


def write_kohya(path: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype,
                metadata: dict) -> None:
    safetensors.torch.save_file(kohya_state(factors, dtype), path, metadata=_strings(metadata))


def write_embedding(path: Path, row: torch.Tensor, dtype: torch.dtype, metadata: dict) -> None:
    """One token's SD 2.x embedding file: ``{"emb_params": (1, width)}``."""
    safetensors.torch.save_file({EMBEDDING_KEY: row.reshape(1, -1).to(dtype).contiguous()}, path,
                                metadata=_strings(metadata))


def write_diffusers_lora(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """diffusers' LoRA file (what ``pipe.load_lora_weights(folder)`` reads), alpha = rank per layer, the
    per-layer ranks in the adapter config's rank and alpha patterns."""
    ranks = {module: down.shape[0] for module, (_, down) in factors.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    patterns = {m: r for m, r in ranks.items() if r != common}
    config = LoraConfig(r=common, lora_alpha=common, target_modules=sorted(ranks), rank_pattern=patterns,
                        alpha_pattern=patterns).to_dict()
    state = {}
    for module, (up, down) in factors.items():
        state[f"{module}.lora.down.weight"] = down.float().contiguous()
        state[f"{module}.lora.up.weight"] = up.float().contiguous()
    write_lora(folder, state, config)


def common_metadata(*, name: str, base: str, base_id: str | None, rank: str, description: dict,
                    tokens: list[str], words: list[str], cross_attention_dim: int) -> dict:
    """What every converted file says about itself: opad's fields and kohya's ``ss_`` fields (which
    kohya's tools and A1111's metadata view show)."""
    return {
        "opad_version": opad.__version__,
        "opad_base_model": base,
        "opad_base_id": base_id or "not recorded",
        "opad_rank": rank,
        "opad_alpha": "equal to each layer's rank (scale 1)",
        "opad_tokens": tokens,
        "opad_prompt_words": words,
        "opad_source_format": description["format"],
        "opad_method": description.get("method", description["format"]),
        "ss_output_name": name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": rank,
        "ss_base_model_version": base_model_version(cross_attention_dim),
        "ss_v2": str(cross_attention_dim == 1024),
        "ss_sd_model_name": base,
        "ss_training_comment": f"converted by opad {opad.__version__} from a {description['format']} concept "
                               f"({description.get('method', description['format'])})",
    }
