"""Noise drawing and the start / end of a trajectory, arranged so diffusers' seeds carry over.

diffusers' VP-space schedulers (DDPM, DDIM, DPM-Solver, UniPC) start from x_T = noise
and hand the model x_T as is; its Euler family starts from noise * init_noise_sigma.
In latentloom's VE space a VP sample x_vp at sigma is x_vp * sqrt(sigma^2 + 1), so the
starting factor below turns the same `randn` draw into the same trajectory.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .schedules import SAMPLER_NAMES, TIMESTEP_SPACINGS, VE_SAMPLERS

Generator = torch.Generator | Sequence[torch.Generator] | None


def randn(
    shape: Sequence[int],
    *,
    generator: Generator = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise drawn exactly as `diffusers.utils.torch_utils.randn_tensor`.

    A list of generators draws sample i of the batch from generator i (so an image made in a
    batch equals the one made alone); a CPU generator draws on CPU, then moves to `device`.
    """
    shape = tuple(int(s) for s in shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    if isinstance(generator, (list, tuple)):
        if len(generator) not in (1, shape[0]):
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample (or one)")
        if len(generator) == 1:  # as diffusers: a list of one is one generator for the whole batch
            generator = generator[0]
    gens = generator if isinstance(generator, (list, tuple)) else [generator] if generator is not None else []
    if gens:
        gen_type = gens[0].device.type
        if gen_type != device.type:
            if gen_type != "cpu":
                raise ValueError(f"cannot draw a {device.type} tensor from a {gen_type} generator; use a cpu or {device.type} one")
            rand_device = torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        one = (1,) + shape[1:]
        draws = [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(draws, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def init_noise_sigma(sigmas: torch.Tensor, *, sampler: str, timestep_spacing: str = "leading") -> float:
    """Factor that turns unit noise into the first sample x = noise * factor for `sampler`.

    Euler family: diffusers' `init_noise_sigma` (sigma_max, or sqrt(sigma_max^2 + 1) with
    leading spacing). VP samplers: start at x_vp = noise, i.e. x = noise * sqrt(sigma_max^2 + 1).
    """
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLER_NAMES}")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing {timestep_spacing!r} not in {TIMESTEP_SPACINGS}")
    # float32 tensor arithmetic, as diffusers, so the starting sample is bit-identical
    sigma_max = sigmas.detach().to("cpu", torch.float32).max()
    if sampler in VE_SAMPLERS and timestep_spacing in ("linspace", "trailing"):
        return float(sigma_max)
    return float((sigma_max**2 + 1) ** 0.5)


def initial_latents(
    noise: torch.Tensor, sigmas: torch.Tensor, *, sampler: str, timestep_spacing: str = "leading"
) -> torch.Tensor:
    """The txt2img starting sample (noise * init_noise_sigma) for `sampler`, from `randn` noise."""
    factor = init_noise_sigma(sigmas, sampler=sampler, timestep_spacing=timestep_spacing)
    return noise * factor


def sigmas_for_strength(sigmas: torch.Tensor, strength: float, *, sampler: str) -> torch.Tensor:
    """The tail of `sigmas` that img2img with this strength walks (diffusers' `get_timesteps`).

    Keeps the last int(N * strength) steps. For heun diffusers' interleaved timesteps start at
    the same sigma, so the same tail applies; start from `add_noise(x0, noise, tail[0])`.
    """
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLER_NAMES}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    n = sigmas.numel() - 1
    init_steps = min(int(n * strength), n)
    if init_steps < 1:
        raise ValueError(
            f"strength {strength} with {n} steps leaves no denoising step; raise strength or num_inference_steps"
        )
    return sigmas[n - init_steps:]


def final_latents(x: torch.Tensor, sigmas: torch.Tensor, *, sampler: str | None = None) -> torch.Tensor:
    """The sampler's result in diffusers' latent space (what the VAE decodes).

    Identity when the schedule ends at sigma 0. A schedule ending above 0 ("ddim" with
    set_alpha_to_one=False, "tcd", a caller's sigmas list) leaves a VP sampler's result at
    x / sqrt(sigma_last^2 + 1), and the Euler family's (`sampler` in VE_SAMPLERS) at x, as diffusers does.
    """
    last = float(sigmas[-1])
    if last == 0.0 or sampler in VE_SAMPLERS:
        return x
    return x / math.sqrt(last**2 + 1)
