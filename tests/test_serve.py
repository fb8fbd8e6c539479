"""The OpenAI-compatible server over real HTTP on 127.0.0.1: images against ``opad.generate``, the
official ``openai`` client, batching, limits, keys and broken concepts (tiny preset, CPU)."""

from __future__ import annotations

import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from exportutil import KEY, PROMPT, LiveServer, decode, export, generate, make_concept
from opad.export import serve
from opad.export.runtime import Runner
from opad.export.server import launch
from opad.export.server.app import Settings, build_app
from opad.export.server.concept_store import ConceptStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tiny_dir, tmp_path_factory):
    """Concepts a and b, a valid concept outside the folder, and two broken ones inside it."""
    root = tmp_path_factory.mktemp("serve")
    concepts = root / "concepts"
    a = make_concept(tiny_dir, concepts / "a", seed=3)
    make_concept(tiny_dir, concepts / "b", seed=4)
    make_concept(tiny_dir, root / "outside", seed=5)
    shutil.copytree(a, concepts / "pickled")
    (concepts / "pickled" / "pytorch_custom_diffusion_weights.bin").write_bytes(b"\x80\x04 not really a pickle")
    shutil.copytree(a, concepts / "truncated")
    weights = concepts / "truncated" / "pytorch_custom_diffusion_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return {"root": root, "concepts": concepts, "student": tiny_dir / "student"}


@pytest.fixture(scope="module")
def eager(world):
    server = LiveServer(lambda: Runner("eager", student=str(world["student"]), torch_conditioning=True),
                        world["concepts"], Settings(api_key=KEY, batch_window_ms=150, max_body_bytes=16384))
    yield server
    server.stop()


def _reference(world, model: str, seed: int, steps: int = 1) -> np.ndarray:
    concept = None if model == "base" else world["concepts"] / model
    return generate(world["student"], concept, seed, steps)[1]


def test_images_equal_generate_for_two_concepts_and_base(eager, world):
    for model in ("a", "b", "base"):
        for steps in (1, 2):
            got = eager.images(model, seed=21, steps=steps)[0]
            assert np.array_equal(got, _reference(world, model, 21, steps)), (model, steps)
    assert not np.array_equal(eager.images("a", seed=21)[0], eager.images("b", seed=21)[0])


def test_openai_client(eager, world):
    from openai import OpenAI

    client = OpenAI(base_url=eager.url + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["base", "a", "b"]  # the broken ones are left out
    response = client.images.generate(model="b", prompt=PROMPT, n=2, size="64x64", response_format="b64_json",
                                      extra_body={"seed": 30})
    assert response.created > 0 and len(response.data) == 2
    for i, item in enumerate(response.data):  # image i from seed + i; a batch of 2 rounds within one level
        diff = np.abs(decode(item.b64_json).astype(int) - _reference(world, "b", 30 + i).astype(int))
        assert diff.max() <= 1
    bad = OpenAI(base_url=eager.url + "/v1", api_key="sk-wrong", max_retries=0)
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError):
        bad.models.list()


def test_batching_gathers_concurrent_requests(eager):
    jobs = [("a" if i % 2 else "b", 40 + i) for i in range(8)]
    single = {job: eager.images(*job)[0] for job in jobs}  # one at a time: batches of 1
    batches, images = eager.metric("opad_batch_images_count"), eager.metric("opad_images_total")
    with ThreadPoolExecutor(8) as pool:
        together = dict(zip(jobs, pool.map(lambda job: eager.images(*job)[0], jobs)))
    assert eager.metric("opad_images_total") - images == 8
    assert eager.metric("opad_batch_images_count") - batches <= 2
    for job in jobs:  # a batched convolution rounds differently: within one level of 255
        assert np.abs(together[job].astype(int) - single[job].astype(int)).max() <= 1


def test_response_carries_timings_seed_and_revised_prompt(eager):
    status, head, body = eager.request("POST", "/v1/images/generations", {"model": "a", "prompt": PROMPT})
    assert status == 200 and "revised_prompt" not in body["data"][0]
    stages = dict(re.findall(r"(\w+);dur=([\d.]+)", head["server-timing"]))
    assert list(stages) == ["queue", "conditioning", "denoise", "decode", "encode"]  # eager: UNet and VAE apart
    assert float(stages["denoise"]) > 0 and float(stages["decode"]) > 0 and 0 <= int(head["x-opad-seed"]) < 2**32
    long = " ".join(f"word{i}" for i in range(120))
    status, _, body = eager.request("POST", "/v1/images/generations", {"model": "a", "prompt": long, "seed": 1})
    revised = body["data"][0]["revised_prompt"]
    assert status == 200 and revised.startswith("word0 word1") and len(revised.split()) < 120
    # the truncated prompt is what was drawn: its image equals the long prompt's
    assert np.array_equal(eager.images("a", seed=1, prompt=revised)[0], decode(body["data"][0]["b64_json"]))


ERROR = "/v1/images/generations"
OK = {"model": "a", "prompt": "a photo"}
MALFORMED = [  # (case, body or raw bytes, key, status, code, param)
    ("bad JSON", b'{"prompt": ', KEY, 400, "invalid_json", None),
    ("not an object", [1, 2], KEY, 400, "invalid_json", None),
    ("missing prompt", {"model": "a"}, KEY, 422, "missing_required_parameter", "prompt"),
    ("prompt not a string", {**OK, "prompt": 12}, KEY, 422, "invalid_value", "prompt"),
    ("empty prompt", {**OK, "prompt": "   "}, KEY, 422, "invalid_value", "prompt"),
    ("n = 0", {**OK, "n": 0}, KEY, 422, "invalid_value", "n"),
    ("n = 5", {**OK, "n": 5}, KEY, 422, "invalid_value", "n"),
    ("n a string", {**OK, "n": "2"}, KEY, 422, "invalid_value", "n"),
    ("n a bool", {**OK, "n": True}, KEY, 422, "invalid_value", "n"),
    ("n a float", {**OK, "n": 1.5}, KEY, 422, "invalid_value", "n"),
    ("unknown concept", {**OK, "model": "nope"}, KEY, 404, "model_not_found", "model"),
    ("parent path", {**OK, "model": "../outside"}, KEY, 404, "model_not_found", "model"),
    ("absolute path", {**OK, "model": "/etc/passwd"}, KEY, 404, "model_not_found", "model"),
    ("path separator", {**OK, "model": "a/b"}, KEY, 404, "model_not_found", "model"),
    ("backslash", {**OK, "model": "a\\..\\b"}, KEY, 404, "model_not_found", "model"),
    ("pickle concept", {**OK, "model": "pickled"}, KEY, 404, "model_not_found", "model"),
    ("truncated concept", {**OK, "model": "truncated"}, KEY, 404, "model_not_found", "model"),
    ("model not a string", {**OK, "model": 5}, KEY, 422, "invalid_value", "model"),
    ("bad size", {**OK, "size": "512x512"}, KEY, 422, "invalid_value", "size"),
    ("size a number", {**OK, "size": 64}, KEY, 422, "invalid_value", "size"),
    ("url format", {**OK, "response_format": "url"}, KEY, 422, "invalid_value", "response_format"),
    ("other format", {**OK, "response_format": "jpeg"}, KEY, 422, "invalid_value", "response_format"),
    ("steps 3", {**OK, "steps": 3}, KEY, 422, "invalid_value", "steps"),
    ("steps a string", {**OK, "steps": "1"}, KEY, 422, "invalid_value", "steps"),
    ("negative seed", {**OK, "seed": -1}, KEY, 422, "invalid_value", "seed"),
    ("seed past 32 bits", {**OK, "seed": 2**32}, KEY, 422, "invalid_value", "seed"),
    ("unknown field", {**OK, "quality": "hd"}, KEY, 422, "unknown_parameter", "quality"),
    ("huge body", {**OK, "prompt": "x" * 20000}, KEY, 413, "body_too_large", None),
    ("wrong key", OK, "sk-wrong", 401, "invalid_api_key", None),
    ("no key", OK, None, 401, "invalid_api_key", None),
]


@pytest.mark.parametrize("case,body,key,status,code,param", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_openai_errors(eager, case, body, key, status, code, param):
    raw = body if isinstance(body, bytes) else None
    got, head, answer = eager.request("POST", ERROR, None if raw else body, key=key, raw=raw)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["code"], error["param"]) == (code, param)
    assert error["type"] == "invalid_request_error"
    if status == 401:
        assert head["www-authenticate"] == "Bearer"


def test_routes_keys_and_probes(eager):
    assert eager.request("GET", "/health", key=None)[0] == 200  # the one route without a key
    for path in ("/ready", "/metrics", "/v1/models"):
        assert eager.request("GET", path, key=None)[0] == 401
        assert eager.request("GET", path)[0] == 200
    status, _, body = eager.request("GET", "/v1/nope")
    assert status == 404 and body["error"]["message"] == "no route GET /v1/nope"
    assert eager.request("GET", ERROR)[0] == 405
    chunked = {"Transfer-Encoding": "chunked"}  # no Content-Length: the body is counted as it arrives
    assert eager.request("POST", ERROR, OK, headers=chunked)[0] == 200
    assert eager.request("POST", ERROR, {**OK, "prompt": "x" * 20000}, headers=chunked)[0] == 413
    text = eager.request("GET", "/metrics")[2]
    for name in ("opad_requests_total", "opad_errors_total", "opad_queue_depth", "opad_batch_images_count",
                 "opad_stage_seconds_count"):
        assert name in text


def test_a_client_that_hangs_up_mid_body_is_one_info_line_and_a_499(eager, caplog):
    """A disconnect while the body is still arriving is the client's doing: no traceback, no server error."""
    def disconnects() -> float:
        text = eager.request("GET", "/metrics")[2]
        found = re.search(r'^opad_requests_total{route="/v1/images/generations",status="499"} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    before, errors_before = disconnects(), eager.metric("opad_errors_total")
    caplog.set_level(logging.INFO)
    with socket.create_connection(("127.0.0.1", eager.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 4000\r\n\r\n{\"model\": \"ba")
        time.sleep(0.3)  # the server is inside the body when the client goes
    deadline = time.time() + 10
    while disconnects() < before + 1:
        assert time.time() < deadline, "the disconnect was never counted as a 499"
        time.sleep(0.05)
    assert eager.metric("opad_errors_total") == errors_before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], \
        [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert any("disconnected" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert eager.request("POST", ERROR, OK)[0] == 200  # and the server goes on


def test_timeout_answers_504(eager):
    eager.settings.timeout_s = 1e-4
    try:
        status, _, body = eager.request("POST", ERROR, {**OK, "n": 4})
    finally:
        eager.settings.timeout_s = 60.0
    assert status == 504 and body["error"]["code"] == "timeout"
    assert eager.request("POST", ERROR, OK)[0] == 200


def test_concepts_appear_and_broken_ones_are_skipped_without_restart(eager, world, caplog):
    concepts = world["concepts"]
    make_concept(world["student"].parent, concepts / "c", seed=6)
    shutil.copytree(concepts / "a", concepts / "broken")
    (concepts / "broken" / "pytorch_custom_diffusion_weights.safetensors").write_bytes(b"\x10\x00")
    with caplog.at_level(logging.WARNING, logger="opad.serve"):
        names = [m["id"] for m in eager.request("GET", "/v1/models")[2]["data"]]
        eager.request("GET", "/v1/models")  # unchanged files: no second log line
    assert names == ["base", "a", "b", "c"]
    lines = [r.getMessage() for r in caplog.records if "'broken'" in r.getMessage()]
    assert len(lines) == 1 and "not a readable safetensors file" in lines[0]
    assert np.array_equal(eager.images("c", seed=3)[0], _reference(world, "c", 3))
    assert eager.request("POST", ERROR, {**OK, "model": "a"})[0] == 200  # the others keep serving
    shutil.rmtree(concepts / "c")
    assert [m["id"] for m in eager.request("GET", "/v1/models")[2]["data"]] == ["base", "a", "b"]
    assert eager.request("POST", ERROR, {**OK, "model": "c"})[0] == 404


def test_startup_logs_name_each_refused_concept(world, caplog):
    runner = Runner("eager", student=str(world["student"]), torch_conditioning=True)
    link = world["concepts"] / "linked"
    link.symlink_to(world["root"] / "outside", target_is_directory=True)  # a valid concept, but elsewhere
    try:
        with caplog.at_level(logging.WARNING, logger="opad.serve"):
            store = ConceptStore(world["concepts"], runner)
            names = store.scan()
            assert not store.refresh("linked")
    finally:
        link.unlink()
    assert {"a", "b"} <= set(names) and not {"pickled", "truncated", "linked"} & set(names)
    messages = [r.getMessage() for r in caplog.records]
    assert any("concept 'pickled' skipped" in m and "safetensors only" in m for m in messages)
    assert any("concept 'truncated' skipped" in m for m in messages)
    assert sum("concept 'linked' skipped" in m and "leads outside" in m for m in messages) == 1


def test_full_queue_answers_503_and_the_server_stays_healthy(world):
    server = LiveServer(lambda: Runner("eager", student=str(world["student"]), torch_conditioning=True),
                        world["concepts"], Settings(queue=4, max_batch=4, batch_window_ms=1))
    try:
        def one(i):
            return server.request("POST", ERROR, {"model": "ab"[i % 2], "prompt": f"a photo {i}", "n": 4},
                                  key=None)
        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(one, range(50)))
        statuses = [status for status, _, _ in answers]
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 4 and 503 in statuses
        for status, head, body in answers:
            if status == 503:
                assert head["retry-after"] == "1" and body["error"]["code"] == "queue_full"
        assert server.request("GET", "/health")[0] == 200 and server.request("GET", "/ready")[0] == 200
        assert server.metric("opad_queue_depth") == 0
        assert server.request("POST", ERROR, OK)[0] == 200
    finally:
        server.stop()


def test_onnxruntime_backend_equals_generate(world, tmp_path):
    from openai import OpenAI

    onnx = export(tmp_path / "onnx", world["student"], steps=1, no_single=True)
    server = LiveServer(lambda: Runner("onnxruntime", student=str(world["student"]), onnx={None: str(onnx)},
                                       torch_conditioning=True), world["concepts"], Settings())
    try:
        for model in ("a", "b", "base"):  # ONNX Runtime: within one level of 255
            got = server.images(model, seed=8)[0]
            assert np.abs(got.astype(int) - _reference(world, model, 8).astype(int)).max() <= 1, model
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        response = client.images.generate(model="a", prompt=PROMPT, n=1, response_format="b64_json",
                                          extra_body={"seed": 8})
        assert np.abs(decode(response.data[0].b64_json).astype(int) - _reference(world, "a", 8).astype(int)).max() <= 1
        _, head, _ = server.request("POST", ERROR, OK)  # one ONNX graph: one stage for both
        assert re.findall(r"(\w+);dur=", head["server-timing"]) == ["queue", "conditioning", "denoise_decode", "encode"]
        status, _, body = server.request("POST", ERROR, {**OK, "steps": 2})  # only a 1-step graph was exported
        assert status == 422 and "one of 1 " in body["error"]["message"]
    finally:
        server.stop()


@pytest.mark.parametrize("argv,message", [
    (["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without an API key"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--timeout-s", "nan"], "--timeout-s must be a finite number"),
    (["--concepts", "/no/such/folder"], "--concepts folder not found"),
    (["--api-key", " "], "--api-key is empty"),
])
def test_bad_options_fail_in_one_line(argv, message, capsys):
    assert serve.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1


def test_opad_serve_command_runs_end_to_end(world, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    process = subprocess.Popen([sys.executable, "-m", "opad.cli", "serve", "--port", "0", "--concepts",
                                str(world["concepts"]), "--api-key-file", str(key_file)],
                               stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in process.stderr:
            if found := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
                port = int(found.group(1))
                break
        assert port, "the server never said where it listens"
        threading.Thread(target=process.stderr.read, daemon=True).start()  # keep the pipe drained
        client = LiveServer.__new__(LiveServer)
        client.port = port
        deadline = time.time() + 60
        while client.request("GET", "/ready")[0] != 200:
            assert time.time() < deadline and process.poll() is None
            time.sleep(0.1)
        assert np.array_equal(client.images("a", seed=21)[0], _reference(world, "a", 21))
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0


def test_compiled_backend_pads_batches_to_a_power_of_two(world, monkeypatch):
    """The padding alone (the compile itself is the export tests'): 3 images run as a batch of 4."""
    from opad.export.exporter.graphs import DenoiseDecodeGraph
    from opad.export.runtime.batch_plan import compiled_batch

    compiled = Runner("compiled", student=str(world["student"]))
    seen = []

    def eager_graph(steps):
        graph = DenoiseDecodeGraph(compiled._impl.bundle, steps).eval()
        return lambda noise, *kv: (seen.append(noise.shape[0]), graph(noise, *kv))[1]

    monkeypatch.setattr(compiled._impl, "graph", eager_graph)
    items = [(None, f"a photo {i}", 50 + i) for i in range(3)]
    got, _ = compiled.run_batch(items, 1)
    want, _ = Runner("eager", student=str(world["student"])).run_batch(items, 1)
    assert seen == [4] and got.shape[0] == 3 and np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert [compiled_batch(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert compiled.warm_up_batches(6) == [1, 2, 4, 8]


def test_backend_auto_says_why(tmp_path, caplog):
    parse = serve.build_parser().parse_args
    gpu = __import__("torch").cuda.is_available()
    with caplog.at_level(logging.INFO, logger="opad.serve"):
        assert launch.choose_backend(parse(["--engines", str(tmp_path), "--device", "cpu"])) == "eager"
        assert launch.choose_backend(parse(["--onnx", str(tmp_path), "--device", "cpu"])) == "onnxruntime"
        assert launch.choose_backend(parse(["--backend", "eager", "--onnx", str(tmp_path)])) == "eager"
    messages = [r.getMessage() for r in caplog.records]
    assert "backend auto: not tensorrt: no CUDA GPU" in messages
    assert "backend auto: not onnxruntime: no --onnx export folder" in messages
    assert "backend auto: onnxruntime" in messages
    if not gpu:
        assert launch.choose_backend(parse([])) == "eager"


def test_ready_says_what_is_left_to_warm_up_and_the_budget_bounds_the_wait(world):
    """/ready lists the warm-up variants left; once the first is warm and the budget is spent the
    server is ready while the rest runs in the background. (Each warm-up call waits for the test's
    go, to hold the server in each state.)"""
    go = {steps: threading.Event() for steps in (1, 2, 4)}

    def make_runner():
        runner = Runner("eager", student=str(world["student"]), torch_conditioning=True)
        run_batch = runner.run_batch

        def gated(items, steps):
            if items[0][1] == "warm-up":
                go[steps].wait(60)
            return run_batch(items, steps)
        runner.run_batch = gated
        return runner

    server = launch.ThreadedServer(build_app(make_runner, None, Settings(warm_up_budget_s=0.3)).app)
    client = LiveServer.__new__(LiveServer)
    client.port = server.port

    def ready_when(check) -> tuple[int, dict]:
        deadline = time.time() + 60
        while not check(*(answer := client.request("GET", "/ready", key=None))[:3:2]):
            assert time.time() < deadline, answer
            time.sleep(0.05)
        return answer[0], answer[2]

    variants = [{"steps": steps, "batch": 1} for steps in (1, 2, 4)]
    try:
        status, body = ready_when(lambda status, body: status != 0)
        assert (status, body) == (503, {"status": "warming up", "compiling": variants})
        time.sleep(0.5)  # the budget is spent, but no variant is warm yet
        assert client.request("GET", "/ready", key=None)[0] == 503
        go[1].set()
        status, body = ready_when(lambda status, body: status == 200)
        assert body["status"] == "ready" and body["compiling"] == variants[1:]  # 2 steps: running now
        go[2].set()
        go[4].set()
        status, body = ready_when(lambda status, body: status == 200 and not body["compiling"])
        assert "failed" not in body
        assert client.request("POST", ERROR, {**OK, "model": "base", "steps": 4}, key=None)[0] == 200
    finally:
        for event in go.values():
            event.set()
        server.stop()
