"""Noise schedules, denoiser wrappers, solvers and guidance, in the k-diffusion form.

x = x0 + sigma * eps ("VE" variables); a denoiser maps (x, sigma) to an x0 estimate. Every
solver is a pure function `sample(denoiser, x, sigmas, *, generator=None, callback=None) -> x`
registered by name in `SAMPLERS` (callback(i, sigma, x, denoised) once per step; see
`solvers.py`). A txt2img run that reproduces diffusers' scheduler of the same name:

    config = ScheduleConfig.from_diffusers_config(scheduler_config_json_dict)
    schedule = DiscreteSchedule.from_config(config)
    sigmas = make_sigmas(schedule, steps, sampler=name, timestep_spacing=config.timestep_spacing,
                         steps_offset=config.steps_offset, karras=config.use_karras_sigmas,
                         set_alpha_to_one=config.set_alpha_to_one)
    denoiser = Denoiser(unet, schedule, prediction_type=config.prediction_type)
    guided = CFGDenoiser(denoiser, cond={"context": text}, uncond={"context": empty}, scale=7.5)
    x = initial_latents(randn(shape, generator=generators), sigmas, sampler=name,
                        timestep_spacing=config.timestep_spacing)
    latents = final_latents(get_sampler(name)(guided, x, sigmas, generator=generators), sigmas)

img2img / inpaint: `sigmas = sigmas_for_strength(sigmas, strength, sampler=name)` and
`x = add_noise(image_latents, randn(...), sigmas[0])`.
"""
from __future__ import annotations

from typing import Callable

import torch

from .clip_guidance import CLIPGuidance
from .consistency import sample_lcm, sample_tcd
from .denoiser import Denoiser
from .guidance import CFGDenoiser, InpaintBlend
from .multistep import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_unipc
from .forward import add_noise, add_noise_at_timestep, prediction_target
from .noise import final_latents, init_noise_sigma, initial_latents, randn, sigmas_for_strength
from .schedules import (
    DiscreteSchedule,
    ScheduleConfig,
    make_betas,
    make_sigmas,
    rescale_zero_terminal_snr,
    sigmas_and_timesteps,
)
from .solvers import sample_ddim, sample_ddpm, sample_euler, sample_euler_a, sample_heun

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
    "tcd": sample_tcd,
}


# UNet calls per step where a solver makes more than one (its last step may make fewer); step caching
# (`unet.step_cache`) caches a step's calls together
CALLS_PER_STEP = {"heun": 2}


def calls_per_step(name: str) -> int:
    """Denoiser calls one step of sampler `name` makes (before its last step)."""
    get_sampler(name)
    return CALLS_PER_STEP.get(name, 1)


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The solver registered as `name`; ValueError listing the known names otherwise."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}") from None


__all__ = [
    "SAMPLERS", "get_sampler", "calls_per_step",
    "ScheduleConfig", "DiscreteSchedule", "make_betas", "rescale_zero_terminal_snr", "make_sigmas",
    "sigmas_and_timesteps", "Denoiser", "CFGDenoiser", "CLIPGuidance", "InpaintBlend",
    "randn", "init_noise_sigma", "initial_latents", "add_noise", "add_noise_at_timestep", "prediction_target",
    "sigmas_for_strength", "final_latents",
]
