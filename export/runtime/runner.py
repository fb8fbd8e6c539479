"""One inference runner over the split graphs (DESIGN.md §5), with interchangeable backends.

``Runner(backend).generate(prompt, concept, seed, steps, batch)`` returns uint8 images
(B, H, W, 3), image i drawn from seed + i exactly as ``python -m opad.generate`` draws it;
``run_batch([(concept, prompt, seed), ...], steps)`` makes images of any concepts and prompts in
one denoise+decode call (the server's batches).
Every backend runs the same split: the conditioning (token embeddings -> every cross-attention
layer's K/V) once per (concept, prompt), cached, and one concept-agnostic denoise+decode for all
concepts.

- ``eager``: the PyTorch graphs (:mod:`opad.export.graphs`) on the student and each concept's
  weights, read once and never applied to the shared models. Equal to ``opad.generate``.
- ``compiled``: ``eager`` with the denoise+decode graph through ``torch.compile`` (inductor; on a
  GPU ``max-autotune`` with CUDA graphs, channels-last, the half precision given as ``dtype``), one
  compiled variant per (steps, batch padded to a power of two), each its own dynamo region with its
  own recompile limit; a variant that would fall back to eager raises instead. Within one level of
  255 of ``eager``.
- ``onnxruntime``: the files of ``python export/export_onnx.py``, one export folder per concept
  (their denoise+decode graphs are interchangeable; the first folder's is used for all). Within
  1e-3 of ``opad.generate`` on the float image, i.e. at most 1 of 255 after rounding. An export of
  a lora or unet concept bakes it into its denoise+decode graph and runs alone.
- ``tensorrt``: the engines of ``python export/build_trt.py`` on ``device`` (cuda:N) -- the
  conditioning engine refitted per concept with every K/V weight (the refit map), batches cut to the
  engines' profile, the denoise+decode engine replayed as a CUDA graph per (steps, run size), a few
  kept (:mod:`opad.export.trt_runner`). **Unverified**: TensorRT cannot be installed where opad is
  developed; without it (or a GPU) this backend raises one clear error.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from opad.export.batch_plan import batch_chunks, compiled_batch, take_rows
from opad.export.graphs import DenoiseDecodeGraph, encode_token_embeddings, token_embedding_table
from opad.export.sidecar import check_matches, folder_hashes, read_sidecar
from torch import Tensor

from opad.concept.folder import kv_parameters, read_concept
from opad.devices import pick_device, pick_dtype
from opad.diffusion.sampling import STUDENT_STEPS
from opad.errors import OpadError
from opad.kernels.kv_proj import kv_project
from opad.models.attention import cross_attention_layers
from opad.models.loading import load_models

BACKENDS = ("eager", "compiled", "onnxruntime", "tensorrt")
KV_CACHE_SIZE = 256  # (concept, prompt) pairs whose K/V stay cached
# compilations allowed per compiled (steps, batch) variant: its one, and one spare for a guard that
# changes after a first call; past it torch.compile raises (fullgraph) instead of running eager
RECOMPILE_LIMIT = 2
# torch.compile's own region per call site came with torch 2.14 (isolate_recompiles); before it (the
# GPU image's torch 2.11) every variant shares the code object's limit, which _recompile_limit lifts
ISOLATED_RECOMPILES = "isolate_recompiles" in inspect.signature(torch.compile).parameters
# variants compiled in this process: without isolated regions they all share DenoiseDecodeGraph.forward's
# cache, whichever runner made them
_variants_made = 0


def seeded_noise(shape: tuple[int, ...], seeds: list[int], dtype: torch.dtype) -> Tensor:
    """One latent per seed, drawn as ``opad.diffusion.sampling.initial_noise`` draws it (CPU generator, float32,
    then cast)."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s), dtype=torch.float32)
                      for s in seeds]).to(dtype)


def _token_ids(tokenizer, prompt: str) -> np.ndarray:
    return tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="np").input_ids


Item = tuple  # (concept, prompt, seed): one image of a batch


def _concat(parts: list) -> object:
    return torch.cat(parts) if isinstance(parts[0], Tensor) else np.concatenate(parts)


class Runner:
    """Images from the student with any of its concepts, on one backend (see the module docstring).

    ``concepts`` maps a name to a concept folder (eager) and, for ``onnxruntime``, optionally to
    the concept each export folder must have been made from (checked against its sidecar);
    ``onnx`` maps names to export folders (``None`` is the base student).

    ``torch_conditioning=True`` computes the conditioning (a) in PyTorch from the concept folders
    whatever the backend, which then runs only the concept-agnostic denoise+decode (b): one export
    (of the base student) serves every concept, and concepts can be added while running
    (:meth:`add_concept`). The server runs this way.
    """

    def __init__(self, backend: str = "eager", *, student: str | None = None,
                 concepts: Mapping[str, str] | None = None, onnx: Mapping[str | None, str] | None = None,
                 engines: str | None = None, device: str = "auto", dtype: str = "auto",
                 torch_conditioning: bool = False, compile_backend: str | Callable = "inductor",
                 compile_mode: str | None = None) -> None:
        if backend not in BACKENDS:
            raise OpadError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        self.backend = backend
        self._kv_cache: OrderedDict[tuple[str | None, str], list] = OrderedDict()  # least recently used first
        concepts = dict(concepts or {})
        split = torch_conditioning and backend in ("onnxruntime", "tensorrt")
        if backend == "eager":
            self._impl = _Eager(student, concepts, device, dtype)
        elif backend == "compiled":
            self._impl = _Compiled(student, concepts, device, dtype, backend=compile_backend, mode=compile_mode)
        elif backend == "tensorrt":
            if not engines:
                raise OpadError("the tensorrt backend needs the engines folder of export/build_trt.py (engines=DIR)")
            from opad.export.trt_runner import TensorRTBackend  # tensorrt itself is optional

            self._impl = TensorRTBackend(engines, {} if split else concepts, pick_device(device))
        else:
            if not onnx:
                raise OpadError("the onnxruntime backend needs export folders (onnx={name: folder})")
            self._impl = _OnnxRuntime(dict(onnx), {} if split else concepts, dtype)
        self._cond = self._impl
        if split:  # (a) in PyTorch beside the backend's (b), on the device the backend's inputs live on
            cond_device = str(self._impl.device) if backend == "tensorrt" else "cpu"
            self._cond = _Eager(student, concepts, cond_device, "float32")
            self._cond.check_denoiser(self._impl)

    @property
    def concepts(self) -> list[str | None]:
        return list(self._cond.concepts)

    @property
    def resolution(self) -> int:
        return self._impl.resolution

    @property
    def steps(self) -> tuple[int, ...]:
        """The step counts this runner has a denoise+decode graph (or engine) for."""
        return self._impl.steps

    def warm_up_batches(self, max_batch: int) -> list[int]:
        """Batch sizes worth running once before serving: every shape the compiled backend compiles
        for batches up to ``max_batch``; one image for the others."""
        if isinstance(self._impl, _Compiled):
            return sorted({compiled_batch(n) for n in range(1, max_batch + 1)})
        return [1]

    def warm_up_plan(self, max_batch: int) -> list[tuple[int, int]]:
        """(steps, images) to run once before serving, in the order to run them: every step count at
        every batch shape :meth:`warm_up_batches` names, the fewest steps (the default) first."""
        return [(steps, size) for steps in sorted(self.steps) for size in self.warm_up_batches(max_batch)]

    def add_concept(self, name: str, folder: str) -> None:
        """Read (and check) a concept folder and serve it as ``name``, replacing one of that name."""
        if not isinstance(self._cond, _Eager):
            raise OpadError("concepts can be added only while the conditioning runs in PyTorch "
                            "(backend eager or compiled, or torch_conditioning=True)")
        self._cond.add_concept(name, folder)
        self._drop_cached(name)

    def remove_concept(self, name: str) -> None:
        if isinstance(self._cond, _Eager):
            self._cond.concepts.pop(name, None)
        self._drop_cached(name)

    def _drop_cached(self, name: str | None) -> None:
        for key in [k for k in self._kv_cache if k[0] == name]:
            del self._kv_cache[key]

    def fit_prompt(self, concept: str | None, prompt: str) -> str | None:
        """The prompt as the text encoder will see it when it is over its token limit (else None)."""
        tokenizer = self._cond.concepts[concept][0]
        tokens = tokenizer(prompt, truncation=False, return_offsets_mapping=True, verbose=False)
        limit = tokenizer.model_max_length
        if len(tokens.input_ids) <= limit:
            return None
        return prompt[:tokens.offset_mapping[limit - 2][1]]  # up to the last token kept before the end token

    def generate(self, prompt: str, concept: str | None = None, seed: int = 0, steps: int = 1,
                 batch: int = 1) -> np.ndarray:
        if batch < 1:
            raise OpadError(f"batch must be at least 1, got {batch}")
        return self.run_batch([(concept, prompt, seed + i) for i in range(batch)], steps)[0]

    def run_batch(self, items: list[Item], steps: int) -> tuple[np.ndarray, dict[str, float]]:
        """One denoise+decode call for images of any concepts and prompts, ``(concept, prompt, seed)``
        each; returns the uint8 images in order and the seconds per stage: ``conditioning``, then
        ``denoise`` and ``decode`` (eager) or ``denoise_decode`` (the backends that run them as one graph)."""
        for concept, _, _ in items:
            if concept not in self._cond.concepts:
                known = ", ".join(repr(c) for c in self._cond.concepts)
                raise OpadError(f"unknown concept {concept!r}; this runner has {known}")
        if steps not in STUDENT_STEPS:
            raise OpadError(f"steps must be one of {STUDENT_STEPS}, got {steps}")
        if not items:
            raise OpadError("a batch needs at least one image")
        start = time.perf_counter()
        kvs = [self._conditioning(concept, prompt) for concept, prompt, _ in items]
        batched = [_concat([kv[j] for kv in kvs]) for j in range(len(kvs[0]))]
        conditioned = time.perf_counter()
        images, stages = self._impl.denoise_decode(batched, [seed for _, _, seed in items], steps)
        return images, {"conditioning": conditioned - start, **stages}

    def _conditioning(self, concept: str | None, prompt: str) -> list:
        key = (concept, prompt)
        if key in self._kv_cache:
            self._kv_cache.move_to_end(key)
        else:  # once per (concept, prompt), the oldest dropped past KV_CACHE_SIZE
            self._kv_cache[key] = self._cond.conditioning(concept, prompt)
            if len(self._kv_cache) > KV_CACHE_SIZE:
                self._kv_cache.popitem(last=False)
        return self._kv_cache[key]


class _Eager:
    def __init__(self, student: str | None, concepts: dict[str, str], device: str, dtype: str) -> None:
        dev = pick_device(device)
        self.bundle = load_models(student=student, device=dev, dtype=pick_dtype(dtype, dev), load_teacher=False)
        b = self.bundle
        self.heads = [m.heads for m in cross_attention_layers(b.student_unet).values() for _ in (0, 1)]
        base_table = token_embedding_table(b.text_encoder).detach().clone()
        base_kv = [w.detach().clone() for w in kv_parameters(b.student_unet)]
        self.concepts: dict[str | None, tuple] = {None: (b.tokenizer, base_table, base_kv)}
        for name, folder in concepts.items():
            self.add_concept(name, folder)
        self.graphs: dict[int, DenoiseDecodeGraph] = {}
        self.resolution = b.default_resolution
        self.steps = STUDENT_STEPS
        latent = b.default_resolution // b.vae_scale_factor
        self.latent_shape = (b.student_unet.config.in_channels, latent, latent)

    def add_concept(self, name: str, folder: str) -> None:
        b = self.bundle
        c = read_concept(folder, b.student_unet, b.tokenizer, b.text_encoder)
        base_tokenizer, base_table, base_kv = self.concepts[None]
        tokenizer = copy.deepcopy(base_tokenizer)
        tokenizer.add_tokens(c.tokens)
        table = torch.cat([base_table, torch.stack([r.to(base_table) for r in c.rows])])
        self.concepts[name] = (tokenizer, table, [w.to(base_kv[0]) for w in c.kv])

    def check_denoiser(self, denoiser) -> None:
        """Refuse a backend's denoise+decode made from another student than this conditioning's."""
        made_from = denoiser.student_hashes
        source = Path(self.bundle.student_source)
        if made_from and source.is_dir() and folder_hashes(source) != made_from:
            raise OpadError(f"the export was made from another student than {source}; export this student "
                            "(export/export_onnx.py --student ...)")
        if denoiser.denoiser_concept != "base":
            raise OpadError(f"the export bakes concept {denoiser.denoiser_concept!r} into its denoise graph, so it "
                            "cannot serve other concepts; export the base student (export/export_onnx.py without "
                            "--concept) to serve concepts")
        if denoiser.resolution != self.resolution:
            raise OpadError(f"the export is for {denoiser.resolution} px but the student's native size is "
                            f"{self.resolution} px")

    @torch.no_grad()
    def conditioning(self, concept: str | None, prompt: str) -> list[Tensor]:
        tokenizer, table, kv_weights = self.concepts[concept]
        ids = torch.from_numpy(_token_ids(tokenizer, prompt)).to(table.device)
        context = encode_token_embeddings(self.bundle.text_encoder, table[ids])
        return kv_project(context.to(self.bundle.dtype), kv_weights, self.heads)

    def graph(self, steps: int):
        if steps not in self.graphs:
            self.graphs[steps] = DenoiseDecodeGraph(self.bundle, steps).eval()
        return self.graphs[steps]

    @torch.no_grad()
    def denoise_decode(self, kv: list[Tensor], seeds: list[int], steps: int) -> tuple[np.ndarray, dict[str, float]]:
        noise = seeded_noise(self.latent_shape, seeds, self.bundle.dtype).to(self.bundle.device)
        return self.run_graph(self.graph(steps), noise, kv)

    def run_graph(self, graph, noise: Tensor, kv: list[Tensor]) -> tuple[np.ndarray, dict[str, float]]:
        """Denoise and decode timed apart (synchronised on a GPU, so each stage's time is its own)."""
        start = time.perf_counter()
        z0 = graph.denoise(noise, *kv)
        _synchronize(z0.device)
        denoised = time.perf_counter()
        images = graph.decode(z0)[0].cpu().numpy()
        return images, {"denoise": denoised - start, "decode": time.perf_counter() - denoised}


class _Compiled(_Eager):
    """The eager split with the denoise+decode graph compiled per step count and batch size (shapes
    are static, as CUDA graphs want).

    Every ``DenoiseDecodeGraph`` shares one ``forward`` code object, and dynamo counts compilations
    per code object (8 by default, ``torch._dynamo.config.recompile_limit``): through one compiled
    module the 9th of the 12 (steps x batch) variants would silently run eager. So each variant is
    its own ``torch.compile`` region (``isolate_recompiles``) with its own limit, and ``fullgraph``
    makes going past it (or a graph break) an error instead of a fall back (before torch 2.14, which
    has no such regions, the shared limit is lifted to cover every variant while one runs; see
    :func:`_recompile_limit`). ``backend`` is
    torch.compile's (inductor; the tests count compilations with their own)."""

    def __init__(self, *args, backend: str | Callable = "inductor", mode: str | None = None) -> None:
        super().__init__(*args)
        self.backend = backend
        self.mode = mode  # inductor's mode; None: max-autotune (CUDA graphs, autotuned kernels) on a GPU
        self.variants: dict[tuple[int, int], Callable] = {}  # (steps, batch) -> its compiled graph
        self.cuda = self.bundle.device.type == "cuda"
        if self.cuda:  # cuDNN's fast convolution layout
            self.bundle.student_unet.to(memory_format=torch.channels_last)
            self.bundle.vae.to(memory_format=torch.channels_last)

    def variant(self, steps: int, batch: int) -> Callable:
        """The compiled denoise+decode graph of ``steps`` for batches of exactly ``batch``."""
        key = (steps, batch)
        if key not in self.variants:
            mode = self.mode or ("max-autotune" if self.cuda else "default")
            options = {"mode": mode} if self.backend == "inductor" else {}
            if ISOLATED_RECOMPILES:
                options.update(isolate_recompiles=True, recompile_limit=RECOMPILE_LIMIT)
            self.variants[key] = torch.compile(super().graph(steps), backend=self.backend, dynamic=False,
                                               fullgraph=True, **options)
            global _variants_made
            _variants_made += 1
        return self.variants[key]

    def graph(self, steps: int):
        """The ``steps`` graph as one callable: each batch size runs its own compiled variant."""
        def run(noise: Tensor, *kv: Tensor) -> tuple[Tensor, Tensor]:
            from torch._dynamo.exc import FailOnRecompileLimitHit

            compiled = self.variant(steps, noise.shape[0])
            limit, context = _recompile_limit()
            try:
                with context:
                    return compiled(noise, *kv)
            except FailOnRecompileLimitHit as e:
                allowed = f"{limit}" if ISOLATED_RECOMPILES else f"the {limit} all variants share"
                raise OpadError(f"the compiled {steps}-step graph for batch {noise.shape[0]} needed more than "
                                f"{allowed} compilations (a guard keeps failing; TORCH_LOGS=recompiles says which); "
                                "refusing to run it uncompiled") from e
        return run

    def denoise_decode(self, kv: list[Tensor], seeds: list[int], steps: int) -> tuple[np.ndarray, dict[str, float]]:
        """Batches padded to a power of two (the last image repeated, then dropped): a server's
        batches of 1..N images compile log2(N) + 1 shapes, not N."""
        n = len(seeds)
        size = compiled_batch(n)
        if size != n:
            kv = [take_rows(t, 0, n, size) for t in kv]
            seeds = seeds + [seeds[-1]] * (size - n)
        images, stages = super().denoise_decode(kv, seeds, steps)
        return images[:n], stages

    def run_graph(self, graph, noise: Tensor, kv: list[Tensor]) -> tuple[np.ndarray, dict[str, float]]:
        start = time.perf_counter()  # one compiled graph: denoise and decode are not apart
        images = graph(noise, *kv)[0].cpu().numpy()
        return images, {"denoise_decode": time.perf_counter() - start}


def _recompile_limit() -> tuple[int, contextlib.AbstractContextManager]:
    """The compilations a variant may use, and the context its call runs in.

    With isolated regions each variant has RECOMPILE_LIMIT of its own. Without (torch < 2.14) they
    share the code object's limit: while a variant runs it is RECOMPILE_LIMIT for each variant made
    in this process (never below the global setting), and passing it raises instead of falling back
    to eager."""
    if ISOLATED_RECOMPILES:
        return RECOMPILE_LIMIT, contextlib.nullcontext()
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    limit = max(getattr(config, name), RECOMPILE_LIMIT * _variants_made)
    patch = {name: limit}
    if hasattr(config, "fail_on_recompile_limit_hit"):
        patch["fail_on_recompile_limit_hit"] = True
    return limit, config.patch(**patch)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _baked(record: dict) -> str:
    """The concept an export's denoise+decode graph holds (a lora/unet one), or "base"."""
    return record.get("denoiser_concept") or "base"


class _OnnxRuntime:
    def __init__(self, folders: dict[str | None, str], concepts: dict[str, str], dtype: str) -> None:
        import onnxruntime as ort
        from transformers import CLIPTokenizer

        precision = {"auto": None, "float32": "fp32", "float16": "fp16"}.get(dtype, "?")
        if precision == "?":
            raise OpadError(f"the onnxruntime backend runs exports in float32 or float16, not {dtype!r}")
        self.records = {}
        for name, folder in folders.items():
            record = read_sidecar(folder)
            check_matches(record, folder, concept_dir=concepts.get(name), precision=precision)
            self.records[name] = record
        first_name = next(iter(folders))
        first = self.records[first_name]
        baked = [name for name, record in self.records.items() if _baked(record) != "base"]
        if baked and len(folders) > 1:
            fmt = self.records[baked[0]].get("concept_format")
            raise OpadError(f"export {folders[baked[0]]} bakes its {fmt} concept into its denoise graph, so it "
                            "serves that concept alone; run it as the only export")
        self.denoiser_concept = _baked(first)
        for name, record in self.records.items():  # one denoise+decode graph serves them all
            for field in ("student_hashes", "precision", "resolution", "shapes", "batch"):
                if record[field] != first[field]:
                    raise OpadError(f"export {folders[name]} differs from {folders[first_name]} in {field}; "
                                    "export every concept from the same student with the same options")
        providers = ["CPUExecutionProvider"]
        self.concepts = {}
        for name, folder in folders.items():
            path = Path(folder)
            self.concepts[name] = (CLIPTokenizer.from_pretrained(path / "tokenizer"),
                                   np.load(path / "token_embeddings.npy"),
                                   ort.InferenceSession(str(path / "conditioning.onnx"), providers=providers))
        self.first, self.folder = first, Path(folders[first_name])
        self.sessions: dict[int, object] = {}
        self.dtype = np.float16 if first["precision"] == "fp16" else np.float32
        self.batch = tuple(first["batch"])
        self.resolution, self.steps = first["resolution"], tuple(first["steps"])
        self.student_hashes = first.get("student_hashes", {})

    def conditioning(self, concept: str | None, prompt: str) -> list[np.ndarray]:
        tokenizer, table, session = self.concepts[concept]
        embeds = take_rows(table[_token_ids(tokenizer, prompt)].astype(self.dtype), 0, 1, self.batch[0])
        return [k[:1] for k in session.run(None, {"token_embeds": embeds})]

    def denoise_decode(self, kv: list[np.ndarray], seeds: list[int], steps: int) -> tuple[np.ndarray, dict[str, float]]:
        start = time.perf_counter()  # graph (b) runs both in one session
        images = self._denoise_decode(kv, seeds, steps)
        return images, {"denoise_decode": time.perf_counter() - start}

    def _denoise_decode(self, kv: list[np.ndarray], seeds: list[int], steps: int) -> np.ndarray:
        import onnxruntime as ort

        if steps not in self.first["steps"]:
            raise OpadError(f"{self.folder} has no {steps}-step graph (exported: {self.first['steps']}); "
                            f"export with --steps {steps}")
        if steps not in self.sessions:
            name = self.first["files"][f"denoise_decode_{steps}step"]
            self.sessions[steps] = ort.InferenceSession(str(self.folder / name), providers=["CPUExecutionProvider"])
        torch_dtype = torch.float16 if self.dtype == np.float16 else torch.float32
        noise = seeded_noise(tuple(self.first["shapes"]["noise"]), seeds, torch_dtype).numpy()
        kv = [(t.cpu().numpy() if isinstance(t, Tensor) else t).astype(self.dtype, copy=False) for t in kv]
        images = []
        for start, n, size in batch_chunks(len(seeds), *self.batch):  # calls the graph's batch dimension takes
            feeds = {"noise": take_rows(noise, start, n, size)}
            feeds.update({name: np.ascontiguousarray(take_rows(t, start, n, size))
                          for name, t in zip(self.first["kv_names"], kv)})
            images.append(self.sessions[steps].run(["image"], feeds)[0][:n])
        return np.concatenate(images)
