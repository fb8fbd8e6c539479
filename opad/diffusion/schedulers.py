"""SD 2.1's and SD-Turbo's schedulers, built in code (the tiny preset, the mini world and the
full-size writer save them into their pipeline folders)."""

from __future__ import annotations

from diffusers import DDIMScheduler, EulerDiscreteScheduler

# SD 2.1's beta schedule, shared by SD-Turbo.
_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def teacher_scheduler() -> DDIMScheduler:
    """SD 2.1's scheduler: DDIM, v-prediction."""
    return DDIMScheduler(
        **_BETAS,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )


def student_scheduler() -> EulerDiscreteScheduler:
    """SD-Turbo's scheduler: Euler, epsilon, trailing timestep spacing."""
    return EulerDiscreteScheduler(
        **_BETAS,
        interpolation_type="linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="trailing",
        use_karras_sigmas=False,
    )
