"""The forward process: clean samples noised to a level, and what a network learns to predict there.

Two views of one process (Ho et al. 2020; Karras et al. 2022, "EDM", sec. 2):
- discrete timestep t (training, and the upscaler's noise augmentation):
  x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, with ab_t the schedule's cumulative alphas;
- noise level sigma (the samplers): x = x0 + sigma eps, sigma = sqrt((1 - ab) / ab), x = x_t / sqrt(ab).
The network predicts eps, v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022, "Progressive
distillation", sec. 4) or x0 itself; `Denoiser` (denoiser.py) turns a prediction back into x0.
"""
from __future__ import annotations

import torch

from .denoiser import append_dims, sigma_batch
from .schedules import PREDICTION_TYPES


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x0 noised to level sigma, x = x0 + sigma * noise (img2img / inpaint start; any sampler)."""
    return x0 + append_dims(sigma_batch(sigma, x0), x0.ndim) * noise


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """ab_t in `like`'s dtype and device: a scalar for an int t, (B, 1, ...) for a (B,) tensor of t."""
    ab = alphas_cumprod.to(like.device)[t].to(like.dtype)
    return ab.view(-1, *([1] * (like.ndim - 1))) if ab.ndim else ab


def add_noise_at_timestep(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                          t: torch.Tensor | int) -> torch.Tensor:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise: the DDPM forward process (diffusers' `add_noise`)."""
    ab = alpha_bar_at(alphas_cumprod, t, x0)
    return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise


def prediction_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, *,
                      prediction_type: str) -> torch.Tensor:
    """What a network with `prediction_type` should output at x_t (alpha_bar as from `alpha_bar_at`)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noise - (1.0 - alpha_bar).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type {prediction_type!r} not in {PREDICTION_TYPES}")
