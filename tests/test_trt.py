"""The TensorRT path up to TensorRT's API, against a fake of it (tests/faketrt.py, on the CPU): what
the engines are built as, the refit weights' dtypes, batches cut to the engines' profile, the
execution contexts kept, the device; and the TF32 switch of the parity checks."""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
from pathlib import Path

import faketrt
import numpy as np
import onnx
import pytest
import torch
from exportutil import PROMPT, export, generate, make_concept
from onnx import numpy_helper
from opad.export import build_trt
from opad.export.engines import build as engine_build
from opad.export.exporter import export as onnx_export
from opad.export.exporter import graphs
from opad.export.exporter.precision import exact_fp32, tf32_state
from opad.export.runtime import Runner
from opad.export.runtime import tensorrt as trt_backend

from opad.errors import OpadError

CPU = torch.device("cpu")


@contextlib.contextmanager
def tf32_allowed():
    """TF32 on for matmuls too, as a user might set it (cuDNN's is on by default), then as before."""
    before = tf32_state()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.fp32_precision = before["matmul"]
        torch.backends.mkldnn.matmul.fp32_precision = before["mkldnn_matmul"]


def fp16_conditioning_export(onnx_dir: Path, out: Path, student: Path, concept: Path) -> Path:
    """``onnx_dir`` (an fp32 export) with its conditioning graph (a) as ``export_onnx.py --fp16`` writes
    it on a GPU: the same graph, names and exporter, traced from a float16 bundle. (The export script
    refuses --fp16 on the CPU for its denoise graph's convolutions; the text encoder and the K/V
    projections run in float16 on the CPU.) Its export.json says fp16."""
    from opad.concept.folder import load_concept
    from opad.models.loading import load_models

    shutil.copytree(onnx_dir, out)
    record = json.loads((out / "export.json").read_text())
    bundle = load_models(student=str(student), dtype=torch.float16, load_teacher=False)
    tokens = load_concept(concept, bundle.student_unet, bundle.tokenizer, bundle.text_encoder)
    with torch.no_grad():
        embeds = onnx_export._prompt_embeddings(bundle, tokens, record["batch"][1])
        onnx_export._export(graphs.ConditioningGraph(bundle).eval(), (embeds,), out / "conditioning.onnx",
                            ["token_embeds"], record["kv_names"], tuple(record["batch"]), record["opset"],
                            record["exporter"])
    (out / "export.json").write_text(json.dumps({**record, "precision": "fp16"}))
    return out


@pytest.fixture(scope="module")
def world(tiny_dir, tmp_path_factory):
    """Concepts a and b; an fp32 export of a with a batch range 1:3 (made with TF32 allowed, the TF32
    state inside its reference computation recorded), and its fp16 twin."""
    root = tmp_path_factory.mktemp("trt")
    student = tiny_dir / "student"
    a, b = make_concept(tiny_dir, root / "concept_a", seed=3), make_concept(tiny_dir, root / "concept_b", seed=4)
    seen = []
    with pytest.MonkeyPatch.context() as patch, tf32_allowed():
        user = tf32_state()
        decode = graphs.decode_to_images
        patch.setattr(graphs, "decode_to_images", lambda *args: (seen.append(tf32_state()), decode(*args))[1])
        onnx_a = export(root / "onnx_a", student, a, steps=1, no_single=True, batch_range="1:3")
        after = tf32_state()
    return {"root": root, "student": student, "a": a, "b": b, "onnx_a": onnx_a,
            "onnx_a16": fp16_conditioning_export(onnx_a, root / "onnx_a16", student, a),
            "tf32": {"user": user, "inside": seen, "after": after}}


@pytest.fixture(scope="module")
def fake():
    """The fake TensorRT in place of the real one (and of its GPU check) for this module."""
    trt = faketrt.make()
    with pytest.MonkeyPatch.context() as patch:
        for module in (engine_build, trt_backend):
            patch.setattr(module, "tensorrt", lambda device=None: trt)
        yield trt


@pytest.fixture(scope="module")
def reference(world):
    """What ``opad.generate`` makes (uint8) for (concept, prompt, seed), each made once."""
    made = {}

    def image(concept: str, prompt: str, seed: int) -> np.ndarray:
        if (concept, prompt, seed) not in made:
            made[concept, prompt, seed] = generate(world["student"], world[concept], seed, 1, prompt=prompt)[1]
        return made[concept, prompt, seed]
    return image


def build(fake, onnx_dir: Path, out: Path, *options: str) -> Path:
    assert build_trt.main(["--onnx", str(onnx_dir), "--out", str(out), "--device", "cpu", *options]) == 0
    return out


@pytest.fixture(scope="module")
def engines(world, fake):
    """Engines of each export precision x build flag TensorRT allows, and of narrower batch profiles."""
    root = world["root"]
    return {"fp32": build(fake, world["onnx_a"], root / "e_fp32"),
            "fp32+fp16": build(fake, world["onnx_a"], root / "e_fp32_fp16", "--fp16"),
            "fp16": build(fake, world["onnx_a16"], root / "e_fp16"),
            "static1": build(fake, world["onnx_a"], root / "e_static1", "--batch-range", "1:1"),
            "min2": build(fake, world["onnx_a"], root / "e_min2", "--batch-range", "2:3")}


def _built(folder: Path, graph: str) -> dict:
    """How the fake built an engine of ``folder`` (its "serialized engine" is that description)."""
    return json.loads((folder / graph.replace(".onnx", ".plan")).read_bytes())


def test_engines_compute_in_the_precision_engines_json_records(world, engines, fake, tmp_path, capsys):
    """An fp16 export is built strongly typed (its ONNX types decide, no FP16 flag); an fp32 export as
    exact fp32 (TF32 cleared) or, with --fp16, with the FP16 flag; engines.json says which."""
    want = {"fp32": ("fp32", False, []), "fp32+fp16": ("fp16 and fp32 (TensorRT's choice per layer)", False,
                                                        ["FP16", "TF32"]),
            "fp16": ("fp16", True, [])}
    for name, (computes, strongly_typed, flags) in want.items():
        record = json.loads((engines[name] / "engines.json").read_text())
        assert record["engine_precision"] == computes, name
        assert record["builder"] == {"strongly_typed": strongly_typed, "fp16_flag": "FP16" in flags,
                                     "tf32": "TF32" in flags}
        for graph in ("conditioning.onnx", "denoise_decode_1step.onnx"):
            built = _built(engines[name], graph)
            assert built["strongly_typed"] == strongly_typed
            assert [f for f in built["flags"] if f != "REFIT_INDIVIDUAL"] == flags, (name, graph)
        assert set(record["max_abs_error_vs_onnxruntime"]) == {"conditioning.onnx", "denoise_decode_1step.onnx"}
    assert build_trt.main(["--onnx", str(world["onnx_a16"]), "--out", str(tmp_path / "x"), "--fp16",
                           "--device", "cpu"]) == 2
    assert "--fp16 builds from an fp32 export" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["fp32", "fp32+fp16", "fp16"])
def test_refit_weights_have_the_onnx_initializers_dtype(world, engines, fake, reference, name):
    """For each export precision x build flag: every refit weight has its ONNX initializer's dtype (the
    fake refitter, like TensorRT's, refuses any other), and switching concepts A -> B -> A gives each
    concept's images."""
    folder = engines[name]
    record = json.loads((folder / "engines.json").read_text())
    model = onnx.load(str(Path(record["onnx_dir"]) / "conditioning.onnx"))
    initializers = {t.name: numpy_helper.to_array(t).dtype for t in model.graph.initializer}
    entries = json.loads((folder / "refit_map.json").read_text())
    assert {e["dtype"] for e in entries} == {"float16" if name == "fp16" else "float32"}
    assert record["refit_dtype"] == [entries[0]["dtype"]]
    runner = Runner("tensorrt", engines=str(folder), concepts={"a": str(world["a"]), "b": str(world["b"])},
                    device="cpu")
    for weights in runner._impl.refits.values():
        assert {n: w.dtype for n, w in weights.items()} == {e["onnx"]: initializers[e["onnx"]] for e in entries}
    refits = len(fake.log["refits"])
    asked = [("a", PROMPT), ("b", PROMPT), ("a", PROMPT + " on a beach")]  # a new prompt: A's K/V made again
    got = [runner.generate(prompt, concept, seed=5)[0] for concept, prompt in asked]
    assert len(fake.log["refits"]) == refits + 3
    worst = 1 if name == "fp32" else 3  # an fp16 conditioning's K/V round to fp16
    for (concept, prompt), image in zip(asked, got):
        assert np.abs(image.astype(int) - reference(concept, prompt, 5)).max() <= worst, (name, concept, prompt)


def _enqueued(fake, start: int) -> list[int]:
    """The batch of every denoise+decode enqueue since ``start`` (its noise input)."""
    return [shapes["noise"][0] for shapes in fake.log["enqueues"][start:] if "noise" in shapes]


@pytest.mark.parametrize("name, images, calls", [("fp32", 7, [3, 3, 1]), ("static1", 3, [1, 1, 1]),
                                                   ("min2", 1, [2]), ("min2", 5, [3, 2])])
def test_batches_are_cut_and_padded_to_the_engines_profile(world, engines, fake, name, images, calls):
    """Any number of images on the engines' batch range: at most its max per call, padded up to its
    min (image i still from seed + i), every shape inside the profile."""
    runner = Runner("tensorrt", engines=str(engines[name]), device="cpu")
    start, shapes = len(fake.log["enqueues"]), len(fake.log["shapes"])
    got = runner.generate("a photo of a dog", None, seed=30, batch=images)
    assert _enqueued(fake, start) == calls
    lo, _, hi = (s[0] for s in json.loads((engines[name] / "engines.json").read_text())["profiles"][
        "denoise_decode_1step.onnx"]["noise"])
    assert fake.log["shapes"][shapes:] and all(lo <= shape[0] <= hi for _, _, shape in fake.log["shapes"][shapes:])
    want = Runner("eager", student=str(world["student"])).generate("a photo of a dog", None, seed=30, batch=images)
    assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1
    for slot in runner._impl.pool.slots.values():  # every buffer on the runner's device
        assert {b.device for b in slot.buffers.values()} == {CPU}


def test_a_shape_outside_the_profile_is_one_clear_error(engines, fake):
    from opad.export.engines.execution import bind

    runner = Runner("tensorrt", engines=str(engines["static1"]), device="cpu")
    engine = runner._impl.denoisers[1].engine
    shapes = {name: (2, *rest) for name, rest in runner._impl.denoisers[1].rest.items()}
    with pytest.raises(OpadError, match=r"the engine refuses \w+ of shape \(2, .*: its profile takes \(1, ") as e:
        bind(fake, engine, shapes, CPU)
    assert "\n" not in str(e.value)


def test_execution_contexts_are_bounded(world, engines, fake, monkeypatch):
    """At most MAX_CONTEXTS execution contexts live (the least recently used dropped), and the
    runner makes the images again after dropping one."""
    monkeypatch.setattr(trt_backend, "MAX_CONTEXTS", 2)
    runner = Runner("tensorrt", engines=str(engines["fp32"]), device="cpu")
    alive = fake.live_contexts()
    first = runner.generate("a photo", None, seed=40)
    for images in (2, 3, 1, 2):
        runner.generate("a photo", None, seed=40, batch=images)
        gc.collect()
        assert len(runner._impl.pool.slots) <= 2 and fake.live_contexts() - alive <= 2
    assert np.array_equal(runner.generate("a photo", None, seed=40), first)
    assert [key for key in runner._impl.pool.slots] == [("denoise_decode_1step", 2), ("denoise_decode_1step", 1)]


def test_torch_conditioning_runs_on_the_runners_device(world, engines):
    """The server's mode: the conditioning in PyTorch on the TensorRT runner's device, the engines for
    denoise+decode only."""
    runner = Runner("tensorrt", engines=str(engines["fp32"]), concepts={"b": str(world["b"])}, device="cpu",
                    torch_conditioning=True, student=str(world["student"]))
    assert runner._cond.bundle.device == CPU
    _, want = generate(world["student"], world["b"], seed=6, steps=1)
    assert np.abs(runner.generate(PROMPT, "b", seed=6)[0].astype(int) - want).max() <= 1


def test_export_reference_runs_in_exact_fp32(world):
    """The export's PyTorch reference (its parity check's other side) ran with TF32 off, though the
    caller had allowed it; the caller's setting came back after."""
    tf32 = world["tf32"]
    assert tf32["user"]["conv"] == "tf32" and tf32["user"]["matmul"] == "tf32"
    assert tf32["inside"] and all(s["conv"] == s["matmul"] == s["rnn"] == "ieee" for s in tf32["inside"])
    assert tf32["after"] == tf32["user"]


@pytest.mark.parametrize("setting", ["default", "legacy", "new"])
def test_exact_fp32_switches_tf32_off_and_restores(setting):
    before = tf32_state()
    if setting == "legacy":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    elif setting == "new":
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        user = tf32_state()
        with exact_fp32():
            inside = tf32_state()
            assert torch.backends.cudnn.allow_tf32 is False and torch.get_float32_matmul_precision() == "highest"
        assert inside == {"matmul": "ieee", "conv": "ieee", "rnn": "ieee", "mkldnn_matmul": "ieee"}
        assert tf32_state() == user
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = True
        for op, owner in (("matmul", torch.backends.cuda.matmul), ("conv", torch.backends.cudnn.conv),
                          ("rnn", torch.backends.cudnn.rnn), ("mkldnn_matmul", torch.backends.mkldnn.matmul)):
            owner.fp32_precision = before[op]
    assert tf32_state() == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_launch_captures_and_replays_on_its_device():
    """The CUDA-graph launch on the last GPU (cuda:N, not the current device): warm-up and capture on a
    side stream that waited for the buffers' writes, replays ordered on the device's current stream."""
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    x = torch.zeros(1 << 20, device=device)
    y = torch.empty_like(x)

    class Context:  # an engine that doubles its input, enqueued on the stream it is given
        def execute_async_v3(self, stream: int) -> bool:
            assert stream == torch.cuda.current_stream(device).cuda_stream
            torch.mul(x, 2, out=y)
            return True

    x.fill_(3)  # on the current stream, just before the warm-up reads it on the side stream
    run, graph = trt_backend.CudaGraphLaunch(device).prepare(Context())
    assert torch.equal(y, torch.full_like(x, 6))
    for value in (1.5, -2.0):
        x.fill_(value)
        run()
        assert torch.equal(y, torch.full_like(x, 2 * value))
    graph.reset()
