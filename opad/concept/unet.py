"""A ``unet`` concept: the whole fine-tuned UNet (DreamBooth) as a diffusers model folder.

``CONCEPT/unet/`` is what ``unet.save_pretrained(..., safe_serialization=True)`` writes (fp32), so
a plain pipeline takes ``UNet2DConditionModel.from_pretrained(CONCEPT, subfolder="unet")``. OPAD
copies its weights into the UNet it already has, which keeps that UNet's device, dtype and
attention processors (the fused cross-attention K/V of :mod:`opad.models.attention`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from opad.concept.lora import has_adapter
from opad.concept.tensors import check_finite, check_weight, read_safetensors
from opad.errors import OpadError

UNET_DIR = "unet"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = f"{WEIGHTS_NAME}.index.json"  # what save_pretrained writes past its shard size


def check_savable_unet(unet: UNet2DConditionModel, where: str) -> None:
    """A unet concept is written from a float32 UNet without peft layers, every weight finite."""
    if unet.dtype != torch.float32:
        raise OpadError(f"{where}: a unet concept is written in float32, but this UNet is {unet.dtype}")
    if has_adapter(unet):
        raise OpadError(f"{where}: the UNet carries a LoRA adapter; save it as format='lora' (or merge it first)")
    for key, value in unet.state_dict().items():
        check_finite(value, f"{where}: {key!r}")


def write_unet(folder: Path, unet: UNet2DConditionModel) -> None:
    unet.save_pretrained(folder / UNET_DIR, safe_serialization=True)


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OpadError(f"{path} is not valid JSON ({e})") from e


def _check_config(path: Path, unet: UNet2DConditionModel) -> None:
    saved = _json(path)
    if not isinstance(saved, dict):
        raise OpadError(f"{path} is not a UNet config (a JSON object)")
    if saved.get("_class_name", type(unet).__name__) != type(unet).__name__:
        raise OpadError(f"{path} is the config of a {saved['_class_name']}, not a {type(unet).__name__}")
    ours = json.loads(json.dumps(dict(unet.config)))  # tuples as lists, as in the file
    for key in sorted(ours.keys() & saved.keys()):
        if not key.startswith("_") and saved[key] != ours[key]:
            raise OpadError(f"{path}: {key} is {saved[key]!r} but this UNet's is {ours[key]!r} (the concept was "
                            "made from another UNet)")


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    if (folder / INDEX_NAME).is_file():
        index = _json(folder / INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise OpadError(f"{folder / INDEX_NAME} has no weight_map")
        return [folder / name for name in sorted(set(weight_map.values()))]
    if any(folder.glob("*.bin")):
        raise OpadError(f"{folder} holds pickle weights (.bin); concepts load from safetensors only")
    raise OpadError(f"{folder} has no {WEIGHTS_NAME}")


def check_unet(concept_dir: Path, unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """Read ``concept_dir/unet`` and check its config and every weight against ``unet``; the state dict."""
    folder = concept_dir / UNET_DIR
    if not (folder / CONFIG_NAME).is_file():
        raise OpadError(f"{concept_dir} is a unet concept but has no {UNET_DIR}/{CONFIG_NAME}")
    if has_adapter(unet):
        raise OpadError("this UNet carries a LoRA adapter; load a unet concept into a plain UNet")
    _check_config(folder / CONFIG_NAME, unet)
    expected = unet.state_dict()
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        part = read_safetensors(path)
        for key, value in part.items():
            if key not in expected:
                raise OpadError(f"{path}: key {key!r} is not a weight of this UNet")
            check_weight(path, key, value, expected[key].shape)
        state.update(part)
    missing = next((k for k in expected if k not in state), None)
    if missing is not None:
        raise OpadError(f"{folder}: weight {missing!r} is missing (the concept was made for another UNet)")
    return state


def load_unet_weights(unet: UNet2DConditionModel, state: dict[str, torch.Tensor]) -> None:
    """Copy a checked state dict into ``unet`` in place (its device, dtype and processors stay)."""
    unet.load_state_dict(state, strict=True)
