"""The ONNX export behind ``python export/export_onnx.py`` (its docstring lists what it writes):
the split graphs of :mod:`opad.export.exporter.graphs` traced with ``torch.onnx.export``, each run
on ONNX Runtime against PyTorch on the same inputs, and the sidecar of :mod:`.sidecar`; written all
or nothing."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from opad.export.exporter.graphs import ConditioningGraph, DenoiseDecodeGraph, SingleGraph, token_embedding_table
from opad.export.exporter.options import check_args, parse_batch, parse_steps
from opad.export.exporter.precision import exact_fp32
from opad.export.exporter.sidecar import concept_id, folder_hashes, library_versions, write_sidecar

from opad.concept.folder import KV_FORMATS, concept_format, load_concept
from opad.devices import pick_device
from opad.diffusion.sampling import initial_noise
from opad.errors import OpadError, first_line
from opad.fsutil import staged_dir
from opad.models.attention import cross_attention_layers
from opad.models.loading import ModelBundle, load_models

LARGE = int(1.8 * 2**30)  # weights past this go to external data (protobuf's limit is 2 GB)
# max |ONNX Runtime - PyTorch| allowed on the float image in [0, 1] (before quantization)
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}


def kv_names(layers: int) -> list[str]:
    return [f"{kind}{i}" for i in range(layers) for kind in ("k", "v")]


def denoise_file(steps: int) -> str:
    return f"denoise_decode_{steps}step.onnx"


def single_file(steps: int) -> str:
    return f"single_{steps}step.onnx"


@contextlib.contextmanager
def _reference_kernels() -> Iterator[None]:
    """Trace the pure-torch references: a Triton kernel is no ONNX op."""
    old = os.environ.get("OPAD_KERNELS")
    os.environ["OPAD_KERNELS"] = "reference"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OPAD_KERNELS", None)
        else:
            os.environ["OPAD_KERNELS"] = old


def _export(module: torch.nn.Module, inputs: tuple, path: Path, input_names: list[str], output_names: list[str],
            batch: tuple[int, int], opset: int, exporter: str) -> None:
    """torch.onnx.export with the batch dimension of every input and output dynamic when asked."""
    dynamic = batch[0] != batch[1]
    kwargs: dict = {}
    if dynamic and exporter == "dynamo":
        kwargs["dynamic_shapes"] = _batch_dynamic_shapes(module, len(inputs), torch.export.Dim("batch", min=batch[0],
                                                                                               max=batch[1]))
    elif dynamic:
        kwargs["dynamic_axes"] = {name: {0: "batch"} for name in [*input_names, *output_names]}
    # one self-contained file below protobuf's 2 GB limit; beyond it the weights go beside it
    weights = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    try:
        torch.onnx.export(module, inputs, str(path), input_names=input_names, output_names=output_names,
                          opset_version=opset, dynamo=exporter == "dynamo", external_data=weights >= LARGE, **kwargs)
    except Exception as e:  # noqa: BLE001 - the exporters raise many types; say which graph and why
        raise OpadError(f"the {exporter} exporter could not export {path.name}: {first_line(e, 300)}") from e
    import onnx

    onnx.checker.check_model(str(path))  # by path: works with external data too


def _batch_dynamic_shapes(module: torch.nn.Module, count: int, dim) -> tuple:
    """torch.export's dynamic_shapes for ``forward``'s positional parameters, varargs as one tuple."""
    shapes: list = []
    for param in inspect.signature(module.forward).parameters.values():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            shapes.append(tuple({0: dim} for _ in range(count - len(shapes))))
            break
        shapes.append({0: dim})
    return tuple(shapes)


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _max_error(onnx_out: list[np.ndarray], torch_out: tuple[torch.Tensor, ...], what: str) -> float:
    worst = 0.0
    for got, want in zip(onnx_out, torch_out):
        if np.issubdtype(got.dtype, np.floating) and not np.isfinite(got).all():
            raise OpadError(f"ONNX Runtime gives NaN or inf in {what}")
        if want.dtype == torch.uint8:
            continue  # the quantized image: the float image before it is what is compared
        worst = max(worst, float(np.abs(got.astype(np.float64) - want.double().cpu().numpy()).max()))
    return worst


def _prompt_embeddings(bundle: ModelBundle, tokens: list[str], batch: int) -> torch.Tensor:
    prompt = f"a photo of {' '.join(tokens)} dog" if tokens else "a photo of a dog"
    ids = bundle.tokenizer([prompt] * batch, padding="max_length", max_length=bundle.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
    return token_embedding_table(bundle.text_encoder).detach()[ids.to(bundle.device)]


def export_onnx(args: argparse.Namespace) -> Path:
    check_args(args)
    steps_list, batch = parse_steps(args.steps), parse_batch(args)
    device = pick_device(args.device)
    dtype = torch.float16 if args.fp16 else torch.float32
    precision = "fp16" if args.fp16 else "fp32"
    bundle = load_models(student=args.student, device=device, dtype=dtype, load_teacher=False)
    tokens = load_concept(args.concept, bundle.student_unet, bundle.tokenizer, bundle.text_encoder) \
        if args.concept else []
    fmt = concept_format(args.concept) if args.concept else None
    resolution = args.resolution or bundle.default_resolution
    layers = len(cross_attention_layers(bundle.student_unet))
    names = kv_names(layers)
    out = Path(args.out)
    errors: dict[str, float] = {}
    # exact fp32 (no TF32 on a GPU) for the PyTorch side of the parity check: ONNX Runtime's is exact
    with _reference_kernels(), exact_fp32(), torch.no_grad(), staged_dir(out, replace=True) as tmp:
        embeds = _prompt_embeddings(bundle, tokens, batch[1])
        noise = torch.cat([initial_noise(bundle, 1, resolution, torch.Generator().manual_seed(i))
                           for i in range(batch[1])])
        conditioning = ConditioningGraph(bundle).eval()
        kv = conditioning(embeds)
        _export(conditioning, (embeds,), tmp / "conditioning.onnx", ["token_embeds"], names, batch, args.opset,
                args.exporter)
        onnx_kv = _session(tmp / "conditioning.onnx").run(None, {"token_embeds": embeds.cpu().numpy()})
        errors["conditioning"] = _max_error(onnx_kv, kv, "the conditioning graph")
        files = {"conditioning": "conditioning.onnx"}
        for steps in steps_list:
            graphs = [("denoise_decode", DenoiseDecodeGraph(bundle, steps), (noise, *kv), ["noise", *names],
                       denoise_file(steps))]
            if not args.no_single:
                graphs.append(("single", SingleGraph(bundle, steps), (embeds, noise), ["token_embeds", "noise"],
                               single_file(steps)))
            for kind, graph, inputs, input_names, name in graphs:
                start = time.perf_counter()
                want = graph.eval()(*inputs)
                _export(graph, inputs, tmp / name, input_names, ["image", "image_float"], batch, args.opset,
                        args.exporter)
                feeds = dict(zip(input_names, (t.cpu().numpy() for t in inputs)))
                if kind == "denoise_decode":  # fed the ONNX conditioning's K/V, as it is served
                    feeds.update(zip(names, onnx_kv))
                errors[name.removesuffix(".onnx")] = _max_error(_session(tmp / name).run(None, feeds), want, name)
                files[name.removesuffix(".onnx")] = name
                print(f"exported {name} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
        worst = max(errors.values())
        if worst > TOLERANCE[precision]:
            raise OpadError(f"ONNX Runtime differs from PyTorch by {worst:.2e} (> {TOLERANCE[precision]:.0e}) in "
                            f"{max(errors, key=errors.get)}; nothing written")
        np.save(tmp / "token_embeddings.npy", token_embedding_table(bundle.text_encoder).detach().float().cpu().numpy())
        bundle.tokenizer.save_pretrained(tmp / "tokenizer")
        latent = noise.shape[1:]
        write_sidecar(tmp, {
            "student": bundle.student_source,
            "student_hashes": folder_hashes(bundle.student_source) if Path(bundle.student_source).is_dir() else {},
            "concept_id": concept_id(args.concept),
            "concept": str(Path(args.concept).resolve()) if args.concept else None,
            "concept_tokens": tokens,
            "concept_format": fmt,
            # what graph (b) holds beyond the base student: a lora/unet concept is merged into it
            "denoiser_concept": "base" if fmt in (None, *KV_FORMATS) else concept_id(args.concept),
            "precision": precision,
            "steps": steps_list,
            "batch": list(batch),
            "resolution": resolution,
            "shapes": {"token_embeds": list(embeds.shape[1:]), "noise": list(latent),
                       "kv": {n: list(t.shape[1:]) for n, t in zip(names, kv)}, "image": [resolution, resolution, 3]},
            "kv_names": names,
            "files": files,
            "opset": args.opset,
            "exporter": args.exporter,
            "max_abs_error": errors,
            "tolerance": TOLERANCE[precision],
            "libraries": library_versions(),
        })
    return out
