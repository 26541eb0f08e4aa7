"""The discrete DDPM training objective: a noised batch at random timesteps, its eps / v targets,
and min-SNR weights. The forward process itself (x_t and the targets) is `samplers.forward`, the
one place that knows eps / v, shared with the samplers and the upscaler's noise augmentation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from latentloom.samplers.forward import add_noise_at_timestep, alpha_bar_at, prediction_target
from latentloom.training.config import PREDICTION_TYPES


def train_alphas_cumprod(
    *, num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float, rescale_zero_terminal_snr: bool
) -> torch.Tensor:
    """(T,) float64 cumulative alphas of the training schedule (the samplers' make_betas)."""
    from latentloom.samplers.schedules import make_betas, rescale_zero_terminal_snr as rescale

    betas = make_betas(beta_schedule, num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end)
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if rescale_zero_terminal_snr:
        betas = torch.as_tensor(rescale(betas), dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def min_snr_weight(snr: torch.Tensor, *, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, eq. 8), per prediction type.

    In x0 terms the weight is min(snr, gamma); an eps loss is snr times an x0 loss, and a
    v loss is (snr + 1) times, so those are divided out.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        # snr is 0 at a zero-terminal-SNR last step: weight 1 there (clipped/snr -> 1 as snr -> 0).
        return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))
    return clipped / (snr + 1.0)


@dataclass
class NoisedBatch:
    x_t: torch.Tensor  # (B, C, H, W)
    t: torch.Tensor  # (B,) int64
    target: torch.Tensor  # (B, C, H, W)
    snr: torch.Tensor  # (B,) float32


def add_noise(
    x0: torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    generator: torch.Generator,
    noise_offset: float = 0.0,
) -> NoisedBatch:
    """Draw t and eps (from ``generator``, on x0's device) and build x_t and the target.

    noise_offset adds a per-channel constant to eps (Guttenberg 2023, "Diffusion with
    offset noise") so the model can learn to change an image's mean brightness.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
    b = x0.shape[0]
    ac = alphas_cumprod.to(x0.device)
    t = torch.randint(0, ac.shape[0], (b,), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    if noise_offset > 0:
        # (B, C, 1, 1): one shift per channel of each image
        shift = torch.randn((b, x0.shape[1], *([1] * (x0.ndim - 2))), device=x0.device, dtype=x0.dtype, generator=generator)
        eps = eps + noise_offset * shift
    x_t = add_noise_at_timestep(x0, eps, ac, t)
    target = prediction_target(x0, eps, alpha_bar_at(ac, t, x0), prediction_type=prediction_type)
    snr = (ac[t] / (1.0 - ac[t])).float()
    return NoisedBatch(x_t=x_t, t=t, target=target, snr=snr)


def diffusion_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    generator: torch.Generator,
    min_snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    x0_weighting: bool = False,
) -> torch.Tensor:
    """Mean (weighted) MSE between ``predict(x_t, t)`` and the eps / v target.

    x0_weighting (v targets only): divide each sample's v loss by snr + 1, which makes it the error
    of the implied x0 (x0_hat - x0 = -sqrt(1 - alpha_bar) (v_hat - v)): every noise level counts
    the same, where a plain v loss weights nearly clean steps up to ~1000x more than pure-noise ones.
    For an upscaler those pure-noise steps are where it must read the image from its condition.
    """
    if x0_weighting and (prediction_type != "v_prediction" or min_snr_gamma is not None):
        raise ValueError(f"x0_weighting needs prediction_type='v_prediction' and no min_snr_gamma, got "
                         f"prediction_type={prediction_type!r}, min_snr_gamma={min_snr_gamma!r}")
    batch = add_noise(
        x0, alphas_cumprod=alphas_cumprod, prediction_type=prediction_type, generator=generator, noise_offset=noise_offset
    )
    pred = predict(batch.x_t, batch.t)
    per_sample = (pred.float() - batch.target.float()).pow(2).flatten(1).mean(1)  # (B,)
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(batch.snr, gamma=min_snr_gamma, prediction_type=prediction_type)
    if x0_weighting:
        per_sample = per_sample / (batch.snr + 1.0)
    return per_sample.mean()
