"""Single-step solvers in the k-diffusion form: x = x0 + sigma * eps, denoiser(x, sigma) -> x0.

Every solver is `sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None, ...) -> x`:
  denoiser  callable (x (B, ...), sigma (B,)) -> x0 estimate, e.g. `Denoiser` or a guidance wrapper;
  x         the starting sample at sigmas[0] (`noise.initial_latents` or `noise.add_noise`);
  sigmas    (N + 1,) descending noise levels, usually ending in 0 (`schedules.make_sigmas`);
  generator torch.Generator, or one per sample (then a sample made in a batch equals the
            sample made alone); stochastic solvers draw their noise with `noise.randn`;
  callback  called once per step as callback(i, sigma, x, denoised): step index, the
            0-d sigma the model saw, the sample it saw and its x0 estimate (for progress
            bars and previews). Its return value is ignored.
Trajectories equal diffusers' schedulers of the same name (see tests/test_samplers_parity.py).
"""
from __future__ import annotations

from typing import Callable

import torch

from .noise import Generator, randn

Denoise = Callable[..., torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None


def _check(x: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """(x, sigmas) in the working dtype, and x's dtype to return in.

    Half-precision latents are walked in float32 (as diffusers' schedulers upcast): sigmas in
    bf16 would be off by ~0.4% and would no longer match the registered model timesteps.
    """
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries (start and end), got shape {tuple(sigmas.shape)}")
    dtype = x.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return x.to(work), sigmas.to(x.device, work), dtype


def _s(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 0-d sigma as (B,) for the denoiser (exact: no arithmetic on the value)."""
    return sigma.expand(x.shape[0])


def _clamp(denoised: torch.Tensor, limit: float | None) -> torch.Tensor:
    return denoised if limit is None else denoised.clamp(-limit, limit)


def _noise_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) of the DDPM posterior scaled by eta (Song et al. 2021 DDIM eq. 16, in VE form)."""
    sigma_up = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_up = torch.minimum(sigma_up, sigma_next)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


@torch.no_grad()
def sample_euler(denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                 callback: Callback = None) -> torch.Tensor:
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn); = diffusers EulerDiscreteScheduler."""
    x, sigmas, dtype = _check(x, sigmas)
    for i in range(sigmas.numel() - 1):
        denoised = denoiser(x, _s(sigmas[i], x))
        if callback is not None:
            callback(i, sigmas[i], x, denoised)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x.to(dtype)


@torch.no_grad()
def sample_euler_a(denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                   callback: Callback = None, eta: float = 1.0) -> torch.Tensor:
    """Ancestral Euler (k-diffusion `sample_euler_ancestral`); = diffusers EulerAncestralDiscreteScheduler at eta=1."""
    x, sigmas, dtype = _check(x, sigmas)
    for i in range(sigmas.numel() - 1):
        denoised = denoiser(x, _s(sigmas[i], x))
        if callback is not None:
            callback(i, sigmas[i], x, denoised)
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigma_down - sigmas[i])
        # diffusers draws at every step, the last included (where sigma_up is 0)
        x = x + _noise_like(x, generator) * sigma_up
    return x.to(dtype)


@torch.no_grad()
def sample_ddim(denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                callback: Callback = None, eta: float = 0.0, clip_denoised: float | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) with stochasticity eta, in VE form; = diffusers DDIMScheduler.

    clip_denoised: diffusers' clip_sample_range when clip_sample is on; the x0 estimate is
    clamped to it, while the step's noise estimate keeps the unclamped one, as diffusers does.
    """
    x, sigmas, dtype = _check(x, sigmas)
    for i in range(sigmas.numel() - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _s(sigma, x))
        eps = (x - denoised) / sigma
        denoised = _clamp(denoised, clip_denoised)
        if callback is not None:
            callback(i, sigma, x, denoised)
        if eta > 0:
            sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
            x = denoised + sigma_down * eps + sigma_up * _noise_like(x, generator)
        else:
            x = denoised + sigma_next * eps
    return x.to(dtype)


@torch.no_grad()
def sample_ddpm(denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                callback: Callback = None, clip_denoised: float | None = None) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_s' | x_s, x0) (Ho et al. 2020, eq. 7); = diffusers DDPMScheduler.

    clip_denoised: clamp the x0 estimate to [-c, c] (diffusers' clip_sample / clip_sample_range)."""
    x, sigmas, dtype = _check(x, sigmas)
    for i in range(sigmas.numel() - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _clamp(denoiser(x, _s(sigma, x)), clip_denoised)
        if callback is not None:
            callback(i, sigma, x, denoised)
        # posterior mean x0 + (s'^2 / s^2)(x - x0), variance s'^2 (s^2 - s'^2) / s^2
        ratio = sigma_next**2 / sigma**2
        x = denoised + ratio * (x - denoised)
        # drawn on the last step too, where its variance is 0, so the generator ends in the state
        # diffusers leaves it in (it draws whenever t > 0, true for leading / trailing spacing)
        noise = _noise_like(x, generator)
        if sigma_next > 0:
            x = x + (sigma_next**2 * (1 - ratio)) ** 0.5 * noise
    return x.to(dtype)


@torch.no_grad()
def sample_heun(denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                callback: Callback = None, clip_denoised: float | None = None,
                euler_last: bool = False) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1), Euler on the last step to sigma 0; = diffusers HeunDiscreteScheduler.

    clip_denoised: clamp both x0 estimates to [-c, c] (diffusers' clip_sample / clip_sample_range).
    euler_last: the last step is Euler wherever it ends (diffusers' Heun stopped by `denoising_end`
    returns after the first half of a step)."""
    x, sigmas, dtype = _check(x, sigmas)
    steps = sigmas.numel() - 1
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _clamp(denoiser(x, _s(sigma, x)), clip_denoised)
        if callback is not None:
            callback(i, sigma, x, denoised)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0 or (euler_last and i == steps - 1):
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = (x_2 - _clamp(denoiser(x_2, _s(sigma_next, x)), clip_denoised)) / sigma_next
        x = x + (d + d_2) / 2 * dt
    return x.to(dtype)

