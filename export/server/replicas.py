"""``opad serve --ray``: the model runners as a Ray Serve deployment of replicas, behind the same app.

The HTTP front is the app of :mod:`.app` (every route, key, limit, error shape and metric), run by
uvicorn in the ``opad serve`` process as without Ray; only its generation and model listing go
through a :class:`RayBackend` to a Ray Serve ``DeploymentHandle``. Each :class:`Replica` (a Ray
actor) builds its own runner on its own model thread, scans the shared concepts folder itself, and
holds its own dynamic batcher, so concurrent requests routed to one replica share batches there.
A replica warms up in its constructor: Ray Serve routes to it only once that returns.

A replica that dies (a crash, a killed process, a lost node) is replaced by Ray Serve; the requests
in flight on it answer 503 ``replica_unavailable`` with ``Retry-After``, and later ones go to the
replicas alive. Ray is imported only here, and this module only with ``--ray``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from opad.export.server.app import Generated, Settings, _png_b64, model_not_found, queue_full, timed_out
from opad.export.server.batcher import Batcher, ModelThread, QueueFull
from opad.export.server.concept_store import BASE, ConceptStore, is_plain_name
from opad.export.server.metrics import Metrics
from opad.export.server.request import ApiError, GenerationRequest

from opad.cache import forwarded_env
from opad.errors import OpadError, first_line

log = logging.getLogger("opad.serve")
APP = "opad"  # the Ray Serve application's name
RECHECK_S = 2.0  # a replica checks a served concept's files again after this long (a rewritten one reloads)


class Replica:
    """One runner + concept store + batcher (the Ray Serve deployment's class; plain Python here, made
    a deployment by :func:`start_replicas`). ``make_runner`` runs on the replica's model thread."""

    def __init__(self, make_runner, concepts: str | None, settings: Settings) -> None:
        from ray import serve

        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id if context else "local"
        self.settings = settings
        self.model = ModelThread()
        self.runner = self.model.run(make_runner)
        self.store = ConceptStore(concepts, self.runner)
        self.model.run(self.store.scan)
        self.checked: dict[str, float] = {}
        self.metrics = Metrics(settings.max_batch)  # the batcher's own; the front counts what is answered
        self.batcher: Batcher | None = None
        start, budget = time.perf_counter(), settings.warm_up_budget_s
        for i, (steps, size) in enumerate(self.runner.warm_up_plan(settings.max_batch)):
            if i and time.perf_counter() - start > budget:  # the rest compile on first use
                break
            self.model.run(self.runner.run_batch, [(None, "warm-up", j) for j in range(size)], steps)
        log.info("replica %s ready after %.2f s; models: %s", self.replica_id, time.perf_counter() - start,
                 ", ".join(self.store.names()))

    def describe(self) -> dict:
        return {"backend": self.runner.backend, "resolution": self.runner.resolution,
                "steps": list(self.runner.steps), "models": self.store.names()}

    async def models(self) -> list[str]:
        return await self.model.call(self.store.scan)

    async def _concept(self, name: str) -> str | None:
        if name == BASE:
            return None
        now = time.monotonic()
        if name not in self.store.served or now - self.checked.get(name, 0.0) > RECHECK_S:
            self.checked[name] = now  # the shared folder as it is now (another replica may have seen it first)
            if not await self.model.call(self.store.refresh, name):
                raise model_not_found(name)
        return name

    async def generate(self, model_id: str, prompt: str, seed: int, n: int, steps: int) -> dict:
        """The images as PNG base64 with their timings and this replica's id, or ``{"error": ...}``
        (an :class:`ApiError`'s fields) for the front to answer."""
        if self.batcher is None:  # started on the loop the replica's requests run on
            self.batcher = Batcher(self.runner, self.model, self.metrics, max_batch=self.settings.max_batch,
                                   window_s=self.settings.batch_window_ms / 1000, queue=self.settings.queue)
            self.batcher.start()
        try:
            concept = await self._concept(model_id)
            revised = self.runner.fit_prompt(concept, prompt)
            try:
                job = self.batcher.submit(concept, prompt, seed, n, steps)
            except QueueFull:
                raise queue_full(self.settings) from None
            try:
                images = await asyncio.shield(job.future)
            except OpadError as e:
                raise ApiError(422, str(e), code="invalid_value") from None
            finally:
                self.batcher.cancel(job)  # the front gave up (timeout, hang-up): drop what has not started
        except ApiError as e:
            return {"error": {"status": e.status, "message": e.message, "param": e.param, "code": e.code,
                              "type": e.type, "headers": e.headers}}
        encode_start = time.perf_counter()
        encoded = await asyncio.to_thread(lambda: [_png_b64(image) for image in images])
        stages = {"queue": job.started - job.enqueued, **job.timings, "encode": time.perf_counter() - encode_start}
        return {"b64": encoded, "revised": revised, "stages": stages, "replica": self.replica_id}


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise OpadError("--ray needs Ray Serve, which is not installed: pip install -e '.[ray]' "
                        "(or pip install 'ray[serve]')") from e
    try:
        from ray import serve
    except ImportError as e:
        raise OpadError(f"--ray needs Ray Serve ({first_line(e)}): pip install 'ray[serve]'") from e
    return ray, serve


def deployment_options(replicas: int | None, min_replicas: int | None, max_replicas: int | None,
                       settings: Settings, gpu: bool, upscale_delay_s: float = 30.0) -> dict:
    """Fixed ``replicas``, or autoscaling between the bounds on the requests each replica has (target:
    one full batch); a replica takes up to ``settings.queue`` requests and the handle queues as many."""
    env = forwarded_env()  # the preset, cache and hub mode of this process
    actor = {"num_gpus": 1} if gpu else {"num_cpus": 1}
    options = {"max_ongoing_requests": settings.queue, "max_queued_requests": settings.queue,
               "ray_actor_options": {**actor, **({"runtime_env": {"env_vars": env}} if env else {})},
               "health_check_period_s": 2, "graceful_shutdown_timeout_s": 5}
    if min_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                         "initial_replicas": min_replicas,
                                         "target_ongoing_requests": settings.max_batch,
                                         "upscale_delay_s": upscale_delay_s}
    else:
        options["num_replicas"] = replicas or 1
    return options


def start_replicas(address: str, make_runner, concepts: str | None, settings: Settings, *, replicas: int | None,
                   min_replicas: int | None, max_replicas: int | None, gpu_wanted: bool,
                   upscale_delay_s: float = 30.0) -> RayBackend:
    """Join the Ray cluster at ``address``, run the replicas (waiting until they are warm), and the
    backend over them."""
    ray, serve = _import_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise OpadError(f"--ray {address}: no Ray cluster to join ({first_line(e)}); start one with "
                            "'ray start --head' (see docs/cluster.md)") from e
    gpu = gpu_wanted and ray.cluster_resources().get("GPU", 0) >= 1
    options = deployment_options(replicas, min_replicas, max_replicas, settings, gpu, upscale_delay_s)
    serve.start(proxy_location="Disabled")  # the front is this process's uvicorn, not Serve's proxy
    deployment = serve.deployment(Replica, name="Replica").options(**options)
    log.info("starting the replicas on Ray (%s) ...", ", ".join(f"{k}={v}" for k, v in options.items()
                                                                    if k != "ray_actor_options"))
    replica_settings = dataclasses.replace(settings, api_key=None)  # the key stays with the front
    handle = serve.run(deployment.bind(make_runner, concepts, replica_settings), name=APP, route_prefix=None)
    info = handle.describe.remote().result()
    return RayBackend(handle, info, settings)


def _replicas_running() -> dict:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return {"status": "gone"}
    deployment = app.deployments["Replica"]
    return {"status": str(deployment.status.value if hasattr(deployment.status, "value") else deployment.status),
            "running": deployment.replica_states.get("RUNNING", 0)}


class RayBackend:
    """The :mod:`.app` backend over the replicas' handle."""

    def __init__(self, handle, info: dict, settings: Settings) -> None:
        self.handle, self.settings = handle, settings
        self.backend, self.resolution, self.steps = info["backend"], info["resolution"], tuple(info["steps"])
        self.known_models = list(info["models"])

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        from ray import serve

        try:
            await asyncio.to_thread(serve.delete, APP)  # the replicas end with the server
        except Exception:  # noqa: BLE001 - the cluster may be gone already
            log.warning("could not delete the Ray Serve application %r", APP)

    async def readiness(self) -> tuple[int, dict]:
        replicas = await asyncio.to_thread(_replicas_running)
        body = {"status": "ready", "backend": self.backend, "models": len(self.known_models), "compiling": [],
                "replicas": replicas}
        if not replicas.get("running"):
            return 503, {**body, "status": "no replica running"}
        return 200, body

    def _unavailable(self, e: Exception) -> ApiError:
        log.warning("a replica failed to answer: %s: %s", type(e).__name__, first_line(e))
        return ApiError(503, f"the replica serving this request is gone ({type(e).__name__}); retry shortly",
                        type_="server_error", code="replica_unavailable",
                        headers={"Retry-After": str(self.settings.retry_after_s)})

    async def _call(self, method: str, *args):
        import ray.exceptions
        from ray.serve.exceptions import BackPressureError

        response = getattr(self.handle, method).remote(*args)
        try:
            return await asyncio.wait_for(_await(response), self.settings.timeout_s)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
            response.cancel()
            raise timed_out(self.settings) from None
        except BackPressureError:
            raise queue_full(self.settings) from None
        except ray.exceptions.RayTaskError:  # the replica's own code raised: a bug, answered 500
            raise
        except (ray.exceptions.RayError, OSError) as e:  # the replica died, or is unreachable
            raise self._unavailable(e) from None
        except Exception as e:
            from ray.serve.exceptions import RayServeException

            if isinstance(e, RayServeException):
                raise self._unavailable(e) from None
            raise

    async def models(self) -> list[str]:
        names = await self._call("models")  # one replica rescans the shared folder
        self.known_models = names
        return names

    async def generate(self, asked: GenerationRequest) -> Generated:
        if asked.model != BASE and not is_plain_name(asked.model):  # refused before any replica is asked
            raise model_not_found(asked.model)
        out = await self._call("generate", asked.model, asked.prompt, asked.seed, asked.n, asked.steps)
        if "error" in out:
            error = out["error"]
            raise ApiError(error["status"], error["message"], param=error["param"], code=error["code"],
                           type_=error["type"], headers=error["headers"])
        return Generated(out["b64"], out["revised"], out["stages"], out["replica"])


async def _await(response):
    return await response
