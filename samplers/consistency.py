"""Few-step samplers of consistency-distilled models: LCM (Luo et al. 2023) and TCD (Zheng et al. 2024).

Both walk the teacher's grid of `original_inference_steps` timesteps (`schedules.lcm_timesteps`)
and need, besides the sigmas, the integer timestep of every step; both are diffusers' LCMScheduler
and TCDScheduler in the VE form x = x0 + sigma * eps (a VP sample z is x / sqrt(1 + sigma^2)).
"""
from __future__ import annotations

from typing import Any

import torch

from .schedules import DiscreteSchedule, tcd_sigmas_s
from .solvers import Callback, Denoise, Generator, _check, _clamp, _noise_like, _s

SIGMA_DATA = 0.5  # the consistency parameterization's data scale (LCM, after Song et al. 2023)


def lcm_scalings(timestep: float, timestep_scaling: float) -> tuple[float, float]:
    """(c_skip, c_out) of LCM's boundary condition at a discrete timestep: f(z, t) = c_skip z + c_out x0,
    with c_skip -> 1 and c_out -> 0 as t -> 0, so the consistency function is the identity there."""
    scaled = timestep * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def consistency_options(sampler: str, schedule: DiscreteSchedule, sigmas: torch.Tensor, *,
                        timestep_scaling: float = 10.0, eta: float = 0.3) -> dict[str, Any]:
    """The keyword arguments `sample_lcm` / `sample_tcd` need beside `sigmas` (made by `make_sigmas`
    on `schedule`): LCM the integer timestep of each step, TCD the level each step jumps to."""
    timesteps = schedule.sigma_to_t(sigmas[:-1].cpu()).round()
    if sampler == "lcm":
        return {"timesteps": timesteps, "timestep_scaling": timestep_scaling}
    if sampler == "tcd":
        return {"sigmas_s": tcd_sigmas_s(schedule, timesteps, eta), "eta": eta}
    raise ValueError(f"{sampler!r} is not a consistency sampler; expected 'lcm' or 'tcd'")


@torch.no_grad()
def sample_lcm(denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
               callback: Callback = None, timesteps: torch.Tensor | None = None, timestep_scaling: float = 10.0,
               clip_denoised: float | None = None) -> torch.Tensor:
    """Multistep consistency sampling; = diffusers LCMScheduler.

    Each step maps x to the consistency function's estimate of x0 (the model's x0 estimate mixed
    with the VP sample by `lcm_scalings`), then, except on the last step, noises it afresh to the
    next sigma. timesteps (N,): the integer timestep of each step (sigmas[:-1]); required.
    """
    if timesteps is None or len(timesteps) != sigmas.numel() - 1:
        raise ValueError(f"sample_lcm needs timesteps, one per step ({sigmas.numel() - 1}), for its scalings")
    x, sigmas, dtype = _check(x, sigmas)
    n = sigmas.numel() - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = _clamp(denoiser(x, _s(sigma, x)), clip_denoised)
        c_skip, c_out = lcm_scalings(float(timesteps[i]), timestep_scaling)
        denoised = c_out * x0 + c_skip * x / (sigma**2 + 1) ** 0.5  # the VP sample z = x / sqrt(1 + sigma^2)
        if callback is not None:
            callback(i, sigma, x, denoised)
        x = denoised + sigma_next * _noise_like(x, generator) if i < n - 1 else denoised
    return x.to(dtype)


@torch.no_grad()
def sample_tcd(denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
               callback: Callback = None, sigmas_s: torch.Tensor | None = None, eta: float = 0.3,
               clip_denoised: float | None = None) -> torch.Tensor:
    """Trajectory consistency distillation's strategic stochastic sampling; = diffusers TCDScheduler.

    Each step jumps along the predicted trajectory to sigma_s, the level of timestep
    floor((1 - eta) t_next) (`schedules.tcd_sigmas_s`), then, for eta > 0 and except on the last
    step, adds fresh noise up to the next sigma. The last step ends at sigma_s of timestep 0, as
    diffusers does (sigmas[-1] must be that level; see `noise.final_latents`). sigmas_s (N,): required.
    clip_denoised is accepted and, as by diffusers' TCDScheduler step, not applied.
    """
    if sigmas_s is None or len(sigmas_s) != sigmas.numel() - 1:
        raise ValueError(f"sample_tcd needs sigmas_s, one per step ({sigmas.numel() - 1})")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta (TCD's gamma) must be in [0, 1], got {eta}")
    x, sigmas, dtype = _check(x, sigmas)
    sigmas_s = sigmas_s.to(sigmas)
    n = sigmas.numel() - 1
    for i in range(n):
        sigma, sigma_next, sigma_s = sigmas[i], sigmas[i + 1], sigmas_s[i]
        x0 = denoiser(x, _s(sigma, x))
        eps = (x - x0) / sigma
        if callback is not None:
            callback(i, sigma, x, x0)
        x = x0 + sigma_s * eps
        if eta > 0 and i < n - 1:
            x = x + (sigma_next**2 - sigma_s**2).clamp(min=0) ** 0.5 * _noise_like(x, generator)
    return x.to(dtype)
