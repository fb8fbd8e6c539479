"""Building the TensorRT engines of ``python export/build_trt.py`` (its docstring says what it writes
and how each engine's precision is chosen): the refit map, one engine per ONNX graph with its
optimization profile, each checked against ONNX Runtime on the same inputs, and ``engines.json``;
written all or nothing. **Unverified**: TensorRT cannot be installed where opad is developed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from opad.export.engines.execution import execute, on_device, tensorrt
from opad.export.engines.plan import (
    ENGINES,
    REFIT_MAP,
    engine_precision,
    kv_parameter_names,
    parse_batch_range,
    profile_shapes,
    refit_map,
)
from opad.export.exporter.export import TOLERANCE  # the same bound: |TensorRT - ONNX Runtime|
from opad.export.exporter.sidecar import read_sidecar

from opad.config import DEVICE_PATTERN
from opad.errors import OpadError
from opad.fsutil import check_output_folder, staged_dir


def kv_parameters_of(record: dict) -> dict[str, np.ndarray]:
    """The K/V weights the export's conditioning graph was made from, by PyTorch parameter name."""
    from opad.concept.folder import kv_parameters, load_concept
    from opad.models.loading import load_models

    bundle = load_models(student=record["student"], load_teacher=False)
    if record.get("concept"):
        if not Path(record["concept"]).is_dir():
            raise OpadError(f"the export's concept folder {record['concept']!r} is gone; the refit map is made "
                            "against its weights")
        load_concept(record["concept"], bundle.student_unet, bundle.tokenizer, bundle.text_encoder)
    unet = bundle.student_unet
    return {name: w.detach().float().cpu().numpy() for name, w in zip(kv_parameter_names(unet), kv_parameters(unet))}


def build_engine(trt, onnx_path: Path, shapes: dict[str, list[list[int]]], *, precision: dict, refittable: list[str],
                 timing_cache: bytes, workspace_gb: float) -> tuple[bytes, bytes]:
    """(serialized engine, timing cache) for one ONNX file (TensorRT 10 API; unverified here), built
    as ``precision`` (:func:`opad.export.engines.plan.engine_precision`) says."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # explicit batch is TensorRT 10's only mode; strongly typed: the ONNX graph's types decide
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if precision["strongly_typed"] else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise OpadError(f"TensorRT cannot parse {onnx_path.name}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if precision["fp16_flag"]:
        config.set_flag(trt.BuilderFlag.FP16)
    if not precision["tf32"]:  # on by default in TensorRT
        config.clear_flag(trt.BuilderFlag.TF32)
    if refittable:  # exactly these weights may change; everything else is folded and optimized
        config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
        for name in refittable:
            if not network.mark_weights_refittable(name):
                raise OpadError(f"TensorRT cannot mark {name} of {onnx_path.name} refittable")
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise OpadError(f"TensorRT failed to build {onnx_path.name} (its log above says why)")
    return bytes(engine), bytes(cache.serialize())


def check_args(args: argparse.Namespace) -> dict:
    record = read_sidecar(args.onnx)
    for name in record["files"].values():
        if not (Path(args.onnx) / name).is_file():
            raise OpadError(f"{args.onnx} lacks {name}, which its {Path(args.onnx) / 'export.json'} lists")
    if args.fp16 and record["precision"] != "fp32":
        raise OpadError(f"--fp16 builds from an fp32 export; {args.onnx} is {record['precision']}")
    if args.workspace_gb <= 0:
        raise OpadError(f"--workspace-gb must be positive, got {args.workspace_gb}")
    if not DEVICE_PATTERN.match(args.device) or args.device == "auto":
        raise OpadError(f"--device must be cuda or cuda:N, got {args.device!r}")
    check_output_folder(args.out, args.overwrite)
    return record


def build(args: argparse.Namespace) -> Path:
    record = check_args(args)
    batch = parse_batch_range(args.batch_range, record["batch"])
    shapes = profile_shapes(record, batch)
    device = torch.device(args.device)
    trt = None if args.plan_only else tensorrt(device)  # before any work: one sentence if it is missing
    onnx_dir, out = Path(args.onnx), Path(args.out)
    entries = refit_map(onnx_dir / "conditioning.onnx", kv_parameters_of(record))
    precision = engine_precision(record["precision"], args.fp16)
    errors: dict[str, float] = {}
    # TensorRT builds on the current CUDA device (nothing to switch to for a --plan-only build)
    with on_device(device) if trt is not None else contextlib.nullcontext(), staged_dir(out, replace=True) as tmp:
        (tmp / REFIT_MAP).write_text(json.dumps(entries, indent=1) + "\n")
        if trt is not None:
            cache_path = Path(args.timing_cache) if args.timing_cache else None
            cache = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
            for name, inputs in shapes.items():
                refittable = [e["onnx"] for e in entries] if name == "conditioning.onnx" else []
                engine, cache = build_engine(trt, onnx_dir / name, inputs, precision=precision, refittable=refittable,
                                             timing_cache=cache, workspace_gb=args.workspace_gb)
                (tmp / name.replace(".onnx", ".plan")).write_bytes(engine)
                errors[name] = _parity(trt, engine, onnx_dir / name, inputs, TOLERANCE[precision["tolerance"]], device)
                print(f"built {name.replace('.onnx', '.plan')} (max error {errors[name]:.2e})", file=sys.stderr)
            if cache_path:
                cache_path.write_bytes(cache)
        sidecar = {**record, "onnx_dir": str(onnx_dir.resolve()), "engine_precision": precision["computes"],
                   "builder": {k: precision[k] for k in ("strongly_typed", "fp16_flag", "tf32")},
                   "refit_dtype": sorted({e["dtype"] for e in entries}),
                   "profiles": shapes, "refit_map": REFIT_MAP, "built": trt is not None,
                   "tensorrt": getattr(trt, "__version__", None), "max_abs_error_vs_onnxruntime": errors}
        (tmp / ENGINES).write_text(json.dumps(sidecar, indent=1) + "\n")
    return out


def _parity(trt, engine: bytes, onnx_path: Path, shapes: dict[str, list[list[int]]], tolerance: float,
            device: torch.device) -> float:
    """Max |TensorRT - ONNX Runtime| on random inputs of the profile's opt shapes; no NaN."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    types = {i.name: np.float16 if "float16" in i.type else np.float32 for i in session.get_inputs()}
    feeds = {name: rng.standard_normal(opt).astype(types[name]) for name, (_, opt, _) in shapes.items()}
    want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    got = {k: v.cpu().numpy() for k, v in execute(trt, runtime.deserialize_cuda_engine(engine),
                                                   {k: torch.from_numpy(v) for k, v in feeds.items()}, device).items()}
    worst = 0.0
    for name, value in got.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise OpadError(f"the {onnx_path.stem} engine gives NaN or inf in {name}")
        if value.dtype != np.uint8:
            worst = max(worst, float(np.abs(value.astype(np.float64) - want[name]).max()))
    if worst > tolerance:
        raise OpadError(f"the {onnx_path.stem} engine differs from ONNX Runtime by {worst:.2e} (> {tolerance:.0e})")
    return worst
