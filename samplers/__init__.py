"""Noise schedules, denoiser wrappers, solvers and guidance.

Solvers are pure functions `sample(denoiser, x, sigmas, *, generator=None, callback=None) -> x`
registered by name in `SAMPLERS`; see `solvers.py` for the callback contract.
"""
from __future__ import annotations

from typing import Callable

import torch

from .multistep import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_unipc
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
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The solver registered as `name`; ValueError listing the known names otherwise."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}") from None


__all__ = ["SAMPLERS", "get_sampler"]
