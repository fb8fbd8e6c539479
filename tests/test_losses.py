"""MS-SWD and the adversarial losses, on fresh random inputs of awkward shapes."""

import pytest
import torch

from opad.train import losses


def _imgs(seed, shape=(3, 3, 37, 29)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g), torch.rand(shape, generator=g)


def test_ms_swd_is_zero_for_identical_images():
    x, _ = _imgs(0)
    d = losses.ms_swd(x, x.clone(), generator=torch.Generator().manual_seed(1))
    assert d.shape == (3,)
    assert torch.allclose(d, torch.zeros(3), atol=1e-5)


def test_ms_swd_is_positive_and_symmetric():
    x, y = _imgs(2)
    d_xy = losses.ms_swd(x, y, generator=torch.Generator().manual_seed(3))
    d_yx = losses.ms_swd(y, x, generator=torch.Generator().manual_seed(3))
    assert (d_xy > 0.1).all()
    torch.testing.assert_close(d_xy, d_yx)


def test_ms_swd_is_invariant_to_pixel_permutation_at_scale_0_with_patch_1():
    x, _ = _imgs(4, (2, 3, 13, 11))
    perm = torch.randperm(13 * 11, generator=torch.Generator().manual_seed(5))
    y = x.flatten(2)[:, :, perm].view_as(x)
    d = losses.ms_swd(x, y, num_scales=1, patch_size=1, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(d, torch.zeros(2), atol=1e-4)
    # with larger patches the spatial arrangement matters again
    assert (losses.ms_swd(x, y, num_scales=1, patch_size=3, generator=torch.Generator().manual_seed(6)) > 1).all()


def test_ms_swd_is_deterministic_given_the_generator_and_leaves_global_rng_alone():
    x, y = _imgs(7)
    state = torch.get_rng_state()
    a = losses.ms_swd(x, y, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), state)
    b = losses.ms_swd(x, y, generator=torch.Generator().manual_seed(8))
    c = losses.ms_swd(x, y, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_explicit_projections_replace_the_draw():
    x, y = _imgs(10, (2, 3, 21, 19))
    g = torch.Generator().manual_seed(11)
    proj = [losses.random_projections(16, 3, 5, g) for _ in range(3)]
    assert all(torch.allclose(p.flatten(1).norm(dim=1), torch.ones(16)) for p in proj)
    a = losses.ms_swd(x, y, num_scales=3, num_projections=16, patch_size=5, projections=proj)
    g = torch.Generator().manual_seed(11)
    b = losses.ms_swd(x, y, num_scales=3, num_projections=16, patch_size=5, generator=g)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="3 projection tensors for 5 scales"):
        losses.ms_swd(x, y, num_scales=5, projections=proj)


def test_ms_swd_gradients_are_finite_even_on_black_and_white():
    x = torch.zeros(1, 3, 16, 16)
    x[..., 8:, :] = 1
    x.requires_grad_(True)
    y = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(12))
    losses.ms_swd(x, y, generator=torch.Generator().manual_seed(13)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_srgb_to_lab_reference_colours():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).view(3, 3, 1, 1)
    lab = losses.srgb_to_lab(rgb).view(3, 3)
    torch.testing.assert_close(lab[0], torch.tensor([100.0, 0.0, 0.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(lab[1], torch.tensor([0.0, 0.0, 0.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(lab[2], torch.tensor([53.24, 80.09, 67.20]), atol=0.1, rtol=0)


def test_gan_losses():
    real, fake = torch.tensor([[2.0], [3.0]]), torch.tensor([[-1.0], [0.5]])
    torch.testing.assert_close(losses.generator_loss(fake), torch.nn.functional.softplus(-fake.flatten()))
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = 0.5 * (bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake)))
    torch.testing.assert_close(losses.discriminator_loss(real, fake), expected)
    torch.testing.assert_close(losses.generator_loss(fake, "hinge"), -fake.flatten())
    torch.testing.assert_close(losses.discriminator_loss(real, fake, "hinge"), 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()))
