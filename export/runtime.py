"""One inference runner over the split graphs (DESIGN.md §5), with interchangeable backends.

``Runner(backend).generate(prompt, concept, seed, steps, batch)`` returns uint8 images
(B, H, W, 3), image i drawn from seed + i exactly as ``python -m opad.generate`` draws it.
Every backend runs the same split: the conditioning (token embeddings -> every cross-attention
layer's K/V) once per (concept, prompt), cached, and one concept-agnostic denoise+decode for all
concepts.

- ``eager``: the PyTorch graphs (:mod:`opad.export.graphs`) on the student and each concept's
  weights, read once and never applied to the shared models. Equal to ``opad.generate``.
- ``compiled``: ``eager`` with the denoise+decode graph through ``torch.compile`` (inductor; on a
  GPU ``max-autotune`` with CUDA graphs, channels-last, the half precision given as ``dtype``).
  Within one level of 255 of ``eager``.
- ``onnxruntime``: the files of ``python export/export_onnx.py``, one export folder per concept
  (their denoise+decode graphs are interchangeable; the first folder's is used for all). Within
  ``TOLERANCE`` of ``opad.generate`` on the float image, i.e. at most 1 of 255 after rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from opad.errors import OpadError
from opad.export.graphs import DenoiseDecodeGraph, encode_token_embeddings, token_embedding_table
from opad.export.sidecar import check_matches, read_sidecar
from opad.kernels.kv_proj import kv_project
from opad.models.attention import cross_attention_layers
from opad.models.concept import kv_parameters, read_concept
from opad.models.loading import load_models
from opad.runtime import pick_device, pick_dtype
from opad.sampling import STUDENT_STEPS

BACKENDS = ("eager", "compiled", "onnxruntime")
TOLERANCE = 1e-3  # onnxruntime vs eager, max abs on the float image in [0, 1] (fp32)


def seeded_noise(shape: tuple[int, ...], seeds: list[int], dtype: torch.dtype) -> Tensor:
    """One latent per seed, drawn as ``opad.sampling.initial_noise`` draws it (CPU generator)."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s), dtype=dtype)
                      for s in seeds])


def _token_ids(tokenizer, prompt: str) -> np.ndarray:
    return tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="np").input_ids


class Runner:
    """Images from the student with any of its concepts, on one backend (see the module docstring).

    ``concepts`` maps a name to a concept folder (eager) and, for ``onnxruntime``, optionally to
    the concept each export folder must have been made from (checked against its sidecar);
    ``onnx`` maps names to export folders (``None`` is the base student).
    """

    def __init__(self, backend: str = "eager", *, student: str | None = None,
                 concepts: Mapping[str, str] | None = None, onnx: Mapping[str | None, str] | None = None,
                 device: str = "auto", dtype: str = "auto") -> None:
        if backend not in BACKENDS:
            raise OpadError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        self.backend = backend
        self._kv_cache: dict[tuple[str | None, str], list] = {}
        if backend in ("eager", "compiled"):
            impl = _Eager if backend == "eager" else _Compiled
            self._impl = impl(student, dict(concepts or {}), device, dtype)
        else:
            if not onnx:
                raise OpadError("the onnxruntime backend needs export folders (onnx={name: folder})")
            self._impl = _OnnxRuntime(dict(onnx), dict(concepts or {}), dtype)

    @property
    def concepts(self) -> list[str | None]:
        return list(self._impl.concepts)

    def generate(self, prompt: str, concept: str | None = None, seed: int = 0, steps: int = 1,
                 batch: int = 1) -> np.ndarray:
        if concept not in self._impl.concepts:
            known = ", ".join(repr(c) for c in self._impl.concepts)
            raise OpadError(f"unknown concept {concept!r}; this runner has {known}")
        if steps not in STUDENT_STEPS:
            raise OpadError(f"steps must be one of {STUDENT_STEPS}, got {steps}")
        if batch < 1:
            raise OpadError(f"batch must be at least 1, got {batch}")
        key = (concept, prompt)
        if key not in self._kv_cache:  # once per (concept, prompt)
            self._kv_cache[key] = self._impl.conditioning(concept, prompt)
        return self._impl.denoise_decode(self._kv_cache[key], list(range(seed, seed + batch)), steps)


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
            c = read_concept(folder, b.student_unet, b.tokenizer, b.text_encoder)
            tokenizer = copy.deepcopy(b.tokenizer)
            tokenizer.add_tokens(c.tokens)
            table = torch.cat([base_table, torch.stack([r.to(base_table) for r in c.rows])])
            self.concepts[name] = (tokenizer, table, [w.to(base_kv[0]) for w in c.kv])
        self.graphs: dict[int, DenoiseDecodeGraph] = {}
        latent = b.default_resolution // b.vae_scale_factor
        self.latent_shape = (b.student_unet.config.in_channels, latent, latent)

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
    def denoise_decode(self, kv: list[Tensor], seeds: list[int], steps: int) -> np.ndarray:
        graph = self.graph(steps)
        noise = seeded_noise(self.latent_shape, seeds, self.bundle.dtype).to(self.bundle.device)
        batched = [t.expand(len(seeds), *t.shape[1:]) for t in kv]
        return graph(noise, *batched)[0].cpu().numpy()


class _Compiled(_Eager):
    """The eager split with the denoise+decode graph compiled once per step count (and batch size:
    shapes are static, as CUDA graphs want)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.cuda = self.bundle.device.type == "cuda"
        if self.cuda:  # cuDNN's fast convolution layout
            self.bundle.student_unet.to(memory_format=torch.channels_last)
            self.bundle.vae.to(memory_format=torch.channels_last)

    def graph(self, steps: int):
        if steps not in self.graphs:
            mode = "max-autotune" if self.cuda else "default"
            self.graphs[steps] = torch.compile(DenoiseDecodeGraph(self.bundle, steps).eval(), mode=mode, dynamic=False)
        return self.graphs[steps]


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

    def conditioning(self, concept: str | None, prompt: str) -> list[np.ndarray]:
        tokenizer, table, session = self.concepts[concept]
        embeds = table[_token_ids(tokenizer, prompt)].astype(self.dtype)
        if self.batch[0] > 1:
            embeds = np.repeat(embeds, self.batch[0], axis=0)
        return [k[:1] for k in session.run(None, {"token_embeds": embeds})]

    def denoise_decode(self, kv: list[np.ndarray], seeds: list[int], steps: int) -> np.ndarray:
        import onnxruntime as ort

        if steps not in self.first["steps"]:
            raise OpadError(f"{self.folder} has no {steps}-step graph (exported: {self.first['steps']}); "
                            f"export with --steps {steps}")
        if steps not in self.sessions:
            name = self.first["files"][f"denoise_decode_{steps}step"]
            self.sessions[steps] = ort.InferenceSession(str(self.folder / name), providers=["CPUExecutionProvider"])
        torch_dtype = torch.float16 if self.dtype == np.float16 else torch.float32
        noise = seeded_noise(tuple(self.first["shapes"]["noise"]), seeds, torch_dtype).numpy()
        lo, hi = self.batch
        images = []
        for start in range(0, len(seeds), hi):  # chunks the graph's batch dimension takes
            chunk = noise[start:start + hi]
            n = len(chunk)
            pad = max(lo - n, 0)  # a static (or minimum) batch larger than what is left: pad, then drop
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            feeds = {"noise": chunk}
            feeds.update({name: np.ascontiguousarray(np.broadcast_to(t, (len(chunk), *t.shape[1:])))
                          for name, t in zip(self.first["kv_names"], kv)})
            images.append(self.sessions[steps].run(["image"], feeds)[0][:n])
        return np.concatenate(images)
