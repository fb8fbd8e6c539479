"""Starting the server of ``python export/serve.py``: its options checked before any model loads,
the backend chosen (``--backend auto``: TensorRT -> compiled -> ONNX Runtime -> eager, each reason
logged), the port taken, then the app (:mod:`.app`) under uvicorn. :class:`ThreadedServer` runs an
app in a background thread (tests, benchmarks)."""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import logging
import socket
from pathlib import Path

from opad.errors import OpadError, first_line

log = logging.getLogger("opad.serve")


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise OpadError(f"cannot read --api-key-file {args.api_key_file}: {first_line(e)}") from None
        if not key:
            raise OpadError(f"--api-key-file {args.api_key_file} is empty")
        return key
    if args.api_key is not None and not args.api_key.strip():
        raise OpadError("--api-key is empty")
    return args.api_key.strip() if args.api_key else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(args: argparse.Namespace) -> str | None:
    """Everything that can be checked before a model loads; returns the API key."""
    for name, low in (("max_batch", 1), ("queue", 1), ("max_body_kb", 1)):
        if getattr(args, name) < low:
            raise OpadError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    for name in ("batch_window_ms", "timeout_s", "warm_up_budget_s"):
        value = getattr(args, name)
        if not (value >= 0 and value < float("inf")) or (name == "timeout_s" and value == 0):
            raise OpadError(f"--{name.replace('_', '-')} must be a finite number above 0, got {value}")
    if not 0 <= args.port <= 65535:
        raise OpadError(f"--port must be 0..65535, got {args.port}")
    _check_ray_args(args)
    key = _api_key(args)
    if key is None and not _is_loopback(args.host) and not args.insecure:
        raise OpadError(f"refusing to listen on {args.host} without an API key: give --api-key-file (or --api-key), "
                        "or --insecure to serve anyone who can reach it")
    if args.concepts and not Path(args.concepts).is_dir():
        raise OpadError(f"--concepts folder not found: {args.concepts}")
    for flag in ("onnx", "engines"):
        if getattr(args, flag) and not Path(getattr(args, flag)).is_dir():
            raise OpadError(f"--{flag} folder not found: {getattr(args, flag)}")
    return key


def _check_ray_args(args: argparse.Namespace) -> None:
    replicas, low, high = (getattr(args, name, None) for name in ("replicas", "min_replicas", "max_replicas"))
    if getattr(args, "ray", None) is None:
        given = [flag for flag, value in (("--replicas", replicas), ("--min-replicas", low), ("--max-replicas", high))
                 if value is not None]
        if given:
            raise OpadError(f"{given[0]} needs --ray (replicas run on a Ray cluster; see docs/cluster.md)")
        return
    if replicas is not None and (low is not None or high is not None):
        raise OpadError("give either --replicas (a fixed number) or --min-replicas and --max-replicas (autoscaling), "
                        "not both")
    if (low is None) != (high is None):
        raise OpadError("autoscaling needs both --min-replicas and --max-replicas")
    for flag, value in (("--replicas", replicas), ("--min-replicas", low), ("--max-replicas", high)):
        if value is not None and value < 1:
            raise OpadError(f"{flag} must be at least 1, got {value}")
    if low is not None and high < low:
        raise OpadError(f"--max-replicas ({high}) is below --min-replicas ({low})")
    if getattr(args, "upscale_delay_s", 0) < 0:
        raise OpadError(f"--upscale-delay-s must be 0 or more, got {args.upscale_delay_s:g}")


def choose_backend(args: argparse.Namespace) -> str:
    """``--backend``, or for ``auto`` the first of TensorRT -> compiled -> ONNX Runtime -> eager this
    machine and these options allow, each reason logged."""
    if args.backend != "auto":
        return args.backend
    import torch

    gpu = torch.cuda.is_available() and args.device != "cpu"
    reasons = {
        "tensorrt": None if args.engines and gpu and importlib.util.find_spec("tensorrt") else
        "no --engines folder" if not args.engines else "no CUDA GPU" if not gpu else "TensorRT is not installed",
        "compiled": None if gpu else "no CUDA GPU (on a CPU it compiles for minutes and ONNX Runtime is faster)",
        "onnxruntime": None if args.onnx and importlib.util.find_spec("onnxruntime") else
        "no --onnx export folder" if not args.onnx else "onnxruntime is not installed",
        "eager": None,
    }
    for backend, why_not in reasons.items():
        if why_not is None:
            log.info("backend auto: %s", backend)
            return backend
        log.info("backend auto: not %s: %s", backend, why_not)
    raise AssertionError("eager is always possible")


def build_runner(args: argparse.Namespace, backend: str):
    from opad.export.runtime import Runner

    return Runner(backend, student=args.student, onnx={None: args.onnx} if args.onnx else None,
                  engines=args.engines, device=args.device, dtype=args.dtype, torch_conditioning=True)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OpadError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


class ThreadedServer:
    """An app under uvicorn in a background thread, on a free loopback port (tests, benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import threading

        import uvicorn

        sock = _listen(host, port)
        self.host, self.port = sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _ray_app(args: argparse.Namespace, backend: str, settings):
    """The same app over Ray Serve replicas (:mod:`.replicas`), each building its runner as here."""
    from functools import partial

    from opad.export.server.app import app_over
    from opad.export.server.metrics import Metrics
    from opad.export.server.replicas import start_replicas

    args = argparse.Namespace(**vars(args))  # the replicas run elsewhere: local folders by absolute path
    for name in ("student", "onnx", "engines", "concepts"):
        if getattr(args, name) and Path(getattr(args, name)).exists():
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    ray_backend = start_replicas(args.ray, partial(build_runner, args, backend), args.concepts, settings,
                                 replicas=args.replicas, min_replicas=args.min_replicas,
                                 upscale_delay_s=args.upscale_delay_s,
                                 max_replicas=args.max_replicas, gpu_wanted=args.device != "cpu")
    log.info("backend %s on Ray Serve replicas, %d px, steps %s; models: %s", backend, ray_backend.resolution,
             ",".join(map(str, ray_backend.steps)), ", ".join(ray_backend.known_models))
    return app_over(ray_backend, settings, Metrics(settings.max_batch))


def serve(args: argparse.Namespace) -> None:
    import uvicorn
    from opad.export.server.app import Settings, build_app

    key = check_args(args)
    sock = _listen(args.host, args.port)  # before the models load: a taken port fails at once
    backend = choose_backend(args)
    settings = Settings(max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, queue=args.queue,
                        timeout_s=args.timeout_s, max_body_bytes=args.max_body_kb * 1024, api_key=key,
                        warm_up_budget_s=args.warm_up_budget_s)
    if args.ray is not None:
        app = _ray_app(args, backend, settings)
    else:
        served = build_app(lambda: build_runner(args, backend), args.concepts, settings)
        runner = served.runner
        log.info("backend %s, %d px, steps %s; models: %s", backend, runner.resolution,
                 ",".join(map(str, runner.steps)), ", ".join(served.store.names()))
        app = served.app
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d%s", host, port, " (API key required)" if key else "")
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level == "debug",
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
