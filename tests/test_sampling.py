"""Our student (1/2/4 steps) and teacher samplers give diffusers' StableDiffusionPipeline images."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from opad.diffusion.sampling import sample_student, sample_teacher


@pytest.fixture(scope="module")
def student_pipe(tiny_dir):
    return StableDiffusionPipeline.from_pretrained(tiny_dir / "student", local_files_only=True)


def _ours(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1234])
def test_student_matches_diffusers(bundle, student_pipe, steps, seed):
    prompt = "a photo of a dog on the beach"
    ref = student_pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    ours = _ours(sample_student(bundle, [prompt], steps=steps, generator=torch.Generator().manual_seed(seed)))
    assert ref.shape == ours.shape == (1, 64, 64, 3)
    assert np.abs(ref - ours).max() <= 1e-4
    assert ref.std() > 0.05  # a real image, not a constant


def test_student_steps_and_prompts_change_the_image(bundle):
    def img(prompt, steps):
        return sample_student(bundle, [prompt], steps=steps, generator=torch.Generator().manual_seed(5))

    base = img("a red backpack", 1)
    assert (base - img("a red backpack", 4)).abs().max() > 1e-3
    assert (base - img("a blue teapot in the snow", 1)).abs().max() > 1e-3


def test_student_rejects_unsupported_steps(bundle):
    with pytest.raises(ValueError, match="steps"):
        sample_student(bundle, ["a dog"], steps=3)


def test_teacher_matches_diffusers_with_guidance(bundle, tiny_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir / "teacher", local_files_only=True)
    prompt = "a cat in the snow"
    ref = pipe(prompt, num_inference_steps=6, guidance_scale=7.5, generator=torch.Generator().manual_seed(2), output_type="np").images
    ours = _ours(sample_teacher(bundle, [prompt], steps=6, guidance_scale=7.5, generator=torch.Generator().manual_seed(2)))
    assert np.abs(ref - ours).max() <= 1e-4


def test_a_seed_draws_the_same_noise_in_every_dtype(bundle, tiny_dir):
    """The noise is drawn in float32 and cast: torch 2.11 (the GPU image's) draws another stream for
    bfloat16 than for float32, so a seed's bf16 image would not be its fp32 image there."""
    from opad.export.runtime import seeded_noise

    from opad.diffusion.sampling import initial_noise
    from opad.models.loading import load_models

    half = load_models(student=str(tiny_dir / "student"), dtype=torch.bfloat16, load_teacher=False)
    want = initial_noise(bundle, 2, 64, torch.Generator().manual_seed(7))
    got = initial_noise(half, 2, 64, torch.Generator().manual_seed(7))
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
    shape = tuple(want.shape[1:])
    assert torch.equal(seeded_noise(shape, [7], torch.float16), seeded_noise(shape, [7], torch.float32).half())
