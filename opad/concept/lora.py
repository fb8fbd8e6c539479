"""A ``lora`` concept: the UNet's peft LoRA adapter as diffusers' LoRA file.

``CONCEPT/pytorch_lora_weights.safetensors`` is what ``StableDiffusionPipeline.save_lora_weights``
writes (keys ``unet.<module>.lora.down/up.weight``, the adapter's ``LoraConfig`` in the header's
``lora_adapter_metadata`` so an alpha other than the rank survives), so a plain pipeline's
``load_lora_weights(CONCEPT)`` reads it. OPAD merges it into the base weights: afterwards the UNet
is a plain UNet again (no peft layers), and compiles and exports as before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_diffusers
from peft import get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from opad.concept.tensors import check_float, read_safetensors, read_safetensors_metadata
from opad.errors import OpadError, first_line

LORA_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name
PREFIX = "unet"  # diffusers' key prefix of the UNet's LoRA weights
METADATA_KEY = "lora_adapter_metadata"
ADAPTER = "opad_concept"
# diffusers' own suffixes and peft's (diffusers loads either): the down (A) and up (B) matrices
_DOWN = (".lora.down.weight", ".lora_A.weight")
_UP = (".lora.up.weight", ".lora_B.weight")


def has_adapter(unet: UNet2DConditionModel) -> bool:
    return bool(getattr(unet, "peft_config", None))


def lora_state(unet: UNet2DConditionModel) -> tuple[dict[str, torch.Tensor], dict]:
    """The UNet's one peft adapter in diffusers' key format (fp32, CPU) and its LoraConfig as a dict."""
    configs = getattr(unet, "peft_config", None) or {}
    if len(configs) != 1:
        raise OpadError(f"a lora concept is the UNet's one LoRA adapter, but the UNet carries {len(configs)} "
                        "(add it with unet.add_adapter(peft.LoraConfig(...)))")
    name, config = next(iter(configs.items()))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=name))
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}, config.to_dict()


def write_lora(folder: Path, state: dict[str, torch.Tensor], config: dict) -> None:
    StableDiffusionLoraLoaderMixin.save_lora_weights(folder, unet_lora_layers=state, safe_serialization=True,
                                                     unet_lora_adapter_metadata=config)


@dataclass
class CheckedLora:
    """A LoRA file checked against a UNet, not applied yet."""

    path: Path
    state: dict[str, torch.Tensor]  # the file's keys, prefix included
    metadata: dict | None  # the LoraConfig, keys prefixed as in the file; None: diffusers infers it
    modules: list[str]  # the UNet modules it adapts


def split_key(path: Path, key: str) -> tuple[str, str]:
    """(module name, "down" or "up") of a file key."""
    if not key.startswith(f"{PREFIX}."):
        raise OpadError(f"{path}: key {key!r} is not a UNet LoRA weight (only the UNet's, '{PREFIX}.*', "
                        "are supported)")
    for kind, suffixes in (("down", _DOWN), ("up", _UP)):
        for suffix in suffixes:
            if key.endswith(suffix):
                return key[len(PREFIX) + 1:-len(suffix)], kind
    raise OpadError(f"{path}: key {key!r} is not a LoRA down/up weight (…lora.down.weight or …lora.up.weight)")


def _metadata(path: Path) -> dict | None:
    text = read_safetensors_metadata(path).get(METADATA_KEY)
    if text is None:
        return None
    try:
        metadata = json.loads(text)
    except ValueError as e:
        raise OpadError(f"{path}: its {METADATA_KEY} is not valid JSON ({e})") from e
    if not isinstance(metadata, dict):
        raise OpadError(f"{path}: its {METADATA_KEY} is not a JSON object")
    return metadata


def _check_rank(path: Path, metadata: dict | None, ranks: dict[str, int]) -> None:
    if metadata is None or metadata.get(f"{PREFIX}.rank_pattern"):  # patterns are peft's to resolve
        return
    rank = metadata.get(f"{PREFIX}.r")
    wrong = next((m for m, r in ranks.items() if r != rank), None)
    if wrong is not None:
        raise OpadError(f"{path}: the weights of {wrong!r} have rank {ranks[wrong]} but its metadata says r={rank}")


def check_lora(path: Path, unet: UNet2DConditionModel) -> CheckedLora:
    """Read a LoRA file and check every key, shape, dtype and value against ``unet``."""
    if not path.is_file():
        raise OpadError(f"{path.parent} is a lora concept but has no {LORA_NAME}")
    if has_adapter(unet):
        raise OpadError("this UNet already carries a LoRA adapter; load a lora concept into a plain UNet")
    state = read_safetensors(path)
    if not state:
        raise OpadError(f"{path} holds no weights")
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in state.items():
        module, kind = split_key(path, key)
        pairs.setdefault(module, {})[kind] = (key, value)
    ranks = {}
    for module, pair in pairs.items():
        ranks[module] = _check_pair(path, unet, module, pair)
    metadata = _metadata(path)
    _check_rank(path, metadata, ranks)
    return CheckedLora(path, state, metadata, list(pairs))


def _check_pair(path: Path, unet: UNet2DConditionModel, module: str, pair: dict) -> int:
    """Check one module's down (rank, in) and up (out, rank) matrices; return the rank."""
    any_key = next(iter(pair.values()))[0]
    try:
        layer = unet.get_submodule(module)
    except AttributeError:
        raise OpadError(f"{path}: key {any_key!r} names {module!r}, which is no module of this UNet") from None
    if not isinstance(layer, torch.nn.Linear):
        raise OpadError(f"{path}: key {any_key!r} names {module!r}, a {type(layer).__name__}; only linear layers "
                        "are supported")
    for kind in ("down", "up"):
        if kind not in pair:
            raise OpadError(f"{path}: {module!r} has a LoRA {'up' if kind == 'down' else 'down'} weight but no "
                            f"{kind} weight")
        check_float(path, *pair[kind])
    (down_key, down), (up_key, up) = pair["down"], pair["up"]
    if down.dim() != 2 or down.shape[1] != layer.in_features or down.shape[0] < 1:
        raise OpadError(f"{path}: key {down_key!r} has shape {tuple(down.shape)} but {module!r} needs "
                        f"(rank, {layer.in_features})")
    if up.shape != (layer.out_features, down.shape[0]):
        raise OpadError(f"{path}: key {up_key!r} has shape {tuple(up.shape)} but {module!r} with rank "
                        f"{down.shape[0]} needs ({layer.out_features}, {down.shape[0]})")
    return down.shape[0]


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence a library logger: its error is re-raised as one line instead of printed in full."""
    log = logging.getLogger(name)
    old = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(old)


def _check_injected(unet: UNet2DConditionModel, lora: CheckedLora) -> None:
    missed = next((m for m in lora.modules if not isinstance(unet.get_submodule(m), BaseTunerLayer)), None)
    if missed is not None:
        raise OpadError(f"its LoRA config does not target {missed!r}, which the file has weights for")
    if any(p.is_meta for p in unet.parameters()):  # built empty and never filled from the file
        raise OpadError("its LoRA config needs weights the file does not have (e.g. DoRA magnitudes or biases)")


def merge_lora(unet: UNet2DConditionModel, lora: CheckedLora) -> None:
    """Merge a checked LoRA into ``unet``'s base weights through diffusers' peft integration
    (load_lora_adapter, fuse_lora, unload_lora), leaving no peft layer behind. On any failure the
    adapter is dropped and the weights it touched are restored, so the UNet is as it was."""
    layers = [unet.get_submodule(m) for m in lora.modules]
    saved = [layer.weight.detach().clone() for layer in layers]  # to undo a merge that fails half-way
    # on the UNet's device (the adapter is assigned these very tensors), in fp32 (the delta B @ A is
    # computed in the adapter's dtype, then added in the UNet's)
    state = {k: v.to(unet.device, torch.float32) for k, v in lora.state.items()}
    try:
        with _quiet("diffusers.loaders.peft"):
            # low_cpu_mem_usage: the adapter is built empty and assigned (no random init to overwrite)
            unet.load_lora_adapter(state, prefix=PREFIX, adapter_name=ADAPTER, metadata=lora.metadata,
                                   low_cpu_mem_usage=True)
        _check_injected(unet, lora)
        unet.fuse_lora(safe_fusing=True, adapter_names=[ADAPTER])  # safe: refuses a merge that overflows
    except Exception as e:  # noqa: BLE001 - peft and diffusers raise many types; say which file and why
        unet.unload_lora()
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                layer.weight.copy_(weight)
        raise OpadError(f"{lora.path}: diffusers could not load the LoRA adapter ({first_line(e)})") from e
    unet.unload_lora()
    for layer in layers:  # peft merges through .data, which autograd's version counter (the K/V cache's key) misses
        torch.autograd.graph.increment_version(layer.weight)
