"""ONNX export of the split graphs and the inference runner, against ``opad.generate`` (tiny preset, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from exportutil import PROMPT, export, generate, make_concept, micro_student
from opad.export import export_onnx
from opad.export.runtime import Runner

from opad.errors import OpadError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tiny_dir, tmp_path_factory):
    """Two concepts and their exports: A with every graph at 1/2/4 steps, B with (a)+(b) at 1 step."""
    root = tmp_path_factory.mktemp("export")
    a = make_concept(tiny_dir, root / "concept_a", seed=3)
    b = make_concept(tiny_dir, root / "concept_b", seed=4)
    student = tiny_dir / "student"
    return {"student": student, "a": a, "b": b,
            "onnx_a": export(root / "onnx_a", student, a, steps="1,2,4"),
            "onnx_b": export(root / "onnx_b", student, b, steps=1, no_single=True)}


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _embeds(folder):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(Path(folder) / "tokenizer")
    ids = tok([PROMPT], padding="max_length", max_length=77, return_tensors="np").input_ids
    return np.load(Path(folder) / "token_embeddings.npy")[ids]


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_split_and_single_graphs_equal_generate(world, steps):
    sidecar = json.loads((world["onnx_a"] / "export.json").read_text())
    names = sidecar["kv_names"]
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7)).numpy()
    want, _ = generate(world["student"], world["a"], seed=7, steps=steps)
    kv = _session(world["onnx_a"] / "conditioning.onnx").run(None, {"token_embeds": _embeds(world["onnx_a"])})
    split = _session(world["onnx_a"] / f"denoise_decode_{steps}step.onnx").run(
        None, {"noise": noise, **dict(zip(names, kv))})
    single = _session(world["onnx_a"] / f"single_{steps}step.onnx").run(
        None, {"token_embeds": _embeds(world["onnx_a"]), "noise": noise})
    for image_u8, image in (split, single):
        assert np.isfinite(image).all()
        assert np.abs(image - want.numpy()).max() <= 1e-3
        assert image_u8.dtype == np.uint8 and image_u8.shape == (1, 64, 64, 3)
    assert len(names) == 32 and sidecar["max_abs_error"][f"denoise_decode_{steps}step"] <= 1e-3


def test_one_denoise_graph_serves_two_concepts(world):
    """B's conditioning through A's denoise+decode file gives B's image: (b) holds nothing of a concept."""
    import onnx
    from onnx import numpy_helper

    a, b = (onnx.load(str(world[k] / "denoise_decode_1step.onnx")) for k in ("onnx_a", "onnx_b"))
    weights = [{t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in (a, b)]
    assert weights[0].keys() == weights[1].keys()
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])
    names = json.loads((world["onnx_b"] / "export.json").read_text())["kv_names"]
    kv_b = _session(world["onnx_b"] / "conditioning.onnx").run(None, {"token_embeds": _embeds(world["onnx_b"])})
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(9)).numpy()
    _, image = _session(world["onnx_a"] / "denoise_decode_1step.onnx").run(None, {"noise": noise,
                                                                                   **dict(zip(names, kv_b))})
    want_b, _ = generate(world["student"], world["b"], seed=9, steps=1)
    want_a, _ = generate(world["student"], world["a"], seed=9, steps=1)
    assert np.abs(image - want_b.numpy()).max() <= 1e-3
    assert np.abs(image - want_a.numpy()).max() > 1e-2  # the concepts really differ


def test_eager_runner_is_exactly_generate_and_switching_concepts_is_clean(world):
    runner = Runner("eager", student=str(world["student"]), concepts={"a": str(world["a"]), "b": str(world["b"])})
    for steps in (1, 2, 4):
        for name in ("a", "b"):
            _, pixels = generate(world["student"], world[name], seed=11, steps=steps)
            assert np.array_equal(runner.generate(PROMPT, name, seed=11, steps=steps)[0], pixels)
    first = runner.generate(PROMPT, "a", seed=12)
    runner.generate(PROMPT, "b", seed=12)
    assert np.array_equal(runner.generate(PROMPT, "a", seed=12), first)  # A -> B -> A gives A's image
    base = Runner("eager", student=str(world["student"])).generate("a photo of a dog", None, seed=12)
    assert np.array_equal(runner.generate("a photo of a dog", None, seed=12), base)
    runner_module = sys.modules[Runner.__module__]
    calls = []
    conditioning = runner._impl.conditioning
    runner._impl.conditioning = lambda c, p: calls.append((c, p)) or conditioning(c, p)
    for prompt in ["a", "b", "a"] + [f"p{i}" for i in range(runner_module.KV_CACHE_SIZE)] + ["a"]:
        runner.generate(prompt, None, seed=0)
    assert calls.count((None, "a")) == 2  # cached once, dropped after KV_CACHE_SIZE newer prompts, made again
    batch = runner.generate(PROMPT, "a", seed=11, batch=3)  # image i is seed + i (batched: within rounding)
    _, pixels = generate(world["student"], world["a"], seed=13, steps=1)
    assert batch.shape == (3, 64, 64, 3) and np.abs(batch[2].astype(int) - pixels).max() <= 1


def test_every_backend_implements_the_declared_interface(tiny_dir):
    """Each backend the Runner can pick subclasses runtime.backend.Backend with nothing left abstract,
    and the backends a Runner holds are Backends."""
    import inspect

    from opad.export.runtime import BACKENDS, Backend
    from opad.export.runtime.compiled import CompiledBackend
    from opad.export.runtime.eager import EagerBackend
    from opad.export.runtime.onnxruntime import OnnxRuntimeBackend
    from opad.export.runtime.tensorrt import TensorRTBackend

    classes = {"eager": EagerBackend, "compiled": CompiledBackend, "onnxruntime": OnnxRuntimeBackend,
               "tensorrt": TensorRTBackend}
    assert sorted(classes) == sorted(BACKENDS)
    for name, cls in classes.items():
        assert issubclass(cls, Backend) and not inspect.isabstract(cls), name
    runner = Runner("eager", student=str(tiny_dir / "student"))
    assert isinstance(runner._impl, Backend) and runner.warm_up_batches(8) == [1]


def test_onnxruntime_runner_agrees_with_generate(world):
    runner = Runner("onnxruntime", onnx={"a": str(world["onnx_a"]), "b": str(world["onnx_b"])},
                    concepts={"a": str(world["a"]), "b": str(world["b"])})
    for name, steps in (("a", 1), ("a", 4), ("b", 1)):
        _, pixels = generate(world["student"], world[name], seed=21, steps=steps)
        got = runner.generate(PROMPT, name, seed=21, steps=steps, batch=2)
        _, second = generate(world["student"], world[name], seed=22, steps=steps)
        assert np.abs(got[0].astype(int) - pixels).max() <= 1 and np.abs(got[1].astype(int) - second).max() <= 1
    _, pixels = generate(world["student"], world["b"], seed=21, steps=2)  # A's 2-step graph serves B too
    assert np.abs(runner.generate(PROMPT, "b", seed=21, steps=2)[0].astype(int) - pixels).max() <= 1
    with pytest.raises(OpadError, match="has no 2-step graph"):
        Runner("onnxruntime", onnx={"b": str(world["onnx_b"])}).generate(PROMPT, "b", steps=2)
    with pytest.raises(OpadError, match="unknown concept 'c'"):
        runner.generate(PROMPT, "c")


def test_sidecar_refuses_an_export_of_another_concept_or_precision(world):
    with pytest.raises(OpadError, match="was exported for concept 'concept_a-"):
        Runner("onnxruntime", onnx={"b": str(world["onnx_a"])}, concepts={"b": str(world["b"])})
    with pytest.raises(OpadError, match="is a fp32 export, not fp16"):
        Runner("onnxruntime", onnx={"a": str(world["onnx_a"])}, dtype="float16")
    sidecar = json.loads((world["onnx_a"] / "export.json").read_text())
    assert sidecar["concept_id"].startswith("concept_a-") and sidecar["precision"] == "fp32"
    assert sidecar["opset"] >= 17 and sidecar["exporter"] == "torchscript"
    assert sidecar["libraries"]["onnxruntime"] != "not installed"
    assert "unet/diffusion_pytorch_model.safetensors" in sidecar["student_hashes"]


def test_dynamo_exporter_with_a_batch_range_and_external_data(tiny_dir, tmp_path, monkeypatch):
    from opad.export.exporter import export as onnx_export

    monkeypatch.setattr(onnx_export, "LARGE", 0)  # as if past 2 GB: the weights go to NAME.onnx.data
    student = micro_student(tiny_dir, tmp_path / "student")  # torch.export's cost is per module
    out = export(tmp_path / "dyn", student, exporter="dynamo", steps=1, no_single=True, batch_range="1:3")
    assert (out / "denoise_decode_1step.onnx.data").is_file() and (out / "conditioning.onnx.data").is_file()
    sidecar = json.loads((out / "export.json").read_text())
    assert sidecar["exporter"] == "dynamo" and sidecar["batch"] == [1, 3]
    runner = Runner("onnxruntime", onnx={None: str(out)})
    got = runner.generate("a photo of a dog", None, seed=3, batch=3)  # one call at the batch range's top
    want = Runner("eager", student=str(student)).generate("a photo of a dog", None, seed=3, batch=3)
    assert got.shape == want.shape and got.shape[0] == 3 and np.abs(got.astype(int) - want).max() <= 1
    assert want.std() > 5  # a real image, not a constant


def test_a_concept_for_another_student_is_refused_naming_the_layer(tiny_dir, tmp_path, world, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in world["a"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = safetensors.torch.load_file(bad / "pytorch_custom_diffusion_weights.safetensors")
    key = sorted(k for k in weights if k.endswith("to_k_custom_diffusion.weight"))[0]
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 3)
    safetensors.torch.save_file(weights, bad / "pytorch_custom_diffusion_weights.safetensors")
    assert export_onnx.main(["--student", str(tiny_dir / "student"), "--concept", str(bad), "--out",
                             str(tmp_path / "o"), "--exporter", "torchscript"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and key in errors[0] and "shape" in errors[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, message", [
    (["--steps", "3"], "--steps must be a comma-separated list of (1, 2, 4)"),
    (["--opset", "16"], "--opset must be at least 17"),
    (["--batch-range", "3:1"], "--batch-range must be A:B with 1 <= A <= B"),
    (["--concept", "/nonexistent/concept"], "concept folder not found"),
    (["--fp16"], "--fp16 exports trace and check on a GPU"),
])
def test_bad_export_options_are_one_line(tmp_path, capsys, argv, message):
    assert export_onnx.main(["--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "o").exists()


def test_cli_entry_points(capsys):
    """The scripts themselves once each (a fresh process: their own imports); the other forms in-process."""
    run = subprocess.run([sys.executable, str(REPO / "export" / "export_onnx.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "denoise_decode_{N}step.onnx" in run.stdout, run.stderr
    run = subprocess.run([sys.executable, str(REPO / "export" / "build_trt.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "refit_map.json" in run.stdout and "Unverified" in run.stdout, run.stderr
    from opad.export import build_trt

    from opad import cli

    for main, argv, wanted in ((export_onnx.main, ["--help"], "denoise_decode_{N}step.onnx"),
                               (cli.main, ["export", "onnx", "--help"], "denoise_decode_{N}step.onnx"),
                               (build_trt.main, ["--help"], "refit_map.json"),
                               (cli.main, ["export", "trt", "--help"], "refit_map.json")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0 and wanted in capsys.readouterr().out
    assert cli.main(["export"]) == 2 and "usage: opad export onnx|trt" in capsys.readouterr().err


def test_compiled_runner_agrees_with_eager(tiny_dir, tmp_path):
    """The compiled backend through CPU inductor (C++ codegen), on the micro student (one block each: the
    tiny one's graphs took about 2 min to compile on 2 cores)."""
    student = str(micro_student(tiny_dir, tmp_path / "student"))
    compiled = Runner("compiled", student=student).generate("a photo of a dog", None, seed=4)
    eager = Runner("eager", student=student).generate("a photo of a dog", None, seed=4)
    assert compiled.shape == eager.shape and compiled.shape[-1] == 3 and np.abs(compiled.astype(int) - eager).max() <= 1
    assert eager.std() > 5  # a real image, not a constant


# ------------------------------------------------------------------ TensorRT, up to its API
def test_refit_map_switches_concepts_exactly(world):
    """The refit map, applied to the ONNX conditioning graph as TensorRT's refitter would apply it to
    the engine: A's graph refitted with B's weights gives B's K/V; refitted back, exactly A's."""
    import onnx
    import onnxruntime as ort
    from opad.export.engines.build import kv_parameters_of
    from opad.export.engines.plan import refit_map, refit_onnx, refit_weights

    record = json.loads((world["onnx_a"] / "export.json").read_text())
    params_a = kv_parameters_of(record)
    params_b = kv_parameters_of({**record, "concept": str(world["b"])})
    entries = refit_map(world["onnx_a"] / "conditioning.onnx", params_a)
    assert len(entries) == 32 and len({e["onnx"] for e in entries}) == 32
    assert {e["transform"] for e in entries} <= {"none", "transpose"}
    assert all(e["parameter"].endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for e in entries)

    def run(model, folder):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"token_embeds": _embeds(folder)})

    model = onnx.load(str(world["onnx_a"] / "conditioning.onnx"))
    original_a = run(model, world["onnx_a"])
    as_b = run(refit_onnx(model, refit_weights(entries, params_b)), world["onnx_b"])
    want_b = _session(world["onnx_b"] / "conditioning.onnx").run(None, {"token_embeds": _embeds(world["onnx_b"])})
    assert max(np.abs(x - y).max() for x, y in zip(as_b, want_b)) <= 1e-5
    back = run(refit_onnx(model, refit_weights(entries, params_a)), world["onnx_a"])
    assert all(np.array_equal(x, y) for x, y in zip(back, original_a))


def test_trt_profiles_follow_the_export(world):
    from opad.export.engines.plan import parse_batch_range, profile_shapes

    record = json.loads((world["onnx_a"] / "export.json").read_text())
    assert parse_batch_range(None, record["batch"]) == (1, 1, 1)
    assert parse_batch_range("2:3", [1, 4]) == (2, 3, 3)
    with pytest.raises(OpadError, match="outside the ONNX export's batch range 1:1"):
        parse_batch_range("1:4", record["batch"])
    shapes = profile_shapes(record, (1, 1, 1))
    assert set(shapes) == {"conditioning.onnx", *(f"denoise_decode_{n}step.onnx" for n in (1, 2, 4))}
    assert shapes["conditioning.onnx"] == {"token_embeds": [[1, 77, 16]] * 3}
    assert shapes["denoise_decode_2step.onnx"]["noise"] == [[1, 4, 8, 8]] * 3
    assert shapes["denoise_decode_2step.onnx"]["k0"] == [[1, 2, 77, 8]] * 3 and len(shapes["denoise_decode_1step.onnx"]) == 33


def test_build_trt_without_tensorrt_is_one_sentence(world, tmp_path, capsys):
    from opad.export import build_trt

    assert build_trt.main(["--onnx", str(world["onnx_a"]), "--out", str(tmp_path / "engines")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("TensorRT is not installed" in err or "TensorRT needs a CUDA GPU" in err)
    assert not (tmp_path / "engines").exists()


def test_build_trt_plan_only_writes_the_refit_map_and_sidecar(world, tmp_path):
    from opad.export import build_trt

    assert build_trt.main(["--onnx", str(world["onnx_a"]), "--out", str(tmp_path / "plan"), "--plan-only"]) == 0
    entries = json.loads((tmp_path / "plan" / "refit_map.json").read_text())
    sidecar = json.loads((tmp_path / "plan" / "engines.json").read_text())
    assert len(entries) == 32 and sidecar["built"] is False and sidecar["concept_id"].startswith("concept_a-")
    assert set(sidecar["profiles"]) == {"conditioning.onnx", *(f"denoise_decode_{n}step.onnx" for n in (1, 2, 4))}
    with pytest.raises(OpadError, match="TensorRT is not installed|TensorRT needs a CUDA GPU|plan-only build"):
        Runner("tensorrt", engines=str(tmp_path / "plan"))
    assert build_trt.main(["--onnx", str(world["onnx_a"]), "--out", str(tmp_path / "x"), "--plan-only",
                           "--batch-range", "1:8"]) == 2
    assert not (tmp_path / "x").exists()


def test_the_denoise_graph_keeps_its_schedule_on_the_unets_device(tiny_dir):
    """alphas_cumprod lives where the UNet does (here the meta device): left on the CPU it would be a
    host->device copy per step, inside the CUDA graph on a GPU."""
    from opad.export.exporter.graphs import DenoiseDecodeGraph

    from opad.models.loading import load_models

    bundle = load_models(student=str(tiny_dir / "student"), load_teacher=False)
    schedule = bundle.student_scheduler.alphas_cumprod
    bundle.student_unet.to("meta")
    graph = DenoiseDecodeGraph(bundle, 2)
    assert graph.alphas_cumprod.device == torch.device("meta")
    assert graph.alphas_cumprod.shape == schedule.shape and graph.alphas_cumprod.dtype == schedule.dtype
