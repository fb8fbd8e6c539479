"""Training methods: each supplies its trainable parameters and its step to the shared loop.

``--method`` names one; its module is imported only when it is chosen. ``METHOD_CLASSES`` is the one
list of method names: opad.config reads it for ``--method`` (so this module imports nothing heavy).
"""

from __future__ import annotations

import importlib

# --method -> module:class: OPAD, its teacher-first variant, and the paper's Table-5 baselines
METHOD_CLASSES: dict[str, str] = {
    "opad": "opad.train.methods.opad:OpadMethod",
    "teacher-first": "opad.train.methods.teacher_first:TeacherFirstMethod",
    "custom-diffusion": "opad.train.methods.custom_diffusion:CustomDiffusion",
    "dreambooth": "opad.train.methods.dreambooth:DreamBooth",
    "lora": "opad.train.methods.lora:Lora",
    "textual-inversion": "opad.train.methods.textual_inversion:TextualInversion",
}
# the Table-5 baselines train the student alone: no teacher, discriminators or collaborative stage
BASELINES: tuple[str, ...] = ("custom-diffusion", "dreambooth", "lora", "textual-inversion")


def method_class(name: str) -> type:
    module, cls = METHOD_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)
