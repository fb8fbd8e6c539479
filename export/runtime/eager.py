"""The ``eager`` backend: the PyTorch graphs (:mod:`opad.export.exporter.graphs`) on the student and
each concept's weights, read once and never applied to the shared models. Equal to ``opad.generate``.

It is also the PyTorch conditioning the Runner pairs with another backend's denoise+decode
(``torch_conditioning=True``), and the tokenizers and token tables of the ``tensorrt`` backend.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from opad.export.exporter.graphs import DenoiseDecodeGraph, encode_token_embeddings, token_embedding_table
from opad.export.exporter.sidecar import folder_hashes
from opad.export.runtime.backend import Backend, seeded_noise, token_ids
from torch import Tensor

from opad.concept.folder import kv_parameters, read_concept
from opad.devices import pick_device, pick_dtype
from opad.diffusion.sampling import STUDENT_STEPS
from opad.errors import OpadError
from opad.kernels.kv_proj import kv_project
from opad.models.attention import cross_attention_layers
from opad.models.loading import load_models


class EagerBackend(Backend):
    def __init__(self, student: str | None, concepts: dict[str, str], device: str, dtype: str) -> None:
        dev = pick_device(device)
        self.bundle = load_models(student=student, device=dev, dtype=pick_dtype(dtype, dev), load_teacher=False)
        b = self.bundle
        self.device = b.device
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

    def check_denoiser(self, denoiser: Backend) -> None:
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
        ids = torch.from_numpy(token_ids(tokenizer, prompt)).to(table.device)
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
