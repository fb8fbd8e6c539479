"""Diffusion: the schedule math (``schedule``: noising, x0 from eps / v, c(t), the samplers' steps),
sampling the teacher and the student (``sampling``), and SD 2.1's / SD-Turbo's schedulers
(``schedulers``). The schedule math is re-exported here: ``from opad import diffusion`` is the
documented API."""

from opad.diffusion.schedule import (
    add_noise,
    c_weight,
    ddim_sample,
    eps_from_v,
    guided_prediction,
    leading_timesteps,
    split_prediction,
    teacher_x0,
    trailing_timesteps,
    turbo_initial_latent,
    unet_prediction,
    velocity,
    x0_from_eps,
    x0_from_v,
)

__all__ = ['c_weight', 'add_noise', 'velocity', 'x0_from_eps', 'x0_from_v', 'eps_from_v', 'split_prediction', 'turbo_initial_latent', 'trailing_timesteps', 'leading_timesteps', 'ddim_sample', 'unet_prediction', 'guided_prediction', 'teacher_x0']
