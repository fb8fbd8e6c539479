"""``python export/build_trt.py --onnx DIR --out DIR``: TensorRT engines from an ONNX export.

Builds, from the folder ``export/export_onnx.py`` wrote:

- ``conditioning.plan``: refittable for exactly the cross-attention K/V weights (switching concept
  refits the engine instead of rebuilding it), with ``refit_map.json`` naming, for every PyTorch
  K/V parameter, the engine weight it becomes (and whether transposed);
- ``denoise_decode_{N}step.plan``: the concept-agnostic graph, one engine for every concept;
- ``engines.json``: the sidecar (the ONNX export's, plus profiles, what the engines compute in and
  how they were built, the refit weights' dtype, TensorRT version, each engine's measured error
  against ONNX Runtime on the same inputs).

Precision (:func:`opad.export.engines.plan.engine_precision`): an fp16 export becomes a strongly typed
network (every tensor in the type the ONNX graph gives it, as ONNX Runtime checked it); an fp32
export is exact fp32 (TF32 off: the parity check compares with exact fp32), or with ``--fp16``
weakly typed with TensorRT free to pick fp16 per layer. Refit weights keep the ONNX initializers'
dtype whatever the engine computes in.

The profile is the export's own batch (static by default) or ``--batch-range A:B`` inside it.
``--plan-only`` writes the refit map and sidecar without TensorRT, to inspect what would be built.

**Unverified**: TensorRT cannot be installed where opad is developed (its PyPI packages download
from NVIDIA's index), so the engine build, the refit and the parity check have never run. Without
``tensorrt`` or a GPU the script says so in one line and writes nothing.
Also ``python -m opad.export.build_trt``.
"""

from __future__ import annotations

import argparse
import sys

from opad.export.engines.build import build

from opad.errors import command_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python export/build_trt.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True, help="a folder written by export/export_onnx.py")
    p.add_argument("--out", required=True, help="output folder for the engines (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--fp16", action="store_true", help="let TensorRT pick fp16 kernels per layer (an fp32 export; an "
                   "fp16 export is built as fp16 anyway)")
    p.add_argument("--device", default="cuda", help="the CUDA device to build and check on: cuda or cuda:N")
    p.add_argument("--batch-range", default=None, metavar="A:B", help="the engines' batch profile, within the "
                   "export's (default: the export's own)")
    p.add_argument("--timing-cache", default=None, help="a TensorRT timing cache file, read if present and "
                   "written after the build (speeds up rebuilds)")
    p.add_argument("--workspace-gb", type=float, default=8.0, help="TensorRT's workspace memory limit")
    p.add_argument("--plan-only", action="store_true", help="write refit_map.json and engines.json only "
                   "(no TensorRT needed)")
    return p


@command_main(extra="export")  # onnx / onnxruntime
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = build(args)
    what = "the refit map and engines.json (no engines: --plan-only)" if args.plan_only else "the engines"
    print(f"wrote {what} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
