"""Inference per stage and end to end, for every runner backend available here, at batch 1, 4, 8.

Stages: ``conditioning`` (token embeddings -> every cross-attention K/V; once per (concept,
prompt) when serving, so not in end_to_end), ``unet`` (the student's step(s) with the K/V given),
``vae_decode``, ``postprocess`` (to uint8 NHWC) -- eager only; ONNX Runtime runs the last three as
one graph, ``denoise_decode``. ``end_to_end`` is ``Runner.generate`` with the K/V cached (noise,
denoise, decode, uint8), with images/s. Rows go to benchmarks/results/results.csv.

    python benchmarks/bench_inference.py [--student DIR] [--steps 1] [--batches 1,4,8] [--device auto]

Defaults: the tiny preset; onnxruntime needs the export extra (its graphs are exported to a
temporary folder with a 1..max(batches) batch range).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile

import numpy as np
import torch
from common import measure, write_rows
from opad.export import export_onnx
from opad.export.exporter.graphs import DenoiseDecodeGraph
from opad.export.runtime import Runner, seeded_noise

from opad.devices import pick_device

PROMPT = "a photo of a dog"


def eager_rows(runner: Runner, steps: int, batches: list[int], device: torch.device, repeats: int) -> list[dict]:
    impl = runner._impl
    b = impl.bundle
    graph = DenoiseDecodeGraph(b, steps).eval()
    rows = []
    with torch.no_grad():
        kv = impl.conditioning(None, PROMPT)
        rows.append(_row("inference/conditioning", "eager", f"b1,{steps}step", measure(
            lambda: impl.conditioning(None, PROMPT), device, repeats=repeats)))
        for n in batches:
            shape = f"b{n},{b.default_resolution}px,{steps}step"
            noise = seeded_noise(impl.latent_shape, list(range(n)), b.dtype).to(b.device)
            kv_n = [t.expand(n, *t.shape[1:]) for t in kv]
            t = torch.full((n,), graph.timesteps[0], dtype=torch.long, device=b.device)
            placeholder = noise.new_zeros(n, 1, graph.context_dim)

            def unet():
                with graph.kv.given(list(zip(kv_n[0::2], kv_n[1::2]))):
                    for _ in range(steps):
                        b.student_unet(noise.to(b.dtype), t, encoder_hidden_states=placeholder)

            z = noise.float()
            image = b.vae.decode(z.to(b.vae.dtype)).sample
            rows.append(_row("inference/unet", "eager", shape, measure(unet, device, repeats=repeats)))
            rows.append(_row("inference/vae_decode", "eager", shape, measure(
                lambda: b.vae.decode(z.to(b.vae.dtype)).sample, device, repeats=repeats)))
            rows.append(_row("inference/postprocess", "eager", shape, measure(
                lambda: ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
                .cpu(), device, repeats=repeats)))
            rows.append(_row("inference/end_to_end", "eager", shape, measure(
                lambda: runner.generate(PROMPT, None, seed=0, steps=steps, batch=n), device, repeats=repeats), n))
    return rows


def onnxruntime_rows(runner: Runner, steps: int, batches: list[int], repeats: int, resolution: int) -> list[dict]:
    impl = runner._impl
    cpu = torch.device("cpu")
    rows = [_row("inference/conditioning", "onnxruntime", f"b1,{steps}step", measure(
        lambda: impl.conditioning(None, PROMPT), cpu, repeats=repeats))]
    kv = impl.conditioning(None, PROMPT)
    for n in batches:
        shape = f"b{n},{resolution}px,{steps}step"
        kv_n = [np.repeat(t, n, axis=0) for t in kv]  # one K/V row per image
        rows.append(_row("inference/denoise_decode", "onnxruntime", shape, measure(
            lambda: impl.denoise_decode(kv_n, list(range(n)), steps), cpu, repeats=repeats)))
        rows.append(_row("inference/end_to_end", "onnxruntime", shape, measure(
            lambda: runner.generate(PROMPT, None, seed=0, steps=steps, batch=n), cpu, repeats=repeats), n))
    return rows


def _row(name: str, provider: str, shape: str, timing: dict, images: int | None = None) -> dict:
    row = {"name": name, "provider": provider, "shape": shape, **timing}
    if images:
        row["images_per_s"] = images / (timing["median_ms"] / 1000)
    extra = f"  {row['images_per_s']:8.1f} img/s" if images else ""
    print(f"{name:26s} {provider:12s} {shape:22s} p50 {timing['median_ms']:9.2f} ms  p95 {timing['p95_ms']:9.2f} ms"
          f"{extra}", file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default=None)
    p.add_argument("--steps", type=int, default=1, choices=(1, 2, 4))
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    eager = Runner("eager", student=args.student, device=str(device))
    rows = eager_rows(eager, args.steps, batches, device, args.repeats)
    resolution = eager._impl.bundle.default_resolution
    if importlib.util.find_spec("onnxruntime") is None:
        print("onnxruntime is not installed: its rows are skipped", file=sys.stderr)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            argv = ["--out", f"{tmp}/onnx", "--steps", str(args.steps), "--no-single", "--exporter", "torchscript",
                    "--batch-range", f"1:{max(batches)}"] + (["--student", args.student] if args.student else [])
            if export_onnx.main(argv) != 0:
                return 1
            runner = Runner("onnxruntime", onnx={None: f"{tmp}/onnx"})
            rows += onnxruntime_rows(runner, args.steps, batches, args.repeats, resolution)
    ratios = {r["shape"]: r["median_ms"] for r in rows if r["name"] == "inference/end_to_end"
              and r["provider"] == "eager"}
    for r in rows:
        if r["name"] == "inference/end_to_end" and r["provider"] == "onnxruntime":
            print(f"onnxruntime / eager end to end at {r['shape']}: {r['median_ms'] / ratios[r['shape']]:.2f}",
                  file=sys.stderr)
    print(write_rows(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
