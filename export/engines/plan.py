"""Everything the TensorRT build decides before it touches the TensorRT API, testable without it:
which graphs, their optimization profiles, and the refit map of the conditioning engine.

The refit map names, for every cross-attention K/V parameter of the PyTorch student, the ONNX
initializer that holds it and how (as is, or transposed: the exporters fold ``F.linear``'s weight
into a transposed MatMul constant with a generated name). TensorRT's ONNX parser names an engine's
weights after the ONNX initializers, so switching concept is ``set_named_weights(onnx_name,
weight)`` for every entry -- every concept-owned weight, not only the changed ones, so A -> B -> A
gives A exactly. :func:`refit_onnx` applies the same map to the ONNX model itself, which is how
the tests check it without TensorRT.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from opad.errors import OpadError

REFIT_MAP = "refit_map.json"
ENGINES = "engines.json"  # the engines folder's sidecar


def parse_range(text: str) -> tuple[int, int]:
    """``--batch-range A:B`` as (A, B), 1 <= A <= B."""
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise OpadError(f"--batch-range must be A:B with 1 <= A <= B, got {text!r}") from None
    if not 1 <= a <= b:
        raise OpadError(f"--batch-range must be A:B with 1 <= A <= B, got {text!r}")
    return a, b


def parse_batch_range(text: str | None, exported: Sequence[int]) -> tuple[int, int, int]:
    """(min, opt, max) batch of the engines' profile: the ONNX export's own range by default; a
    narrower ``A:B`` (opt B, the serving batch) when asked. Static exports allow only their batch."""
    lo, hi = int(exported[0]), int(exported[1])
    if text is None:
        return lo, hi, hi
    a, b = parse_range(text)
    if a < lo or b > hi:
        raise OpadError(f"--batch-range {a}:{b} is outside the ONNX export's batch range {lo}:{hi}; "
                        f"re-export with --batch-range {a}:{b}")
    return a, b, b


def profile_shapes(record: dict, batch: tuple[int, int, int]) -> dict[str, dict[str, list[list[int]]]]:
    """Per graph file, per input: its [min, opt, max] shapes (batch first, the rest as exported)."""
    shapes = record["shapes"]
    inputs_a = {"token_embeds": shapes["token_embeds"]}
    inputs_b = {"noise": shapes["noise"], **shapes["kv"]}
    graphs = {"conditioning.onnx": inputs_a}
    for steps in record["steps"]:
        graphs[record["files"][f"denoise_decode_{steps}step"]] = inputs_b
    return {name: {i: [[n, *rest] for n in batch] for i, rest in inputs.items()} for name, inputs in graphs.items()}


def kv_parameter_names(unet) -> list[str]:
    """The PyTorch names of every cross-attention K/V weight, in model order (k_0, v_0, k_1, ...)."""
    from opad.models.attention import cross_attention_layers

    return [f"{layer}.{proj}.weight" for layer in cross_attention_layers(unet) for proj in ("to_k", "to_v")]


def refit_map(onnx_path: str | Path, parameters: dict[str, np.ndarray]) -> list[dict]:
    """For each named parameter: the one ONNX initializer equal to it, or to its transpose, compared in
    the initializer's dtype (an fp16 export holds the float32 parameters rounded to float16). Each
    entry records that dtype: TensorRT refits a weight only with one of its original type."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    by_shape: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for t in model.graph.initializer:
        array = numpy_helper.to_array(t)
        by_shape.setdefault(array.shape, []).append((t.name, array))
    entries = []
    for name, weight in parameters.items():
        found = [(n, "none", a.dtype) for n, a in by_shape.get(weight.shape, [])
                 if np.array_equal(a, weight.astype(a.dtype))]
        found += [(n, "transpose", a.dtype) for n, a in by_shape.get(weight.T.shape, [])
                  if np.array_equal(a, weight.T.astype(a.dtype))]
        if len(found) != 1:
            raise OpadError(f"{onnx_path}: parameter {name} matches {len(found)} initializers (need exactly one); "
                            "the graph was not exported from these weights")
        onnx_name, transform, dtype = found[0]
        entries.append({"parameter": name, "onnx": onnx_name, "transform": transform, "shape": list(weight.shape),
                        "dtype": np.dtype(dtype).name})
    return entries


def refit_weights(entries: list[dict], parameters: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The engine weights of one concept: every mapped parameter, in the engine's layout and in its
    original weight's dtype (the ONNX initializer's, whatever precision the engine computes in)."""
    missing = [e["parameter"] for e in entries if e["parameter"] not in parameters]
    if missing:
        raise OpadError(f"the concept lacks {len(missing)} refittable weight(s), e.g. {missing[0]}")
    if any("dtype" not in e for e in entries):
        raise OpadError(f"this {REFIT_MAP} records no weight dtypes (an older build); rebuild the engines with "
                        "export/build_trt.py")
    out = {}
    for e in entries:
        w = parameters[e["parameter"]]
        if list(w.shape) != e["shape"]:
            raise OpadError(f"{e['parameter']} has shape {tuple(w.shape)} but the engine's is {tuple(e['shape'])}")
        out[e["onnx"]] = np.ascontiguousarray((w.T if e["transform"] == "transpose" else w).astype(e["dtype"]))
    return out


def refit_onnx(model, weights: dict[str, np.ndarray]):
    """An ONNX model with the named initializers replaced (the refit, done on the ONNX graph)."""
    from onnx import numpy_helper

    names = set(weights)
    for t in model.graph.initializer:
        if t.name in names:
            t.CopyFrom(numpy_helper.from_array(weights[t.name], t.name))
            names.discard(t.name)
    if names:
        raise OpadError(f"the model has no initializer(s) {sorted(names)[:3]}")
    return model


def engine_precision(export_precision: str, fp16_flag: bool) -> dict:
    """How the engines of an ``export_precision`` export are built, and what they compute in.

    - fp16 export: a strongly typed network. TensorRT then computes every tensor in the type the ONNX
      graph gives it -- fp16, and the few fp32 ops the export keeps (the image's float conversion) --
      exactly what ONNX Runtime checked against PyTorch. Weakly typed, TensorRT would treat the
      graph's fp16 as a hint and may run layers in fp32 (slower); with the FP16 flag it could also
      move the fp32 ops to fp16. (The FP16 flag is not allowed on a strongly typed network.)
    - fp32 export: weakly typed, TF32 cleared: exact fp32, as the 1e-3 parity check against ONNX
      Runtime's exact fp32 needs. With ``--fp16``: the FP16 flag, TensorRT choosing fp16 or fp32
      (TF32 allowed) per layer, checked at the fp16 tolerance.
    """
    if export_precision == "fp16":
        if fp16_flag:
            raise OpadError("--fp16 builds from an fp32 export; an fp16 export is built as fp16 without it")
        return {"computes": "fp16", "strongly_typed": True, "fp16_flag": False, "tf32": False, "tolerance": "fp16"}
    if fp16_flag:
        return {"computes": "fp16 and fp32 (TensorRT's choice per layer)", "strongly_typed": False, "fp16_flag": True,
                "tf32": True, "tolerance": "fp16"}
    return {"computes": "fp32", "strongly_typed": False, "fp16_flag": False, "tf32": False, "tolerance": "fp32"}
