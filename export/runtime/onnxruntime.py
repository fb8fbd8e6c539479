"""The ``onnxruntime`` backend: the files of ``python export/export_onnx.py``, one export folder per
concept (their denoise+decode graphs are interchangeable; the first folder's is used for all), on
the CPU. Within 1e-3 of ``opad.generate`` on the float image, i.e. at most 1 of 255 after rounding.
An export of a lora or unet concept bakes it into its denoise+decode graph and runs alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from opad.export.exporter.sidecar import check_matches, read_sidecar
from opad.export.runtime.backend import Backend, baked_concept, seeded_noise, token_ids
from opad.export.runtime.batch_plan import batch_chunks, take_rows
from torch import Tensor

from opad.errors import OpadError


class OnnxRuntimeBackend(Backend):
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
        baked = [name for name, record in self.records.items() if baked_concept(record) != "base"]
        if baked and len(folders) > 1:
            fmt = self.records[baked[0]].get("concept_format")
            raise OpadError(f"export {folders[baked[0]]} bakes its {fmt} concept into its denoise graph, so it "
                            "serves that concept alone; run it as the only export")
        self.denoiser_concept = baked_concept(first)
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
        self.device = torch.device("cpu")  # its inputs are numpy arrays (or CPU tensors) on the host

    def conditioning(self, concept: str | None, prompt: str) -> list[np.ndarray]:
        tokenizer, table, session = self.concepts[concept]
        embeds = take_rows(table[token_ids(tokenizer, prompt)].astype(self.dtype), 0, 1, self.batch[0])
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
