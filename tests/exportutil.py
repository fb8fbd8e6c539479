"""Shared by the export, server and page tests: concepts of a preset's student, exports, what
``python -m opad.generate`` makes for a seed, and :class:`LiveServer` (the app over real HTTP)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from opad.export import export_onnx
from opad.export.server import launch
from opad.export.server.app import Settings, build_app
from PIL import Image

from opad.concept.folder import add_modifier_tokens, kv_parameters, load_concept, save_concept
from opad.diffusion.sampling import sample_student
from opad.generate import to_pil
from opad.models.loading import load_models

PROMPT = "a photo of <new1> dog"
KEY = "sk-test-key"


def make_concept(preset_dir, out_dir, seed, word="dog"):
    """A concept of a preset's student (``preset_dir/student``: the tiny one, or the mini world's) with
    perturbed K/V weights and its own token row, ``<new1>`` started from ``word``."""
    bundle = load_models(student=str(preset_dir / "student"), load_teacher=False)
    ids = add_modifier_tokens(bundle.tokenizer, bundle.text_encoder, ["<new1>"], [word])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in kv_parameters(bundle.student_unet):
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.8)
        rows = bundle.text_encoder.get_input_embeddings().weight
        rows[ids[0]] += torch.randn(rows.shape[1], generator=g)
    save_concept(out_dir, bundle.student_unet, bundle.tokenizer, bundle.text_encoder, ["<new1>"])
    return Path(out_dir)


def export(tmp, student, concept=None, **options) -> Path:
    argv = ["--student", str(student), "--out", str(tmp), "--exporter", options.pop("exporter", "torchscript")]
    argv += ["--concept", str(concept)] if concept else []
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    assert export_onnx.main(argv) == 0
    return Path(tmp)


def generate(student, concept, seed, steps, prompt=PROMPT):
    """What ``python -m opad.generate`` writes for one seed: the float image and its uint8 pixels."""
    bundle = load_models(student=str(student), load_teacher=False)
    if concept:
        load_concept(concept, bundle.student_unet, bundle.tokenizer, bundle.text_encoder)
    image = sample_student(bundle, [prompt], steps=steps, generator=torch.Generator().manual_seed(seed))
    return image, np.asarray(to_pil(image)[0])


def micro_student(tiny_dir, out_dir) -> Path:
    """The tiny student with a still smaller UNet and VAE (one block each; the same diffusers classes):
    for tests that trace the denoise+decode graph many times with dynamo, whose cost is per module."""
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel

    out_dir = Path(out_dir)
    shutil.copytree(Path(tiny_dir) / "student", out_dir)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                block_out_channels=(8,), layers_per_block=1,
                                attention_head_dim=2, mid_block_type=None, cross_attention_dim=16, norm_num_groups=4,
                                use_linear_projection=True)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8, scaling_factor=0.18215,
                        mid_block_add_attention=False)
    for name, model in (("unet", unet), ("vae", vae)):
        shutil.rmtree(out_dir / name)
        model.save_pretrained(out_dir / name)
    return out_dir


class LiveServer:
    """The app under uvicorn in a thread, on a port of its own."""

    def __init__(self, make_runner, concepts: Path | None, settings: Settings) -> None:
        self.settings = settings  # as the server does: the runner built and used on one thread
        self.server = launch.ThreadedServer(build_app(make_runner, concepts, settings).app)
        self.port = self.server.port
        deadline = time.time() + 60
        while self.request("GET", "/ready")[0] != 200:
            assert time.time() < deadline, "the server never became ready"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: object = None, *, key: str | None = KEY,
                raw: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, object]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        sent = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        try:
            conn.request(method, path, body=data, headers=sent, encode_chunked="Transfer-Encoding" in sent)
            response = conn.getresponse()
            text = response.read()
        except (ConnectionError, OSError):
            return 0, {}, None
        finally:
            conn.close()
        head = {k.lower(): v for k, v in response.getheaders()}
        content = json.loads(text) if head.get("content-type", "").startswith("application/json") else text.decode()
        return response.status, head, content

    def images(self, model: str, seed: int, n: int = 1, prompt: str = PROMPT, **extra) -> list[np.ndarray]:
        status, _, body = self.request("POST", "/v1/images/generations",
                                       {"model": model, "prompt": prompt, "n": n, "seed": seed, **extra})
        assert status == 200, body
        return [decode(item["b64_json"]) for item in body["data"]]

    def metric(self, name: str) -> float:
        _, _, text = self.request("GET", "/metrics")
        return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))

    def stop(self) -> None:
        self.server.stop()


def decode(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))
