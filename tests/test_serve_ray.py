"""``opad serve --ray``: the same API over Ray Serve replicas, on a real local Ray cluster on loopback
(one per module, 4 logical CPUs, tiny preset): the openai client, both replicas serving, and a
replica killed mid-traffic (only 200/503 answers, the deployment back at 2 replicas). The flag
checks run without Ray."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from exportutil import KEY, PROMPT, LiveServer, decode, generate, make_concept
from opad.export import serve

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "2"], "--replicas needs --ray"),
    (["--min-replicas", "1", "--max-replicas", "2"], "--min-replicas needs --ray"),
    (["--ray", "--replicas", "2", "--max-replicas", "3"], "give either --replicas"),
    (["--ray", "--min-replicas", "1"], "autoscaling needs both --min-replicas and --max-replicas"),
    (["--ray", "--replicas", "0"], "--replicas must be at least 1, got 0"),
    (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "--max-replicas (2) is below --min-replicas (3)"),
    (["--ray", "--min-replicas", "1", "--max-replicas", "2", "--upscale-delay-s", "-1"],
     "--upscale-delay-s must be 0 or more, got -1"),
])
def test_bad_replica_options_fail_in_one_line(argv, message, capsys):
    assert serve.main(argv + ["--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err


def test_ray_flag_without_ray_is_one_line(tiny_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    code = serve.main(["--ray", "--replicas", "2", "--port", "0", "--backend", "eager",
                       "--student", str(tiny_dir / "student")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: --ray needs Ray Serve, which is not installed"), err


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray.serve")
    import ray
    from ray import serve as ray_serve

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), old]))  # the workers import this checkout
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        try:
            ray_serve.shutdown()
        finally:
            ray.shutdown()
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def world(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-ray")
    make_concept(tiny_dir, root / "concepts" / "a", seed=3)
    (root / "key").write_text(KEY + "\n")
    return {"root": root, "concepts": root / "concepts", "student": tiny_dir / "student"}


def _start(cluster, world, *flags):
    """``opad serve --ray ADDRESS FLAGS`` in a process of its own, joining the module's cluster, once ready."""
    process = subprocess.Popen([sys.executable, "-m", "opad.cli", "serve", "--ray", cluster, *flags,
                                "--port", "0", "--backend", "eager", "--student", str(world["student"]),
                                "--concepts", str(world["concepts"]), "--api-key-file", str(world["root"] / "key"),
                                "--batch-window-ms", "20", "--timeout-s", "30"],
                               cwd=REPO, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    port = None
    for line in process.stderr:
        lines.append(line)
        if found := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
            port = int(found.group(1))
            break
    client = LiveServer.__new__(LiveServer)
    client.process, client.lines, client.port = process, lines, port
    if not port:
        _stop(client)
        raise AssertionError("the server never said where it listens:\n" + "".join(lines[-30:]))
    threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()  # keep the pipe drained
    deadline = time.time() + 60
    while client.request("GET", "/ready")[0] != 200:
        if time.time() > deadline or process.poll() is not None:
            _stop(client)
            raise AssertionError("".join(lines[-30:]))
        time.sleep(0.1)
    return client


def _stop(client) -> None:
    client.process.send_signal(signal.SIGINT)  # Ctrl-C: the replicas are deleted with the server
    assert client.process.wait(60) == 0, "".join(client.lines[-30:])


def test_autoscaling_adds_a_replica_under_load(cluster, world):
    """--min-replicas 1 --max-replicas 2: one replica idle; under load above one batch per replica Ray Serve
    adds the second, which serves, and every answer is a 200. (Runs before the module's fixed-replica server:
    one opad app per cluster.)"""
    client = _start(cluster, world, "--min-replicas", "1", "--max-replicas", "2", "--max-batch", "1",
                    "--upscale-delay-s", "1")
    statuses: list[int] = []
    stop = threading.Event()

    def traffic(worker: int) -> None:
        i = 0
        while not stop.is_set():
            statuses.append(client.request("POST", "/v1/images/generations",
                                           {"model": "a", "prompt": PROMPT, "seed": worker * 1000 + i})[0])
            i += 1

    try:
        assert client.request("GET", "/ready")[2]["replicas"]["running"] == 1
        workers = [threading.Thread(target=traffic, args=(w,), daemon=True) for w in range(4)]
        for w in workers:
            w.start()
        deadline, scaled = time.time() + 150, False
        while time.time() < deadline and not scaled:
            time.sleep(0.5)
            scaled = len(_replica_counts(client)) == 2  # the added replica answered
        stop.set()
        for w in workers:
            w.join(60)
        assert scaled, f"no second replica served: {_replica_counts(client)}, {_replicas_running()}"
        assert set(statuses) == {200}, [s for s in statuses if s != 200][:5]
    finally:
        stop.set()
        _stop(client)


@pytest.fixture(scope="module")
def server(cluster, world):
    """``opad serve --ray ADDRESS --replicas 2``."""
    client = _start(cluster, world, "--replicas", "2")
    try:
        yield client
    finally:
        _stop(client)


def _replica_counts(server) -> dict[str, float]:
    _, _, text = server.request("GET", "/metrics")
    return {r: float(v) for r, v in re.findall(r'^opad_replica_images_total\{replica="([^"]+)"\} (\S+)$', text,
                                               re.MULTILINE)}


def _replicas_running() -> tuple[str, int]:
    from ray import serve as ray_serve

    deployment = ray_serve.status().applications["opad"].deployments["Replica"]
    return str(deployment.status), deployment.replica_states.get("RUNNING", 0)


def test_openai_client_and_both_replicas_serve(server, world):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["base", "a"]
    response = client.images.generate(model="a", prompt=PROMPT, n=1, size="64x64", response_format="b64_json",
                                      extra_body={"seed": 21})
    assert len(response.data) == 1
    reference = generate(world["student"], world["concepts"] / "a", 21, 1)[1]  # python -m opad.generate's image
    assert np.array_equal(decode(response.data[0].b64_json), reference)
    status, _, body = server.request("POST", "/v1/images/generations", {"model": "nope", "prompt": "x"})
    assert status == 404 and body["error"]["code"] == "model_not_found"  # a replica's answer, in OpenAI's shape
    assert server.request("GET", "/v1/models", key=None)[0] == 401  # the key is checked as without Ray
    status, _, ready = server.request("GET", "/ready")
    assert status == 200 and ready["replicas"]["running"] == 2, ready
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: server.images("a" if i % 2 else "base", seed=100 + i), range(24)))
    counts = _replica_counts(server)
    assert len(counts) == 2 and all(v > 0 for v in counts.values()), counts
    assert sum(counts.values()) == 25 == server.metric("opad_images_total")


def test_a_replica_killed_mid_traffic_leaves_only_200_and_503_and_is_replaced(server, cluster):
    import ray

    statuses: list[tuple[int, float, object]] = []
    stop = threading.Event()

    def traffic(worker: int) -> None:
        i = 0
        while not stop.is_set():
            sent = time.time()
            status, head, body = server.request("POST", "/v1/images/generations",
                                                {"model": "a", "prompt": PROMPT, "seed": worker * 1000 + i})
            statuses.append((status, sent, body if status != 200 else head))
            i += 1
            time.sleep(0.05)  # steady traffic that leaves the replacement replica room to start on a busy machine

    workers = [threading.Thread(target=traffic, args=(w,), daemon=True) for w in range(3)]
    for w in workers:
        w.start()
    try:
        while sum(s == 200 for s, _, _ in statuses) < 8:
            time.sleep(0.05)
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::opad#Replica")]
        assert len(replicas) == 2, replicas
        killed = replicas[0]["name"].rsplit("#", 1)[-1]  # the replica id its answers carry
        survivor = replicas[1]["name"].rsplit("#", 1)[-1]
        killed_at = time.time()
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        deadline = time.time() + 180  # a new worker process imports torch and warms up: slow on a loaded CI box
        back = False
        while time.time() < deadline and not back:  # a new replica, running and serving beside the survivor
            time.sleep(0.5)
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith("SERVE_REPLICA::opad#Replica")]
            new = set(_replica_counts(server)) - {killed, survivor}
            back = len(names) == 2 and replicas[0]["name"] not in names and bool(new) \
                and _replicas_running()[1] == 2
        recovered_at = time.time()
        later = len(statuses)
        while len(statuses) < later + 8:  # traffic goes on with the deployment whole again
            time.sleep(0.05)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    assert back, f"the deployment did not get back to 2 running replicas: {_replicas_running()}"
    assert {s for s, _, _ in statuses} <= {200, 503}, [(s, b) for s, _, b in statuses if s not in (200, 503)]
    unavailable = [b for s, _, b in statuses if s == 503]
    assert all(b["error"]["code"] in ("replica_unavailable", "queue_full") for b in unavailable), unavailable
    assert any(s == 200 and t > killed_at for s, t, _ in statuses)
    assert all(s == 200 for s, t, _ in statuses if t > recovered_at)  # whole again: no more 503s
    _, _, text = server.request("GET", "/metrics")
    counted = re.findall(r'^opad_errors_total\{code="replica_unavailable",status="503"\} (\S+)$', text, re.MULTILINE)
    assert float(counted[0] if counted else 0) == sum(
        b["error"]["code"] == "replica_unavailable" for b in unavailable)
    assert _replicas_running()[1] == 2
    assert server.images("a", seed=5)  # served after the replacement
