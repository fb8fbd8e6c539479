"""Shared by the export and server tests: concepts of the tiny student, exports, and what
``python -m opad.generate`` makes for a seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from opad.export import export_onnx

from opad.concept.folder import add_modifier_tokens, kv_parameters, load_concept, save_concept
from opad.diffusion.sampling import sample_student
from opad.generate import to_pil
from opad.models.loading import load_models

PROMPT = "a photo of <new1> dog"


def make_concept(tiny_dir, out_dir, seed):
    """A concept of a preset's student (tiny_dir: the preset folder) with perturbed K/V weights and its own token row."""
    bundle = load_models(student=str(tiny_dir / "student"), load_teacher=False)
    ids = add_modifier_tokens(bundle.tokenizer, bundle.text_encoder, ["<new1>"], ["dog"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in kv_parameters(bundle.student_unet):
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.8)
        bundle.text_encoder.get_input_embeddings().weight[ids[0]] += torch.randn(bundle.text_encoder.config.hidden_size, generator=g)
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
