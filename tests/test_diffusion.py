"""The diffusion formulas against diffusers' schedulers."""

import pytest
import torch
from diffusers import DDIMScheduler

from opad.diffusion import schedule as D
from opad.diffusion.schedulers import student_scheduler, teacher_scheduler


def _batch(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, 5, 7, generator=g)
    pred = torch.randn(n, 4, 5, 7, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return z, pred, t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_matches_ddim_pred_original_sample(prediction_type):
    sched = DDIMScheduler.from_config(teacher_scheduler().config, prediction_type=prediction_type)
    sched.set_timesteps(50)
    z, pred, _ = _batch(1)
    ac = sched.alphas_cumprod
    for t in (int(sched.timesteps[0]), int(sched.timesteps[17]), int(sched.timesteps[-1])):
        ref = sched.step(pred, t, z).pred_original_sample
        ours = D.x0_from_v(z, pred, t, ac) if prediction_type == "v_prediction" else D.x0_from_eps(z, pred, t, ac)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(D.split_prediction(pred, z, t, ac, prediction_type)[0], ours)


def test_x0_from_eps_matches_euler_pred_original_sample():
    # Euler works on the unscaled sample x = z_t / sqrt(alpha_bar); its x0 must equal ours on z_t.
    sched = student_scheduler()
    z, eps, _ = _batch(2)
    for steps in (1, 2, 4):
        sched.set_timesteps(steps)
        for i, t in enumerate(sched.timesteps):
            sched._step_index = i
            t_int = int(t)
            x = z / sched.alphas_cumprod[t_int].sqrt()
            ref = sched.step(eps, t, x).pred_original_sample
            torch.testing.assert_close(D.x0_from_eps(z, eps, t_int, sched.alphas_cumprod), ref, rtol=1e-4, atol=1e-4)


def test_eps_from_v_inverts_the_v_definition():
    ac = teacher_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    t = torch.tensor([10, 870])
    a = ac[t].view(-1, 1, 1, 1)
    z = D.add_noise(x0, eps, t, ac)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(D.eps_from_v(z, v, t, ac), eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(D.x0_from_v(z, v, t, ac), x0, rtol=1e-4, atol=1e-4)


def test_add_noise_matches_scheduler_with_per_sample_timesteps():
    sched = teacher_scheduler()
    x0, noise, t = _batch(4, n=5)
    torch.testing.assert_close(D.add_noise(x0, noise, t, sched.alphas_cumprod), sched.add_noise(x0, noise, t))


def test_velocity_matches_scheduler_get_velocity():
    sched = teacher_scheduler()
    x0, noise, t = _batch(8, n=4)
    torch.testing.assert_close(D.velocity(x0, noise, t, sched.alphas_cumprod), sched.get_velocity(x0, noise, t))


def test_c_weight_is_alpha_bar_per_sample():
    ac = teacher_scheduler().alphas_cumprod
    t = torch.tensor([0, 499, 999])
    assert torch.equal(D.c_weight(t, ac), ac[t])
    assert D.c_weight(t, ac)[0] > D.c_weight(t, ac)[2]


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 50])
def test_timesteps_match_schedulers(steps):
    euler = student_scheduler()
    euler.set_timesteps(steps)
    assert D.trailing_timesteps(steps) == [int(t) for t in euler.timesteps]
    ddim = teacher_scheduler()
    ddim.set_timesteps(steps)
    assert D.leading_timesteps(steps) == [int(t) for t in ddim.timesteps]


def test_turbo_timesteps_are_the_sd_turbo_convention():
    assert D.trailing_timesteps(1) == [999]
    assert D.trailing_timesteps(2) == [999, 499]
    assert D.trailing_timesteps(4) == [999, 749, 499, 249]
    with pytest.raises(ValueError):
        D.trailing_timesteps(0)


def test_unknown_prediction_type_is_rejected():
    z, pred, t = _batch(5)
    with pytest.raises(ValueError, match="sample"):
        D.split_prediction(pred, z, t, teacher_scheduler().alphas_cumprod, "sample")


def test_teacher_x0_applies_guidance_on_one_batched_call():
    # A linear stand-in UNet: CFG on its prediction must equal u + s (c - u) done by hand.
    class Linear(torch.nn.Module):
        def forward(self, z, t, encoder_hidden_states):
            out = z * 0.3 + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
            return type("Out", (), {"sample": out})

    ac = teacher_scheduler().alphas_cumprod
    z, _, t = _batch(6, n=2)
    g = torch.Generator().manual_seed(7)
    cond, uncond = torch.randn(2, 7, 5, generator=g), torch.randn(1, 7, 5, generator=g)
    unet = Linear()
    u = unet(z, t, uncond.expand(2, -1, -1)).sample
    c = unet(z, t, cond).sample
    expected = D.x0_from_v(z, u + 7.5 * (c - u), t, ac)
    torch.testing.assert_close(D.teacher_x0(unet, z, t, cond, uncond, ac, "v_prediction", 7.5), expected)
