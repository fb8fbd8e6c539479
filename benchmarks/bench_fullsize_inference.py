"""One-step text-to-image on the full-size student (SD-Turbo's architecture, opad.fullsize), per provider.

Measures the wall time of one call that makes --batch images at --resolution (default 512x512) in one step:

- ``diffusers``: a plain ``StableDiffusionPipeline`` call (1 step, guidance 0, numpy output): the text
  encoder, the UNet step, the VAE decode and the conversion, every call;
- ``eager``: opad's ``Runner("eager")``: the K/V of the prompt cached after the first call (as served),
  then noise, the UNet step, the decode and the uint8 conversion;
- ``compiled``: ``Runner("compiled")``: eager with the denoise+decode graph through torch.compile
  (inductor; mode default on the CPU, the runner's max-autotune with CUDA graphs on a GPU); the compile
  happens in the warm-up calls and is reported apart;
- ``onnxruntime``: export/export_onnx.py of the student (weights past 2 GB go to external data; the
  export checks ONNX Runtime against PyTorch and refuses a larger error), then ``Runner("onnxruntime")``.
  The runtime runs ONNX Runtime's CPU provider, so on a GPU machine these rows are a CPU figure: it is
  left out of the default providers there;
- ``tensorrt``: export, ``export/build_trt.py``, ``Runner("tensorrt")``: only where TensorRT is installed.

Each provider runs in its own process (its peak memory is its own: RSS on the CPU, CUDA's max allocated
on a GPU); one table compares them, each row with its ratio to diffusers. Rows (name fullsize/infer_1step,
shape bNxRES) go to benchmarks/results/results.csv.

    python benchmarks/bench_fullsize_inference.py --models DIR [--batch 8] [--providers eager,onnxruntime]
    python benchmarks/bench_fullsize_inference.py --write-models    # writes opad.fullsize to a temp dir first
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import measure, write_rows

PROVIDERS = ("diffusers", "eager", "compiled", "onnxruntime", "tensorrt")
PROMPT = "a photo of a dog on the beach"
NAME = "fullsize/infer_1step"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="a folder of python -m opad.fullsize (its student/ is used)")
    p.add_argument("--write-models", action="store_true", help="without --models: write the full-size student "
                   "to a temporary folder first (about 2.5 GiB, a minute)")
    p.add_argument("--resolution", type=int, default=512, help="image size (the runners need the student's "
                   "native size, 512)")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--providers", default=None, help=f"comma list of {', '.join(PROVIDERS)} (default: all but "
                   "tensorrt where it is not installed, and but onnxruntime on a GPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per provider")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (the compiled provider compiles here)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="auto: fp16 on a GPU, fp32 on the CPU")
    p.add_argument("--onnx-dir", default=None, help="reuse this export_onnx.py folder (of --batch, at the student's "
                   "size) instead of exporting")
    p.add_argument("--compile-mode", default=None, help="inductor's mode for the compiled provider (default: the "
                   "runner's: max-autotune on a GPU, default on the CPU; reduce-overhead compiles much faster)")
    p.add_argument("--no-write", action="store_true", help="print the table only (no results.csv rows)")
    p.add_argument("--child-json", default=None, help=argparse.SUPPRESS)  # one provider, its row to this file
    return p


def _dtype(name: str, device: torch.device) -> str:
    if name == "auto":
        return "float16" if device.type == "cuda" else "float32"
    return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[name]


def _export(args, student: str, device: torch.device, out: str) -> dict:
    """export_onnx.py into ``out`` in its own process (its memory is not the runner's); returns the seconds
    it took and the errors it measured against PyTorch (it refuses an export past its tolerance)."""
    dtype = _dtype(args.dtype, device)
    script = Path(__file__).resolve().parents[1] / "export" / "export_onnx.py"
    cmd = [sys.executable, str(script), "--student", student, "--out", out, "--steps", "1", "--no-single",
           "--batch", str(args.batch), "--device", str(device)] + (["--fp16"] if dtype == "float16" else [])
    start = time.perf_counter()
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError("the ONNX export failed (its error is above)")
    record = json.loads((Path(out) / "export.json").read_text())
    return {"export_s": time.perf_counter() - start,
            "max_abs_error": max(record["max_abs_error"].values())}


def run_provider(args, provider: str, student: str) -> dict:
    """One provider's timing row (in this process)."""
    from opad.devices import pick_device

    device = pick_device(args.device)
    dtype = _dtype(args.dtype, device)
    n, notes = args.batch, {}
    if provider == "diffusers":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(student, torch_dtype=getattr(torch, dtype),
                                                       safety_checker=None, local_files_only=True).to(device)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)

        def call():
            return pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, height=args.resolution,
                        width=args.resolution, num_images_per_prompt=n, generator=generator, output_type="np").images
    else:
        from opad.export.runtime import Runner

        if provider == "onnxruntime":
            runner = Runner("onnxruntime", onnx={None: args.onnx_dir})
        elif provider == "tensorrt":
            from opad.export import build_trt

            engines = tempfile.mkdtemp(prefix="opad-trt-")  # left for the process's end: the runner reads it
            if build_trt.main(["--onnx", args.onnx_dir, "--out", f"{engines}/trt", "--batch-range", f"{n}:{n}"]):
                raise SystemExit("the TensorRT build failed (see above)")
            runner = Runner("tensorrt", engines=f"{engines}/trt")
        else:
            runner = Runner(provider, student=student, device=str(device), dtype=dtype, compile_mode=args.compile_mode)
        if runner.resolution != args.resolution:
            raise SystemExit(f"the {provider} runner makes {runner.resolution}-px images (the student's native "
                             f"size), not {args.resolution}")

        def call():
            return runner.generate(PROMPT, seed=0, steps=1, batch=n)
    if provider == "compiled":  # the compile: the first call, timed on its own
        start = time.perf_counter()
        call()
        notes["compile_s"] = time.perf_counter() - start
    images = call()
    if images.shape[0] != n:
        raise SystemExit(f"{provider} made {images.shape[0]} images, not {n}")
    timing = measure(call, device, warmup=max(args.warmup - 1, 0), repeats=args.repeats)
    mode = f",{args.compile_mode}" if provider == "compiled" and args.compile_mode else ""
    return {"name": NAME, "provider": provider, "shape": f"b{n}x{args.resolution}{mode}", **timing,
            "images_per_s": n / (timing["median_ms"] / 1000), "notes": notes}


def _default_providers(device: torch.device) -> list[str]:
    chosen = ["diffusers", "eager", "compiled"]
    if device.type != "cuda":
        chosen.append("onnxruntime")
    if importlib.util.find_spec("tensorrt") is not None and device.type == "cuda":
        chosen.append("tensorrt")
    return chosen


def _students(args) -> tuple[str, tempfile.TemporaryDirectory | None]:
    if args.models:
        student = Path(args.models) / "student"
        if not (student / "model_index.json").is_file():
            raise SystemExit(f"{args.models} holds no student/ pipeline: write it with python -m opad.fullsize DIR")
        return str(student), None
    if not args.write_models:
        raise SystemExit("pass --models DIR (python -m opad.fullsize DIR writes it) or --write-models")
    from opad.fullsize.writer import write_fullsize

    tmp = tempfile.TemporaryDirectory()
    print(f"writing the full-size student to {tmp.name}", file=sys.stderr)
    write_fullsize(Path(tmp.name) / "fs", only=("student",))
    return str(Path(tmp.name) / "fs" / "student"), tmp


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from opad.devices import pick_device

    device = pick_device(args.device)
    student, tmp = _students(args)
    try:
        if args.child_json:  # one provider in this process
            (provider,) = args.providers.split(",")
            Path(args.child_json).write_text(json.dumps(run_provider(args, provider, student)))
            return 0
        providers = args.providers.split(",") if args.providers else _default_providers(device)
        bad = [p for p in providers if p not in PROVIDERS]
        if bad:
            raise SystemExit(f"unknown provider {bad[0]!r}; choose from {', '.join(PROVIDERS)}")
        rows, skipped = [], {}
        export_dir, export_notes = None, {}
        for provider in providers:
            if provider == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
                skipped[provider] = "TensorRT is not installed"
                continue
            notes = {}
            if provider in ("onnxruntime", "tensorrt") and not args.onnx_dir:
                if export_dir is None:
                    export_dir = tempfile.TemporaryDirectory(prefix="opad-onnx-")
                    print(f"[{provider}] exporting the student with export_onnx.py", file=sys.stderr, flush=True)
                    try:
                        export_notes = _export(args, student, device, f"{export_dir.name}/onnx")
                    except RuntimeError as e:
                        skipped[provider] = str(e)
                        continue
                notes = export_notes
            onnx = args.onnx_dir or (f"{export_dir.name}/onnx" if export_dir else None)
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                         "--providers", provider, "--child-json", out.name, "--models", str(Path(student).parent)]
                child += ["--onnx-dir", onnx] if onnx else []
                print(f"[{provider}] running", file=sys.stderr, flush=True)
                done = subprocess.run(child, env=os.environ.copy())
                if done.returncode != 0 or not Path(out.name).stat().st_size:
                    skipped[provider] = f"failed (exit {done.returncode}; its output is above)"
                    continue
                rows.append(json.loads(Path(out.name).read_text()))
                rows[-1]["notes"].update(notes)
                print(f"[{provider}] {rows[-1]['median_ms']:.0f} ms {rows[-1]['notes']}", file=sys.stderr, flush=True)
    finally:
        for folder in (tmp, locals().get("export_dir")):
            if folder is not None:
                folder.cleanup()
    base = next((r["median_ms"] for r in rows if r["provider"] == "diffusers"), None)
    mem = "CUDA max allocated" if device.type == "cuda" else "peak RSS"
    print(f"\n1-step text-to-image, full-size student, {rows[0]['shape'] if rows else ''} ({device})")
    print(f"| provider | median ms | p20-p80 ms | images/s | ratio to diffusers | {mem} GiB | notes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['median_ms'] / base:.2f}" if base else "-"
        notes = ", ".join(f"{k} {v:.2g}" if k == "max_abs_error" else f"{k} {v:.0f}" for k, v in r["notes"].items())
        print(f"| {r['provider']} | {r['median_ms']:.0f} | {r['p20_ms']:.0f}-{r['p80_ms']:.0f} | "
              f"{r['images_per_s']:.3f} | {ratio} | {r['peak_mem_mb'] / 1024:.2f} | {notes} |")
    for provider, why in skipped.items():
        print(f"| {provider} | - | - | - | - | - | skipped: {why} |")
    if rows and not args.no_write:
        print(write_rows([{k: v for k, v in r.items() if k != "notes"} for r in rows], device))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
