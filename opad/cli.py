"""The ``opad`` console script: ``opad <command> ...`` runs ``python -m opad.<command> ...``
(``opad export onnx|trt ...`` runs ``python export/export_onnx.py`` / ``python export/build_trt.py``,
``opad serve ...`` runs ``python export/serve.py``)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "personalize the one-step student on a few photos (OPAD, or a baseline: --method)",
    "generate": "images from the one-step student, with or without a concept",
    "tiny": "write the tiny offline preset (teacher + student diffusers folders)",
    "fullsize": "write random-weight SD 2.1 / SD-Turbo pipelines and the paper's backbones at their published size",
    "convert": "a concept to the LoRA / embedding files ComfyUI, AUTOMATIC1111 / Forge, kohya and diffusers load",
    "export": "'export onnx': split ONNX graphs (checked with ONNX Runtime); 'export trt': TensorRT engines",
    "serve": "an OpenAI-compatible image server for the student and a folder of concepts",
    "evaluate": "DINO, CLIP-I and CLIP-T of generated images against real photos (DreamBench metrics)",
    "reproduce": "the paper's Table 5 on DreamBench: train, generate and score each (subject, method)",
    "jobs": "train every concept of a jobs file (YAML / CSV), here or as tasks on a Ray cluster (--ray)",
}
EXPORT_MODULES = {"onnx": "opad.export.export_onnx", "trt": "opad.export.build_trt"}
# where each command's main() lives when it is not opad.<command>
MODULES = {"train": "opad.train.cli", "jobs": "opad.jobs.cli"}


def command_module(name: str):
    """The module whose ``main(argv)`` runs ``opad <name>`` (and ``python -m opad.<name>``)."""
    return importlib.import_module(MODULES.get(name, f"opad.{name}"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
        print("usage: opad <command> [options]   (same as python -m opad.<command>)\n\ncommands:")
        print("\n".join(lines))
        print("\n'opad <command> --help' explains a command's options.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    if argv[0] == "export":
        if len(argv) < 2 or argv[1] not in EXPORT_MODULES:
            print("usage: opad export onnx|trt [options]   ('opad export onnx --help' explains)", file=sys.stderr)
            return 2
        return importlib.import_module(EXPORT_MODULES[argv[1]]).main(argv[2:])
    if argv[0] == "serve":
        return importlib.import_module("opad.export.serve").main(argv[1:])
    return command_module(argv[0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
