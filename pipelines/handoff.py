"""Base-to-refiner hand-off, diffusers' "ensemble of experts": the base model runs the noisy part of the
schedule (`denoising_end`) and returns its latents; the refiner's img2img takes them as they are and
runs the rest (`denoising_start`).

Both cut the same schedule at timestep round(T - f * T): the base keeps the steps at or above it, the
refiner those below, so with the same sampler and step count the refiner starts exactly where the base
stopped. Heun (two model calls per step) is cut as diffusers cuts its doubled timestep list: the base's
last step is only its Euler half, and the refiner repeats that whole step from the latents it got.
Latents cross in diffusers' space for the sampler (the Euler family's x = x0 + sigma * eps,
the VP samplers' x / sqrt(sigma^2 + 1)), so a latent made by diffusers' base also hands off here.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from latentloom.pipelines.arguments import check_float
from latentloom.samplers.schedules import VE_SAMPLERS

# samplers taking two model calls per step, whose cut diffusers places inside a step
SECOND_ORDER = ("heun",)


def check_fraction(value: Any, name: str, sampler: str) -> float:
    fraction = check_float(value, name, low=0.0, high=1.0)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{name} must be strictly between 0 and 1, got {fraction}")
    return fraction


def base_sampler_options(sampler: str, steps_after: int) -> dict[str, Any]:
    """What the base's sampler needs beyond its cut sigmas, with `steps_after` steps of the schedule left
    to the refiner: Heun ends on the first (Euler) half of its last step, as diffusers' Heun does when
    `denoising_end` stops it after an odd number of calls; UniPC lowers its order only near the
    schedule's real end."""
    if sampler in SECOND_ORDER:
        return {"euler_last": True}
    return {"steps_after": steps_after} if sampler == "unipc" else {}


def _timesteps(pipe, call, sigmas: torch.Tensor) -> torch.Tensor:
    """The model timestep of every step of `sigmas` (N,), as the sampler will pass them."""
    return pipe.discrete_schedule(call.schedule).sigma_to_t(sigmas[:-1])


def _cutoff(pipe, fraction: float) -> int:
    total = pipe.schedule.num_train_timesteps
    return int(round(total - fraction * total))


def cut_end(pipe, call, sigmas: torch.Tensor, denoising_end: float) -> torch.Tensor:
    """The base's part: the steps whose timestep is >= the cut, ending at the next step's sigma."""
    keep = int((_timesteps(pipe, call, sigmas) >= _cutoff(pipe, denoising_end)).sum())
    if keep < 1:
        raise ValueError(f"denoising_end={denoising_end} leaves no step of {len(sigmas) - 1}; raise it or the steps")
    return sigmas[: keep + 1]


def cut_start(pipe, call, sigmas: torch.Tensor, denoising_start: float) -> torch.Tensor:
    """The refiner's part: the steps whose timestep is below the cut (for Heun one more: diffusers keeps
    an odd count of its doubled timesteps, so the refiner redoes the step the base only half took)."""
    keep = int((_timesteps(pipe, call, sigmas) < _cutoff(pipe, denoising_start)).sum())
    if keep < 1:
        raise ValueError(f"denoising_start={denoising_start} leaves no step of {len(sigmas) - 1}; lower it or "
                         "raise the steps")
    if call.sampler in SECOND_ORDER:
        keep = min(keep + 1, len(sigmas) - 1)
    return sigmas[len(sigmas) - 1 - keep:]


def to_handoff(x: torch.Tensor, sigma: float, sampler: str) -> torch.Tensor:
    """Latents at `sigma` in diffusers' space for `sampler` (what the base returns)."""
    return x if sampler in VE_SAMPLERS else x / math.sqrt(sigma**2 + 1)


def from_handoff(latents: torch.Tensor, sigma: float, sampler: str) -> torch.Tensor:
    """The sampler's x at `sigma` from handed-off latents (what the refiner starts from)."""
    return latents if sampler in VE_SAMPLERS else latents * math.sqrt(sigma**2 + 1)


# txt2img arguments the refiner's img2img takes too (the rest, like height and width, are the base's alone)
_SHARED = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "guidance_rescale", "sampler",
           "karras_sigmas", "num_images_per_prompt", "prompt_2", "negative_prompt_2", "original_size",
           "crops_coords_top_left", "target_size", "negative_original_size", "negative_crops_coords_top_left",
           "negative_target_size", "aesthetic_score", "negative_aesthetic_score", "vae_tiling")


def generate_with_refiner(base, refiner, prompt, *, refiner_start: float = 0.8, seed: int | None = None,
                          output_type: str = "pil", progress: bool = True, **kwargs: Any):
    """Text to image through the hand-off: `base` runs the schedule down to `refiner_start`, `refiner`
    (its img2img) the rest. Returns the refiner's images with the base's recipes, which record the
    refiner and the cut, so `generate --from` remakes the image. `seed` (not a generator): each model
    draws its own noise from it, as two diffusers calls with generators of that seed do."""
    import secrets

    if "generator" in kwargs:
        raise ValueError("the hand-off takes seed=, not generator= (each model draws from its own generators)")
    if seed is None:
        seed = secrets.randbelow(2**31)
    first = base(prompt, **kwargs, seed=seed, denoising_end=refiner_start, output_type="latent", progress=progress)
    shared = {k: v for k, v in kwargs.items() if k in _SHARED}
    second = refiner.img2img(prompt, image=first.images, denoising_start=refiner_start, seed=seed,
                             output_type=output_type, progress=progress,
                             **{k: v for k, v in shared.items() if k != "prompt"})
    recipes = [{**{k: v for k, v in r.items() if k != "denoising_end"}, "refiner": refiner.name,
                "refiner_hash": refiner.model_hash(), "refiner_start": refiner_start} for r in first.recipes]
    from latentloom.pipelines.output import PipelineOutput

    return PipelineOutput(images=second.images, recipes=recipes)
