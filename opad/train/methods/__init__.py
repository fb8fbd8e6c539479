"""Training methods: each supplies its trainable parameters and its step to the shared loop.

``--method`` names one; its module is imported only when it is chosen.
"""

from __future__ import annotations

import importlib

from opad.config import METHODS

# --method -> module:class (opad.config.METHODS lists the same names, for the CLI)
_CLASSES = {
    "opad": "opad.train.methods.opad:OpadMethod",
    "teacher-first": "opad.train.methods.teacher_first:TeacherFirstMethod",
    "custom-diffusion": "opad.train.methods.custom_diffusion:CustomDiffusion",
    "dreambooth": "opad.train.methods.dreambooth:DreamBooth",
    "lora": "opad.train.methods.lora:Lora",
    "textual-inversion": "opad.train.methods.textual_inversion:TextualInversion",
}
assert set(_CLASSES) == set(METHODS)


def method_class(name: str) -> type:
    module, cls = _CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)
