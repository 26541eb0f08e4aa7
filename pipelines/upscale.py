"""Super-resolution with an SD-x4-upscaler-style model (Saharia et al. 2022, noise conditioning
augmentation): the low-resolution image, noised to `noise_level` on its own DDPM schedule, is
concatenated to the latents, and `noise_level` is the UNet's class label."""
from __future__ import annotations

from typing import Any, Callable

import torch

from latentloom.pipelines.arguments import check_int, check_size, check_unet_channels, parse_call
from latentloom.pipelines.denoising import call_sigmas, guided_denoiser, run_sampler
from latentloom.pipelines.metadata import call_recipes
from latentloom.pipelines.output import latents_to_output
from latentloom.pipelines.image_input import (
    expand_to_batch, images_to_tensor, per_prompt_images, record_hashes, to_model_range,
)
from latentloom.pipelines.output import PipelineOutput
from latentloom.pipelines.upscale_residual import residual_base
from latentloom.samplers.forward import add_noise_at_timestep
from latentloom.samplers.noise import final_latents, initial_latents, randn


def upscaler_parts(pipe) -> tuple[Any, int]:
    """The low-res noise schedule and the largest noise level, or ValueError for a model that is no upscaler."""
    if pipe.upscaler is None:
        raise ValueError(f"{pipe.name} is not an upscaler model: upscale needs an SD-x4-upscaler-style folder "
                         "(with low_res_scheduler/ and a UNet of latent + 3 input channels)")
    schedule = pipe.upscaler.low_res_schedule
    return schedule, int(pipe.upscaler.max_noise_level or schedule.num_train_timesteps - 1)


@torch.no_grad()
def upscale(
    pipe,
    prompt: str | list[str],
    *,
    image: Any,
    noise_level: int = 20,
    negative_prompt: str | list[str] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    sampler: str | None = None,
    karras_sigmas: bool | None = None,
    scheduler_config: dict | None = None,
    eta: float | None = None,
    timesteps: list[int] | None = None,
    sigmas: list[float] | None = None,
    timestep_spacing: str | None = None,
    cache_interval: int | None = None,
    token_merge_ratio: float | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    seed: int | None = None,
    num_images_per_prompt: int = 1,
    output_type: str = "pil",
    callback: Callable | None = None,
    progress: bool = True,
) -> PipelineOutput:
    """Upscale `image` (one for every prompt, or one per prompt) by the VAE factor (4 for SD-x4).

    noise_level: how much noise is added to the low-res image before the model sees it (0 up to
    the model's max_noise_level, 350 for SD-x4; more noise lets the model invent more detail).
    A residual model (model_index.json `"residual": "bicubic"`, `pipelines.upscale_residual`)
    makes a correction that is added to the bicubic enlargement of the image; with
    output_type="latent" the correction's latents are returned.
    With one generator the draws follow diffusers' `StableDiffusionUpscalePipeline` (low-res
    noise first, then the latents), so the same generator gives its image; `seed=` gives each
    image of the batch its own generator. Other arguments as `text_to_image`.
    """
    call = parse_call(pipe, prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, sampler=sampler,
                      karras_sigmas=karras_sigmas, num_images_per_prompt=num_images_per_prompt,
                      output_type=output_type, seed=seed, generator=generator,
                      scheduler_config=scheduler_config, eta=eta, timesteps=timesteps, sigmas=sigmas,
                      timestep_spacing=timestep_spacing, cache_interval=cache_interval,
                      token_merge_ratio=token_merge_ratio)
    c = pipe.latent_channels
    check_unet_channels(pipe, expected=(c + 3,), task="upscale")
    schedule, max_level = upscaler_parts(pipe)
    classes = pipe.unet.config.num_class_embeds
    if classes is None:
        raise ValueError("upscale needs a UNet with a noise-level class embedding (num_class_embeds); this one has none")
    noise_level = check_int(noise_level, "noise_level", low=0, high=min(max_level, classes - 1))
    pixels = per_prompt_images(images_to_tensor(image), len(call.prompts))  # (n, 3, h, w) in [0, 1]
    f = pipe.vae_scale_factor
    h, w = int(pixels.shape[2]), int(pixels.shape[3])
    height, width = check_size(pipe, h * f, w * f)
    sigmas = call_sigmas(pipe, call)

    device, batch, gen = pipe.device, call.batch, call.generator
    low = to_model_range(pixels).to(device)  # (n, 3, h, w) in [-1, 1]
    # a residual model's base: the clean low-res image enlarged (the augmentation noise only conditions)
    base = residual_base(expand_to_batch(low, batch), (height, width)) if pipe.upscaler.residual else None
    if isinstance(gen, list) and len(gen) > 1:  # one generator per image: each draws its own low-res noise
        low = expand_to_batch(low, batch)
    low_noise = randn(low.shape, generator=gen, device=device, dtype=torch.float32)
    # noise augmentation: the low-res image at timestep noise_level of its own (low_res_scheduler) schedule
    low = expand_to_batch(add_noise_at_timestep(low, low_noise, schedule.alphas_cumprod, noise_level), batch)
    labels = torch.full((batch,), noise_level, dtype=torch.long, device=device)  # (B,)
    denoiser = guided_denoiser(pipe, call, extra={"concat": low, "class_labels": labels})

    noise = randn((batch, c, h, w), generator=gen, device=device, dtype=torch.float32)
    x = initial_latents(noise, sigmas, sampler=call.sampler, timestep_spacing=call.schedule.timestep_spacing)
    x = run_sampler(pipe, call, denoiser, x, sigmas, callback=callback, progress=progress)
    images = latents_to_output(pipe, final_latents(x, sigmas, sampler=call.sampler), call.output_type, base=base)
    recipes = call_recipes(pipe, call, height=height, width=width, task="upscale", noise_level=noise_level,
                           input_height=h, input_width=w)
    record_hashes(recipes, pixels, "image_hash")
    return PipelineOutput(images=images, recipes=recipes)
