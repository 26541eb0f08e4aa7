"""Steps every pipeline shares: checking arguments, seeding, encoding prompts, the
denoising loop with guidance and a progress bar, and turning latents into images."""
from __future__ import annotations

import math
import numbers
import secrets
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from latentloom.pipelines.vae import decode_latents, images_to_numpy, numpy_to_pil
from latentloom.samplers import get_sampler
from latentloom.samplers.denoiser import Denoiser
from latentloom.samplers.guidance import CFGDenoiser

OUTPUT_TYPES = ("pil", "np", "latent")
MAX_PIXELS = 4096 * 4096  # beyond this a request is a mistake, not a wish


def check_prompt_list(prompt: Any, name: str = "prompt") -> list[str]:
    """A str or a non-empty list of str -> list[str]; TypeError/ValueError otherwise."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError(f"{name} is an empty list; pass at least one prompt")
        bad = [type(p).__name__ for p in prompt if not isinstance(p, str)]
        if bad:
            raise TypeError(f"every {name} must be a str; got {', '.join(bad)} in the list")
        return list(prompt)
    raise TypeError(f"{name} must be a str or a list of str, got {type(prompt).__name__}")


def check_negative(negative_prompt: Any, batch: int) -> list[str] | None:
    if negative_prompt is None:
        return None
    negatives = check_prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        return negatives * batch
    if len(negatives) != batch:
        raise ValueError(f"got {len(negatives)} negative prompts for {batch} prompts; pass one, or one per prompt")
    return negatives


def check_int(value: Any, name: str, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_float(value: Any, name: str, *, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def check_size(pipe, height: Any, width: Any) -> tuple[int, int]:
    """Image sizes must be positive multiples of the VAE factor (8 for Stable Diffusion)."""
    multiple = size_multiple(pipe)
    height = check_int(height, "height", low=1)
    width = check_int(width, "width", low=1)
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            lower = max(multiple, value - value % multiple)
            raise ValueError(
                f"{name} must be a multiple of {multiple} for this model, got {value} (try {lower} or {lower + multiple})"
            )
    if height * width > MAX_PIXELS:
        raise ValueError(f"{width}x{height} is larger than the {MAX_PIXELS} pixels latentloom accepts")
    return height, width


def size_multiple(pipe) -> int:
    """Pixels an image side must be a multiple of: one latent per VAE factor. (The UNet takes any
    latent size: its upsamplers follow the skip connections' sizes, as diffusers' do.)"""
    return pipe.vae_scale_factor


def make_generators(
    *, seed: Any, generator: Any, batch: int
) -> tuple[torch.Generator | list[torch.Generator], list[int | None]]:
    """The generator(s) for a batch and the seed each image can be re-made from.

    `seed=s` gives image i its own CPU generator seeded s + i, so image i equals the image
    made alone with seed s + i (and re-making it from its PNG metadata is exact).
    `generator` is used exactly as diffusers uses it (one generator for the batch, or a list,
    one per image). Neither: a fresh random seed, recorded in the metadata.
    """
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is not None:
        gens = generator if isinstance(generator, (list, tuple)) else [generator]
        for g in gens:
            if not isinstance(g, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(g).__name__}")
        if isinstance(generator, (list, tuple)) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images; pass one per image")
        return (list(generator) if isinstance(generator, (list, tuple)) else generator), [None] * batch
    if seed is None:
        seed = secrets.randbelow(2**31)
    seed = check_int(seed, "seed", low=0, high=2**63 - 1 - batch)
    seeds = [seed + i for i in range(batch)]
    return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds


class UNetCall:
    """The UNet as the Denoiser's model: casts inputs to the UNet's dtype and the output back,
    so the sampler's arithmetic stays in the latents' dtype (float32)."""

    def __init__(self, unet) -> None:
        self.unet = unet

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        cond = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in cond.items()}
        return self.unet(x.to(dtype), t, **cond).to(x.dtype)


def text_conditions(pipe, prompts: list[str], negatives: list[str] | None, *, guided: bool) -> tuple[dict, dict | None]:
    """Encode prompts (and negatives, when guidance needs them) into UNet keyword arguments."""
    encoder = pipe.text_encoder
    if guided:
        cond_emb, uncond_emb = encoder.encode_pair(prompts, negatives)
    else:
        cond_emb, uncond_emb = encoder.encode(prompts), None

    def as_kwargs(emb) -> dict:
        kwargs = {"context": emb.hidden.to(pipe.device)}
        if pipe.use_context_mask:
            kwargs["context_mask"] = emb.mask.to(pipe.device)
        return kwargs

    return as_kwargs(cond_emb), (as_kwargs(uncond_emb) if uncond_emb is not None else None)


def repeat_cond(cond: dict, repeats: int) -> dict:
    """Repeat each prompt's conditioning `repeats` times (num_images_per_prompt), prompt-major."""
    return {k: v.repeat_interleave(repeats, dim=0) for k, v in cond.items()}


def build_denoiser(pipe, *, cond: dict, uncond: dict | None, guidance_scale: float, guidance_rescale: float,
                   extra: dict | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The guided denoiser (x, sigma) -> x0 for this call. `extra` holds conditioning shared by
    both halves (concat channels, class labels)."""
    denoiser = Denoiser(UNetCall(pipe.unet), pipe.schedule, prediction_type=pipe.schedule_config.prediction_type)
    extra = extra or {}
    if uncond is None:
        return lambda x, sigma: denoiser(x, sigma, **cond, **extra)
    return CFGDenoiser(denoiser, cond={**cond, **extra}, uncond={**uncond, **extra},
                       scale=guidance_scale, rescale=guidance_rescale)


def run_sampler(name: str, denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator,
                callback: Callable | None, progress: bool) -> torch.Tensor:
    """Run solver `name` with a tqdm bar over its steps (off with progress=False)."""
    sample = get_sampler(name)
    bar = tqdm(total=len(sigmas) - 1, desc=f"latentloom {name}", disable=not progress, leave=False)

    def on_step(i, sigma, x_i, denoised):
        bar.update(1)
        if callback is not None:
            callback(i, sigma, x_i, denoised)

    try:
        return sample(denoiser, x, sigmas, generator=generator, callback=on_step)
    finally:
        bar.close()


def latents_to_output(pipe, latents: torch.Tensor, output_type: str):
    """Decode latents and format them as `output_type` ("pil", "np" or "latent")."""
    if output_type == "latent":
        return latents
    array = images_to_numpy(decode_latents(pipe.vae, latents))
    return array if output_type == "np" else numpy_to_pil(array)


def check_output_type(output_type: Any) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    return output_type
