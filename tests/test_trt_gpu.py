"""TensorRT for real, on a GPU: what tests/test_trt.py checks against a fake of TensorRT (skipped
without a CUDA GPU and the tensorrt package). On the last GPU (cuda:N), so that nothing may assume
the default device."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from exportutil import PROMPT, export, generate, make_concept
from opad.export import build_trt
from opad.export.runtime import Runner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def world(tiny_dir, tmp_path_factory):
    """Concepts a and b; exports of a made on the GPU (fp32: its parity check runs with TF32 off;
    fp16), each with a batch range 1:3."""
    pytest.importorskip("tensorrt")
    root = tmp_path_factory.mktemp("trt_gpu")
    device = f"cuda:{torch.cuda.device_count() - 1}"
    student = tiny_dir / "student"
    a, b = make_concept(tiny_dir, root / "a", seed=3), make_concept(tiny_dir, root / "b", seed=4)
    exports = {precision: export(root / f"onnx_{precision}", student, a, steps=1, no_single=True, batch_range="1:3",
                                 device=device, **({"fp16": True} if precision == "fp16" else {}))
               for precision in ("fp32", "fp16")}
    return {"root": root, "device": device, "student": student, "a": a, "b": b, **exports}


@pytest.mark.parametrize("precision, flags, worst", [("fp32", [], 1), ("fp32", ["--fp16"], 3), ("fp16", [], 3)])
def test_engines_build_refit_and_run_any_batch(world, tmp_path, precision, flags, worst):
    """Built (parity against ONNX Runtime inside the build), refitted A -> B -> A in the initializers'
    dtype, any batch cut to the 1..3 profile and replayed as CUDA graphs: opad.generate's images."""
    engines = tmp_path / "engines"
    assert build_trt.main(["--onnx", str(world[precision]), "--out", str(engines), "--device", world["device"],
                           *flags]) == 0
    record = json.loads((engines / "engines.json").read_text())
    assert record["builder"]["strongly_typed"] == (precision == "fp16")
    runner = Runner("tensorrt", engines=str(engines), concepts={"a": str(world["a"]), "b": str(world["b"])},
                    device=world["device"])
    for concept, prompt in (("a", PROMPT), ("b", PROMPT), ("a", PROMPT + " on a beach")):
        _, want = generate(world["student"], world[concept], seed=5, steps=1, prompt=prompt)
        got = runner.generate(prompt, concept, seed=5)[0]
        assert np.abs(got.astype(int) - want).max() <= worst, (concept, prompt)
    batch = runner.generate("a photo of a dog", None, seed=30, batch=5)  # calls of 3 and 2
    want = Runner("eager", student=str(world["student"]), device="cpu").generate("a photo of a dog", None, seed=30,
                                                                                 batch=5)
    assert np.abs(batch.astype(int) - want).max() <= worst
    assert np.array_equal(runner.generate("a photo of a dog", None, seed=30, batch=5), batch)  # the graphs replayed
