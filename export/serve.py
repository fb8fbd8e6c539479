"""``python export/serve.py``: the student and every concept of a folder behind an OpenAI-compatible
images API (``POST /v1/images/generations`` with ``model`` = a concept id or ``base``).

The conditioning (text encoder + every cross-attention K/V) runs in PyTorch from each concept's
safetensors, once per (concept, prompt), cached; the backend runs the concept-agnostic
denoise+decode for batches of any concepts. ``--backend auto`` picks TensorRT (with ``--engines``,
TensorRT and a GPU) -> compiled PyTorch (on a GPU) -> ONNX Runtime (with ``--onnx``) -> eager
PyTorch, and logs why. Also ``python -m opad.export.serve`` and ``opad serve``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from opad.export.server.launch import serve

from opad.errors import command_main

BACKEND_CHOICES = ("auto", "tensorrt", "compiled", "onnxruntime", "eager")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python export/serve.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student", default=None, help="student diffusers folder or hub id (default: the preset's, OPAD_PRESET: the mini world or tiny)")
    p.add_argument("--concepts", default=None,
                   help="folder of concepts, one sub-folder each (its name is the model id); rescanned by GET "
                   "/v1/models, so new concepts appear without a restart (default: only 'base')")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="what runs denoise+decode; auto: tensorrt -> compiled -> onnxruntime -> eager")
    p.add_argument("--onnx", default=None, help="an export/export_onnx.py folder of this student (onnxruntime)")
    p.add_argument("--engines", default=None, help="an export/build_trt.py engines folder (tensorrt)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (eager and compiled)")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on a GPU), float32, float16 or bfloat16")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but "
                     "/health (visible to other users in the process list: prefer --api-key-file)")
    key.add_argument("--api-key-file", default=None, help="read the API key from this file")
    p.add_argument("--insecure", action="store_true", help="allow listening on a non-loopback address without a key")
    p.add_argument("--max-batch", type=int, default=8, help="most images in one denoise+decode batch")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long the first waiting image waits for others to share its batch")
    p.add_argument("--queue", type=int, default=64, help="most requests waiting; more get 503 with Retry-After")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per-request limit; later answers are 504")
    p.add_argument("--max-body-kb", type=int, default=64, help="largest request body accepted (413 beyond)")
    p.add_argument("--warm-up-budget-s", type=float, default=300.0,
                   help="ready after this long even if compiled variants are left (they compile in the background; "
                   "/ready lists them)")
    ray = p.add_argument_group("replicas on Ray Serve (docs/cluster.md)")
    ray.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                     help="run the model as Ray Serve replicas on the Ray cluster at ADDRESS (auto: the local one), "
                     "behind this same API; a replica that dies is replaced and its requests answer 503")
    ray.add_argument("--replicas", type=int, default=None, help="how many replicas (with --ray; default 1)")
    ray.add_argument("--min-replicas", type=int, default=None,
                     help="autoscale between --min-replicas and --max-replicas on the requests per replica (with --ray)")
    ray.add_argument("--max-replicas", type=int, default=None, help="see --min-replicas")
    ray.add_argument("--upscale-delay-s", type=float, default=30.0,
                     help="with autoscaling: how long the load must stay above one full batch per replica before "
                     "a replica is added (Ray Serve's upscale_delay_s)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


@command_main(extra="serve")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(args)
    except KeyboardInterrupt:  # Ctrl-C is how a server stops
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
