"""The HTTP side of the server: an OpenAI-compatible images API over one :class:`Runner`.

Routes: ``POST /v1/images/generations``, ``GET /v1/models``, ``/health`` (alive), ``/ready``
(models loaded and warmed up), ``/metrics`` (Prometheus), and the live page for people: ``GET /``
and its assets ``GET /page/NAME`` (:mod:`.site`).

Warm-up runs every (steps, batch) variant the backend compiles once (:meth:`Runner.warm_up_plan`,
the default step count first). Compiling all of them can take many minutes on a GPU
(``max-autotune``), so it has a budget (``Settings.warm_up_budget_s``): once the first variant is
warm and either all are or the budget is spent, the server is ready, and the variants left compile
in the background, each started only while no request waits (the model has one thread: a request
that arrives during a variant's compile waits for it; a request for a variant not compiled yet
compiles it on first use). ``/ready`` lists the variants still to come, as ``compiling``:
503 ``{"status": "warming up", "compiling": [...]}`` before, 200 ``{"status": "ready", ...,
"compiling": [...]}`` after. With an API key every route but
``/health`` and the page's own files (which carry no secret) needs ``Authorization: Bearer KEY``. Errors come in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from opad.export.runtime import Runner
from opad.export.server.batcher import Batcher, ModelThread, QueueFull
from opad.export.server.concept_store import BASE, ConceptStore, is_plain_name
from opad.export.server.metrics import Metrics
from opad.export.server.request import ApiError, GenerationRequest, parse_generation, parse_json
from opad.export.server.site import HEADERS, page_files, route_label
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from opad.errors import OpadError, first_line

log = logging.getLogger("opad.serve")
ROUTES = ("/v1/images/generations", "/v1/models", "/health", "/ready", "/metrics")


@dataclass
class Settings:
    max_batch: int = 8
    batch_window_ms: float = 5.0
    queue: int = 64
    timeout_s: float = 60.0
    max_body_bytes: int = 64 * 1024
    api_key: str | None = None
    retry_after_s: int = 1
    warm_up_budget_s: float = 300.0  # ready after this even if variants are left to compile


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request the client abandoned (no one reads it)


def _png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _error(e: ApiError, metrics: Metrics) -> JSONResponse:
    metrics.errors.labels(str(e.status), e.code or "none").inc()
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: a chunked body has no length
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class Served:
    app: FastAPI
    runner: Runner
    store: ConceptStore
    model: ModelThread


def build_app(make_runner, concepts: str | None, settings: Settings) -> Served:
    """``make_runner()`` run on a fresh model thread, the concepts scanned there, and the app over them."""
    model = ModelThread()
    runner = model.run(make_runner)
    store = ConceptStore(concepts, runner)
    model.run(store.scan)
    return Served(create_app(runner, store, settings, model), runner, store, model)


@dataclass
class Generated:
    """A generation request's answer from a backend: PNGs (base64), the prompt drawn if it was cut,
    seconds per stage, and the replica that made them (None in one process)."""
    images_b64: list[str]
    revised: str | None
    stages: dict[str, float]
    replica: str | None = None


class LocalBackend:
    """Today's server: the runner, its concept store and the dynamic batcher in this process, every
    model call on ``model`` (the thread they were built on); warm-up in the background."""

    def __init__(self, runner: Runner, store: ConceptStore, settings: Settings, model: ModelThread,
                 metrics: Metrics) -> None:
        self.runner, self.store, self.settings, self.model, self.metrics = runner, store, settings, model, metrics
        self.resolution, self.steps = runner.resolution, runner.steps
        # compiling: the warm-up variants still to run; failed: those that raised; error: why warm-up stopped
        self.state: dict = {"ready": False, "compiling": [], "failed": [], "error": None}
        self.batcher: Batcher | None = None
        self.warm: asyncio.Task | None = None

    async def start(self) -> None:
        settings = self.settings
        self.batcher = Batcher(self.runner, self.model, self.metrics, max_batch=settings.max_batch,
                               window_s=settings.batch_window_ms / 1000, queue=settings.queue)
        self.batcher.start()
        self.warm = asyncio.get_running_loop().create_task(self._warm_up())

    async def stop(self) -> None:
        self.warm.cancel()
        await self.batcher.stop()
        self.model.close()

    async def _warm_up(self) -> None:
        state, settings, runner, model = self.state, self.settings, self.runner, self.model
        start = time.perf_counter()
        plan = runner.warm_up_plan(settings.max_batch)
        state["compiling"] = [{"steps": steps, "batch": size} for steps, size in plan]
        budget = {"spent": False, "first_done": False}

        def ready(why: str) -> None:
            if not state["ready"]:
                state["ready"] = True
                log.info("ready after %.2f s (%s)", time.perf_counter() - start, why)

        def budget_spent() -> None:
            budget["spent"] = True
            if budget["first_done"]:
                ready(f"warm-up budget of {settings.warm_up_budget_s:g} s spent; "
                      f"{len(state['compiling'])} variant(s) left to compile in the background")

        timer = asyncio.get_running_loop().call_later(settings.warm_up_budget_s, budget_spent)
        try:
            for steps, size in plan:
                while state["ready"] and self.batcher.busy():  # in the background: the requests first
                    await asyncio.sleep(0.05)
                try:
                    await model.call(runner.run_batch, [(None, "warm-up", i) for i in range(size)], steps)
                except Exception as e:
                    log.exception("warm-up of %d step(s) x %d image(s) failed", steps, size)
                    if not budget["first_done"]:  # not even the first variant runs: never ready
                        state["error"] = first_line(e)
                        return
                    state["failed"].append({"steps": steps, "batch": size})
                state["compiling"].pop(0)
                budget["first_done"] = True
                if budget["spent"]:
                    budget_spent()
            ready("warm-up done")
        finally:
            timer.cancel()

    async def readiness(self) -> tuple[int, dict]:
        state = self.state
        compiling = list(state["compiling"])
        if state["error"]:
            return 503, {"status": "warm-up failed", "error": state["error"]}
        if not state["ready"]:
            return 503, {"status": "warming up", "compiling": compiling}
        failed = {"failed": list(state["failed"])} if state["failed"] else {}
        return 200, {"status": "ready", "backend": self.runner.backend, "models": len(self.store.served) + 1,
                     "compiling": compiling, **failed}

    async def models(self) -> list[str]:
        return await self.model.call(self.store.scan)  # a concept added to the folder appears here

    async def _concept(self, model_id: str) -> str | None:
        if model_id == BASE:
            return None
        if not is_plain_name(model_id):  # refused before the file system is touched
            raise model_not_found(model_id)
        if model_id not in self.store.served and not await self.model.call(self.store.refresh, model_id):
            raise model_not_found(model_id)
        return model_id

    async def generate(self, asked: GenerationRequest) -> Generated:
        settings = self.settings
        if not self.state["ready"]:
            raise ApiError(503, "the server is still warming up", type_="server_error", code="not_ready",
                           headers={"Retry-After": str(settings.retry_after_s)})
        concept = await self._concept(asked.model)
        revised = self.runner.fit_prompt(concept, asked.prompt)
        batcher = self.batcher
        try:
            job = batcher.submit(concept, asked.prompt, asked.seed, asked.n, asked.steps)
        except QueueFull:
            raise queue_full(settings) from None
        try:
            images = await asyncio.wait_for(asyncio.shield(job.future), settings.timeout_s)
        except asyncio.TimeoutError:
            raise timed_out(settings) from None
        except OpadError as e:
            raise ApiError(422, str(e), code="invalid_value") from None
        finally:
            batcher.cancel(job)  # whatever has not started yet is not wanted any more
        encode_start = time.perf_counter()
        encoded = await asyncio.to_thread(lambda: [_png_b64(image) for image in images])
        stages = {"queue": job.started - job.enqueued, **job.timings, "encode": time.perf_counter() - encode_start}
        return Generated(encoded, revised, stages)


def model_not_found(model_id: str) -> ApiError:
    return ApiError(404, f"model {model_id!r} not found; GET /v1/models lists the concepts", param="model",
                    code="model_not_found")


def queue_full(settings: Settings) -> ApiError:
    return ApiError(503, f"the queue is full ({settings.queue} requests wait); retry shortly",
                    type_="server_error", code="queue_full", headers={"Retry-After": str(settings.retry_after_s)})


def timed_out(settings: Settings) -> ApiError:
    return ApiError(504, f"the images were not ready within {settings.timeout_s:g} s", type_="server_error",
                    code="timeout")


def create_app(runner: Runner, store: ConceptStore, settings: Settings, model: ModelThread) -> FastAPI:
    """The app over a runner and its concept store, both built on ``model`` (and only used there)."""
    metrics = Metrics(settings.max_batch)
    return app_over(LocalBackend(runner, store, settings, model, metrics), settings, metrics)


def app_over(backend, settings: Settings, metrics: Metrics) -> FastAPI:
    """Every route, key check, limit, error shape and metric, over a backend that generates: a
    :class:`LocalBackend`, or the Ray Serve replicas of :mod:`.replicas`. A backend has
    ``resolution``, ``steps`` and async ``start()``, ``stop()``, ``readiness() -> (status, body)``,
    ``models() -> ids`` and ``generate(GenerationRequest) -> Generated`` (raising :class:`ApiError`)."""
    size = f"{backend.resolution}x{backend.resolution}"
    page = page_files()
    public = {"/health", *page}  # answered without the key: the probe, and the page with its assets

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()
        yield
        await backend.stop()

    app = FastAPI(title="opad", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def keys_and_counts(request: Request, call_next):
        path = request.url.path
        route = path if path in ROUTES else route_label(path) or "other"
        if settings.api_key and path not in public:
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if not given:
                problem = "no API key given: send the header 'Authorization: Bearer KEY'"
            elif scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                      settings.api_key.encode()):
                problem = "the API key is not valid"
            else:
                problem = None
            if problem:
                response = _error(ApiError(401, problem, code="invalid_api_key",
                                           headers={"WWW-Authenticate": "Bearer"}), metrics)
                metrics.requests.labels(route, "401").inc()
                return response
        response = await call_next(request)
        metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return _error(ApiError(e.status_code, message, code="not_found" if e.status_code == 404 else None), metrics)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(ApiError(500, f"internal error: {type(e).__name__}", type_="server_error",
                               code="internal_error"), metrics)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    def _page_file(path: str) -> Response:
        content, media_type = page[path]
        return Response(content, media_type=media_type, headers=HEADERS)

    @app.get("/")
    async def index():
        return _page_file("/")

    @app.get("/page/{name}")
    async def asset(name: str):
        if f"/page/{name}" not in page:
            return _error(ApiError(404, f"no route GET /page/{name}", code="not_found"), metrics)
        return _page_file(f"/page/{name}")

    @app.get("/ready")
    async def ready():
        status, body = await backend.readiness()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        names = await backend.models()  # a concept added to the folder appears here
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "opad"}
                                           for name in names]}

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        arrived = time.perf_counter()
        try:
            body = parse_json(await _read_body(request, settings.max_body_bytes))
            asked = parse_generation(body, size=size, steps=backend.steps)
            made = await backend.generate(asked)
        except ApiError as e:
            return _error(e, metrics)
        except ClientDisconnect:  # the client's doing, not the server's: one line, counted as nginx's 499
            log.info("client disconnected while sending its request to %s", request.url.path)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        finished = time.perf_counter()
        for stage, seconds in made.stages.items():
            metrics.stage_seconds.labels(stage).observe(seconds)
        metrics.request_seconds.observe(finished - arrived)
        if made.replica is not None:  # made elsewhere (a Ray Serve replica): counted here, and by replica
            metrics.images.inc(len(made.images_b64))
            metrics.replica_images.labels(made.replica).inc(len(made.images_b64))
        revised = made.revised
        data = [{"b64_json": b64, **({"revised_prompt": revised} if revised else {})} for b64 in made.images_b64]
        headers = {"Server-Timing": ", ".join(f"{stage};dur={seconds * 1000:.2f}" for stage, seconds in made.stages.items()),
                   "X-Opad-Seed": str(asked.seed)}
        return JSONResponse({"created": int(time.time()), "data": data}, headers=headers)

    return app
