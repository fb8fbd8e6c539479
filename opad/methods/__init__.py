"""Training methods: each supplies its trainable parameters and its step to the shared loop.

``--method`` names one; its module is imported only when it is chosen.
"""

from __future__ import annotations

import importlib

from opad.config import METHODS

# --method -> module:class (opad.config.METHODS lists the same names, for the CLI)
_CLASSES = {
    "opad": "opad.methods.opad:OpadMethod",
    "teacher-first": "opad.methods.teacher_first:TeacherFirstMethod",
    "custom-diffusion": "opad.methods.custom_diffusion:CustomDiffusion",
    "dreambooth": "opad.methods.dreambooth:DreamBooth",
    "lora": "opad.methods.lora:Lora",
    "textual-inversion": "opad.methods.textual_inversion:TextualInversion",
}
assert set(_CLASSES) == set(METHODS)


def method_class(name: str) -> type:
    module, cls = _CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)
