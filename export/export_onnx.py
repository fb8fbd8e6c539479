"""``python export/export_onnx.py``: the student (and a concept) as ONNX graphs split at the concept
boundary, each checked with ONNX Runtime against PyTorch on the same inputs.

Writes into --out (all or nothing)::

    conditioning.onnx            (a) token embeddings -> every cross-attention K/V (this concept's)
    denoise_decode_{N}step.onnx  (b) noise + K/V -> image, concept-agnostic: one file serves every concept
                                 (a lora or unet concept changes weights in it too: that export's (b)
                                 bakes the concept in and serves it alone; export.json says so)
    single_{N}step.onnx          (c) token embeddings + noise -> image (the classic one graph)
    token_embeddings.npy         the (vocab, D) table token ids are looked up in (the concept's rows
                                 included; the lookup stays outside so a new token never changes a shape)
    tokenizer/                   the tokenizer with the concept's tokens
    export.json                  the sidecar: source hashes, concept id, precision, shapes, opset,
                                 exporter, library versions and each graph's measured error

Also ``python -m opad.export.export_onnx`` and ``opad export``.
"""

from __future__ import annotations

import argparse
import sys

from opad.export.exporter.export import export_onnx
from opad.export.exporter.options import EXPORTERS, MIN_OPSET

from opad.errors import command_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python export/export_onnx.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default=None, help="student diffusers folder or hub id (default: the preset's, OPAD_PRESET: the mini world or tiny)")
    p.add_argument("--concept", default=None, help="concept folder written by opad.train.cli (default: none, the base "
                   "student)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--steps", default="1", help="student step counts to export graph (b)/(c) for, e.g. 1 or 1,2,4 "
                   "(each unrolls its step loop)")
    p.add_argument("--fp16", action="store_true", help="export in float16 (default float32)")
    p.add_argument("--batch", type=int, default=1, help="static batch size")
    p.add_argument("--batch-range", default=None, metavar="A:B",
                   help="a dynamic batch dimension from A to B instead of a static --batch")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the student's native size)")
    p.add_argument("--opset", type=int, default=18, help=f"ONNX opset (at least {MIN_OPSET})")
    p.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                   help="torch.onnx.export's exporter: torchscript (tracing; about 8x faster to export here) or "
                   "dynamo (torch.export; torch's recommended one)")
    p.add_argument("--no-single", action="store_true", help="skip the classic single graph (c)")
    p.add_argument("--device", default="cpu", help="where to trace and check: cpu, cuda, cuda:N")
    return p


@command_main(extra="export")  # onnx / onnxruntime / onnxscript
def main(argv: list[str] | None = None) -> int:
    out = export_onnx(build_parser().parse_args(argv))
    print(f"wrote the ONNX graphs and export.json to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
