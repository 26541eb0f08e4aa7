"""The one place that knows what the network predicts: model output -> x0 estimate.

Karras et al. 2022 (EDM) preconditioning for a VP-trained discrete-time model seen in
VE space: D(x, sigma) = c_skip * x + c_out * F(c_in * x, t(sigma)), with
c_in = 1 / sqrt(sigma^2 + 1) (which turns x = x0 + sigma * eps back into the VP sample the
model was trained on) and c_skip / c_out set by the prediction type.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .schedules import PREDICTION_TYPES, DiscreteSchedule


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dims in all, to broadcast over a sample."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def sigma_batch(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Sigma as a (B,) tensor on x's device and dtype."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma


class Denoiser:
    """Wrap `model(x_in, t, **cond) -> prediction` as `denoiser(x, sigma, **cond) -> x0`.

    prediction_type: "epsilon", "v_prediction" or "sample". cond kwargs (context,
    context_mask, class_labels, ...) go to the model untouched, except `concat`: a tensor
    (B, C', H, W) concatenated along channels to the scaled input after c_in (inpainting's
    mask + masked latents, the upscaler's low-res image), as diffusers does.
    """

    def __init__(self, model: Callable[..., torch.Tensor], schedule: DiscreteSchedule, *, prediction_type: str):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} not in {PREDICTION_TYPES}")
        if not isinstance(schedule, DiscreteSchedule):
            raise TypeError(f"schedule must be a DiscreteSchedule, got {type(schedule).__name__}")
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type

    def predict(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        """The raw network output (eps, v or x0) at (x, sigma)."""
        sigma = sigma_batch(sigma, x)  # (B,)
        # divide (not multiply by the reciprocal) to round exactly as diffusers' scale_model_input
        x_in = x / append_dims((sigma**2 + 1) ** 0.5, x.ndim)
        concat = cond.pop("concat", None)
        if concat is not None:
            if concat.shape[0] != x.shape[0] or concat.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"concat must match the latents' batch and spatial size {(x.shape[0], '*', *x.shape[2:])}, "
                    f"got {tuple(concat.shape)}"
                )
            x_in = torch.cat([x_in, concat.to(x_in.dtype)], dim=1)
        t = self.schedule.sigma_to_t(sigma)  # (B,)
        return self.model(x_in, t, **cond)

    def to_x0(self, x: torch.Tensor, sigma: torch.Tensor | float, output: torch.Tensor) -> torch.Tensor:
        """x0 estimate from a network output at (x, sigma)."""
        sigma = append_dims(sigma_batch(sigma, x), x.ndim)
        if self.prediction_type == "epsilon":
            return x - sigma * output
        if self.prediction_type == "v_prediction":
            # c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1)
            return output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        return output

    def from_x0(self, x: torch.Tensor, sigma: torch.Tensor | float, x0: torch.Tensor) -> torch.Tensor:
        """The network output that would give x0 at (x, sigma) (inverse of `to_x0`; sigma > 0 for eps)."""
        sigma = append_dims(sigma_batch(sigma, x), x.ndim)
        if self.prediction_type == "epsilon":
            return (x - x0) / sigma
        if self.prediction_type == "v_prediction":
            return (x / (sigma**2 + 1) - x0) * ((sigma**2 + 1) ** 0.5 / sigma)
        return x0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        return self.to_x0(x, sigma, self.predict(x, sigma, **cond))
