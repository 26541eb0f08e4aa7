"""Checking a pipeline call's arguments before any work is done: prompts, numbers, sizes, seeds and
generators, the model's scheduler settings for the chosen sampler, and the shared `CallArgs`.

Errors name the bad value and what would be accepted."""
from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass
from typing import Any, Callable

import torch

from latentloom.samplers import get_sampler
from latentloom.samplers.schedules import TIMESTEP_SPACINGS, ScheduleConfig
from latentloom.unet.step_cache import check_cache_interval
from latentloom.unet.token_merge import check_token_merge_ratio
from latentloom.vae.codec import check_tiling

OUTPUT_TYPES = ("pil", "np", "latent")
MAX_PIXELS = 4096 * 4096  # beyond this a request is a mistake, not a wish


def check_prompt_list(prompt: Any, name: str = "prompt") -> list[str]:
    """A str or a non-empty list of str -> list[str]; TypeError/ValueError otherwise."""
    if isinstance(prompt, str):
        return [_check_text(prompt, name)]
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError(f"{name} is an empty list; pass at least one prompt")
        bad = [type(p).__name__ for p in prompt if not isinstance(p, str)]
        if bad:
            raise TypeError(f"every {name} must be a str; got {', '.join(bad)} in the list")
        return [_check_text(p, name) for p in prompt]
    raise TypeError(f"{name} must be a str or a list of str, got {type(prompt).__name__}")


def _check_text(prompt: str, name: str) -> str:
    """A str that is valid Unicode: a lone surrogate (e.g. from a bad decode) would fail deep in the
    tokenizer, or later when the recipe is written as UTF-8."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{name} is not valid Unicode ({err.reason} at position {err.start}): "
                         f"{prompt[max(0, err.start - 20):err.start + 20]!r}") from None
    return prompt


def check_bool(value: Any, name: str) -> bool:
    """True / False only: bool("no") is True, so strings and numbers are refused, not converted."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_callback(callback: Any) -> Callable | None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(i, sigma, x, denoised), got {type(callback).__name__}")
    return callback


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


def check_output_type(output_type: Any) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    return output_type


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


def check_unet_channels(pipe, *, expected: tuple[int, ...], task: str) -> int:
    """The UNet's input channels, or ValueError when this task cannot use such a UNet."""
    channels = int(pipe.unet.config.in_channels)
    if channels not in expected:
        raise ValueError(
            f"{task} needs a UNet with {' or '.join(map(str, expected))} input channels; this model's UNet has "
            f"{channels} (4 = text-to-image / img2img, 9 = SD-inpainting, 7 = x4 upscaler)"
        )
    return channels


TCD_ETA = 0.3  # TCD's default gamma (diffusers' TCDScheduler.step)


@dataclass
class CallArgs:
    """The checked arguments every pipeline call shares (`parse_call`)."""

    prompts: list[str]
    negatives: list[str] | None
    steps: int
    scale: float
    rescale: float
    sampler: str
    karras: bool
    per_prompt: int
    output_type: str
    generator: Any
    seeds: list[int | None]
    schedule: ScheduleConfig  # the model's, resolved for this sampler (`ScheduleConfig.for_sampler`)
    vae_tiling: bool | None = None  # None: decode_latents chooses by size
    prompts_2: list[str] | None = None  # SDXL's second text encoder (default: the prompts)
    negatives_2: list[str] | None = None
    micro: Any = None  # SDXL's micro-conditioning (`micro_conditioning.MicroConditioning`), set with the size
    eta: float | None = None  # TCD's gamma (stochasticity); None for other samplers
    timesteps: list[float] | None = None  # the caller's own schedule (diffusers' timesteps= / sigmas=)
    sigmas: list[float] | None = None
    # LCM-distilled UNets read the guidance scale through their guidance embedding: one UNet call per
    # step, no classifier-free guidance (diffusers' LCM semantics)
    guidance_embedded: bool = False
    cache_interval: int = 1  # step caching (DeepCache): the whole UNet every N sampler steps; 1 = exact
    step_cache: Any = None  # this call's `unet.step_cache.DeepCache`, made with its denoiser when N > 1
    token_merge_ratio: float = 0.0  # ToMe: self-attention at the top level on (1 - r) of the tokens; 0 = exact
    control: Any = None  # the call's ControlNets and control images (`control.Control`), or None

    @property
    def guidance_mode(self) -> str:
        """What the guidance scale did: "embedded" (into an LCM UNet), "cfg" (two branches per
        step), or "none" (guidance_scale <= 1: one UNet call per step)."""
        if self.guidance_embedded:
            return "embedded"
        return "cfg" if self.scale > 1.0 else "none"

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.per_prompt


def parse_call(pipe, prompt: Any, *, negative_prompt: Any, num_inference_steps: Any, guidance_scale: Any,
               guidance_rescale: Any, sampler: Any, karras_sigmas: Any, num_images_per_prompt: Any,
               output_type: Any, seed: Any, generator: Any, vae_tiling: Any = None,
               scheduler_config: Any = None, prompt_2: Any = None, negative_prompt_2: Any = None,
               eta: Any = None, timesteps: Any = None, sigmas: Any = None,
               timestep_spacing: Any = None, cache_interval: Any = None,
               token_merge_ratio: Any = None) -> CallArgs:
    """Check the shared arguments (None = the model's default) before any work is done."""
    d = pipe.defaults
    prompts = check_prompt_list(prompt)
    negatives = check_negative(negative_prompt, len(prompts))
    custom = check_custom_schedule(timesteps, sigmas)
    # timesteps are the steps; sigmas the whole ladder, its last entry where sampling ends (diffusers')
    custom_steps = None if custom is None else len(custom) - (1 if sigmas is not None else 0)
    if custom is not None and num_inference_steps is not None and num_inference_steps != custom_steps:
        raise ValueError(f"num_inference_steps={num_inference_steps} but the "
                         f"{'timesteps' if timesteps is not None else 'sigmas'} give {custom_steps} steps; leave it out")
    steps = check_int(custom_steps if custom is not None else
                      d.num_inference_steps if num_inference_steps is None else num_inference_steps,
                      "num_inference_steps", low=1, high=pipe.schedule.num_train_timesteps)
    scale = check_float(d.guidance_scale if guidance_scale is None else guidance_scale, "guidance_scale", low=0.0)
    rescale = check_float(guidance_rescale, "guidance_rescale", low=0.0, high=1.0)
    sampler = sampler or d.sampler
    get_sampler(sampler)
    schedule = call_schedule(pipe, sampler, scheduler_config, timestep_spacing=timestep_spacing)
    per_prompt = check_int(num_images_per_prompt, "num_images_per_prompt", low=1, high=64)
    output_type = check_output_type(output_type)
    karras = schedule.use_karras_sigmas if karras_sigmas is None else check_bool(karras_sigmas, "karras_sigmas")
    if custom is not None and karras:
        raise ValueError("karras_sigmas and a custom timesteps / sigmas list do not go together: the list is the "
                         "schedule")
    vae_tiling = check_tiling(vae_tiling)
    generator, seeds = make_generators(seed=seed, generator=generator, batch=len(prompts) * per_prompt)
    prompts_2 = negatives_2 = None
    if prompt_2 is not None or negative_prompt_2 is not None:
        if not hasattr(pipe.text_encoder, "encoder_2"):
            raise ValueError(f"prompt_2 / negative_prompt_2 are for SDXL's second text encoder; this model "
                             f"({pipe.name}) has one")
        if prompt_2 is not None:
            prompts_2 = check_prompt_list(prompt_2, "prompt_2")
            if len(prompts_2) != len(prompts):
                raise ValueError(f"got {len(prompts_2)} prompt_2 for {len(prompts)} prompts; pass one per prompt")
        if negative_prompt_2 is not None:
            negatives_2 = check_negative(negative_prompt_2, len(prompts))
    if eta is not None and sampler != "tcd":
        raise ValueError(f"eta (TCD's gamma) applies to sampler 'tcd', not {sampler!r}")
    if sampler == "tcd":
        eta = check_float(TCD_ETA if eta is None else eta, "eta", low=0.0, high=1.0)
    cache_interval = check_cache_interval(cache_interval)
    token_merge_ratio = check_token_merge_ratio(token_merge_ratio)
    embedded = bool(getattr(pipe.unet.config, "guidance_embedded", False))
    return CallArgs(prompts, negatives, steps, scale, rescale, sampler, karras, per_prompt, output_type,
                    generator, seeds, schedule, vae_tiling, prompts_2, negatives_2, eta=eta,
                    guidance_embedded=embedded, timesteps=None if timesteps is None else custom,
                    sigmas=None if sigmas is None else custom, cache_interval=cache_interval,
                    token_merge_ratio=token_merge_ratio)


def check_custom_schedule(timesteps: Any, sigmas: Any) -> list[float] | None:
    """A caller's timesteps or sigmas list as floats (their order and range are checked with the model)."""
    if timesteps is None and sigmas is None:
        return None
    if timesteps is not None and sigmas is not None:
        raise ValueError("give timesteps or sigmas, not both")
    name, values = ("timesteps", timesteps) if timesteps is not None else ("sigmas", sigmas)
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty list of numbers, got {values!r}")
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of numbers, got {values!r}") from None
    if name == "sigmas" and len(out) < 2:
        raise ValueError(f"sigmas is the whole ladder, from the first step's noise level down to where sampling ends "
                         f"(usually 0): at least 2 entries, got {values!r}")
    if name == "timesteps" and any(v != int(v) for v in out):
        raise ValueError(f"timesteps must be whole numbers (model timesteps), got {values!r}; fractional noise "
                         "levels go in sigmas=")
    return out


def call_schedule(pipe, sampler: str, scheduler_config: Any = None, *, timestep_spacing: Any = None) -> ScheduleConfig:
    """The model's schedule as diffusers' scheduler for `sampler` would run it (a key the model's
    scheduler_config.json leaves out takes that class's default), with the caller's
    `scheduler_config` settings (a dict of such keys, e.g. a recipe's) and `timestep_spacing` stated over it."""
    config = pipe.schedule_config
    if scheduler_config is not None and not isinstance(scheduler_config, dict):
        raise TypeError(f"scheduler_config must be a dict of scheduler_config.json keys, got "
                        f"{type(scheduler_config).__name__}")
    if timestep_spacing is not None:
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {list(TIMESTEP_SPACINGS)}, got {timestep_spacing!r}")
        scheduler_config = {**(scheduler_config or {}), "timestep_spacing": timestep_spacing}
    if scheduler_config is not None:
        config = config.with_settings(scheduler_config)
    schedule = config.for_sampler(sampler)
    if schedule.num_train_timesteps != pipe.schedule.num_train_timesteps:
        raise ValueError(f"num_train_timesteps {schedule.num_train_timesteps} does not match this model's "
                         f"{pipe.schedule.num_train_timesteps}")
    return schedule
