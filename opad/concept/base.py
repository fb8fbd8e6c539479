"""Which base model a concept was trained on: a probe of UNet weights no concept but a whole-UNet one
changes (the input and output convolutions), saved in opad_concept.json and compared on conversion.

A probe, not a hash of the bytes: a run may hold its frozen weights in bf16 or fp16, so the saved
values are the base's rounded to that dtype, and the comparison allows for that rounding (a
different model differs by far more). The SHA-256 of the probe's float32 values is its printable id.
"""

from __future__ import annotations

import hashlib

import torch
from diffusers import UNet2DConditionModel

from opad.errors import OpadError

PROBE_MODULES = ("conv_in", "conv_out")
PROBE_VALUES = 32  # per module, evenly spaced through its weight
RTOL, ATOL = 1e-2, 1e-4  # bf16 keeps about 3 significant digits


def probe(unet: UNet2DConditionModel) -> list[float]:
    """``PROBE_VALUES`` evenly spaced weights of each probe module, as float32."""
    values = []
    for name in PROBE_MODULES:
        weight = unet.get_submodule(name).weight.detach().flatten().float().cpu()
        index = torch.linspace(0, weight.numel() - 1, PROBE_VALUES).round().long()
        values += weight[index].tolist()
    return values


def probe_id(values: list[float]) -> str:
    """A short printable id of a probe (the SHA-256 of its float32 bytes, 16 hex digits)."""
    return hashlib.sha256(torch.tensor(values, dtype=torch.float32).numpy().tobytes()).hexdigest()[:16]


def base_record(unet: UNet2DConditionModel) -> dict:
    """What opad_concept.json keeps of the base model."""
    values = probe(unet)
    return {"probe": [float(f"{v:.7g}") for v in values], "probe_id": probe_id(values)}


def check_same_base(record: dict | None, unet: UNet2DConditionModel, where: str, base: str) -> bool:
    """Refuse a base model that is not the one ``record`` was taken from; False when there is no record
    (a folder from diffusers or an older opad: the caller says it could not check)."""
    if record is None:
        return False
    saved = record.get("probe") if isinstance(record, dict) else None
    if not isinstance(saved, list) or len(saved) != PROBE_VALUES * len(PROBE_MODULES):
        raise OpadError(f"{where}: its record of the base model is damaged (opad_concept.json 'base')")
    try:
        here = probe(unet)
    except (AttributeError, RuntimeError) as e:
        raise OpadError(f"{where} was not trained on {base!r}: that UNet has no {PROBE_MODULES} ({e})") from e
    if not torch.allclose(torch.tensor(here), torch.tensor(saved, dtype=torch.float32), rtol=RTOL, atol=ATOL):
        raise OpadError(
            f"{where} was trained on another base model than {base!r} (base id {record.get('probe_id')}, "
            f"this one {probe_id(here)}); pass the model it was trained on with --base "
            "(for a run's teacher_concept/, the teacher)")
    return True
