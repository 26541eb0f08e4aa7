"""Image to image (SDEdit, Meng et al. 2022): encode the image, noise it to the level `strength`
sets, and denoise from there with any sampler."""
from __future__ import annotations

from typing import Any, Callable

import torch

from latentloom.pipelines.arguments import check_float, check_unet_channels, parse_call
from latentloom.pipelines.control import parse_control
from latentloom.pipelines.denoising import call_sigmas, guided_denoiser, run_sampler
from latentloom.pipelines.metadata import call_recipes
from latentloom.pipelines.image_input import (
    check_image_size, encode_for_batch, expand_to_batch, images_to_tensor, per_prompt_images, record_hashes,
    to_model_range,
)
from latentloom.pipelines.handoff import check_fraction, cut_start, from_handoff
from latentloom.pipelines.micro_conditioning import micro_values, parse_micro
from latentloom.pipelines.output import PipelineOutput, latents_to_output
from latentloom.samplers.forward import add_noise
from latentloom.samplers.noise import final_latents, randn, sigmas_for_strength


def check_strength(strength: Any) -> float:
    return check_float(strength, "strength", low=0.0, high=1.0)


def strength_sigmas(pipe, call, strength: float) -> torch.Tensor:
    """The steps img2img walks at `strength`: the tail of the call's schedule (diffusers' `get_timesteps`);
    for an LCM-distilled model (guidance embedding) on lcm / tcd, all the steps on the part of the
    teacher's grid below strength x T, as diffusers' LatentConsistencyModelImg2ImgPipeline does."""
    from latentloom.samplers.schedules import CONSISTENCY_SAMPLERS, custom_sigmas, lcm_timesteps

    if (call.guidance_embedded and call.sampler in CONSISTENCY_SAMPLERS and call.timesteps is None
            and call.sigmas is None and strength < 1.0):
        cfg = call.schedule
        grid = lcm_timesteps(pipe.schedule.num_train_timesteps, call.steps, cfg.original_inference_steps,
                             strength=strength)
        return custom_sigmas(pipe.discrete_schedule(cfg), sampler=call.sampler, timesteps=grid.tolist(),
                             set_alpha_to_one=cfg.set_alpha_to_one)
    return sigmas_for_strength(call_sigmas(pipe, call), strength, sampler=call.sampler)


@torch.no_grad()
def image_to_image(
    pipe,
    prompt: str | list[str],
    *,
    image: Any,
    strength: float = 0.8,
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
    control_image: Any = None,
    controlnet_conditioning_scale: float | list[float] = 0.8,  # diffusers' default for this task
    control_guidance_start: float | list[float] = 0.0,
    control_guidance_end: float | list[float] = 1.0,
    guess_mode: bool = False,
    prompt_2: str | list[str] | None = None,
    negative_prompt_2: str | list[str] | None = None,
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] | None = None,
    target_size: tuple[int, int] | None = None,
    negative_original_size: tuple[int, int] | None = None,
    negative_crops_coords_top_left: tuple[int, int] | None = None,
    negative_target_size: tuple[int, int] | None = None,
    aesthetic_score: float | None = None,
    negative_aesthetic_score: float | None = None,
    denoising_start: float | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    seed: int | None = None,
    num_images_per_prompt: int = 1,
    output_type: str = "pil",
    callback: Callable | None = None,
    progress: bool = True,
) -> PipelineOutput:
    """Re-draw `image` following `prompt`; `strength` in [0, 1] is how far it may move (1: from pure noise
    level, though still started from the image, as diffusers does).

    image: one image for every prompt, or one per prompt (PIL, numpy or tensor; see
    `image_input`); its size is the output size and must be a multiple of the VAE factor.
    The last int(num_inference_steps * strength) steps of the schedule run; a strength that
    leaves none is an error. Other arguments as `text_to_image` (SDXL's included); the same
    generator gives diffusers' `StableDiffusionImg2ImgPipeline` (`StableDiffusionXLImg2ImgPipeline`,
    refiners included) image. `denoising_start=f`: `image` is the latent tensor a base model returned with
    `denoising_end=f, output_type="latent"`; the refiner runs the schedule's steps below the cut from
    it, adding no noise (strength is not used; see `pipelines.handoff`). `control_image` and the other
    control arguments: as `text_to_image` (diffusers' StableDiffusionControlNetImg2ImgPipeline); the control
    image must have `image`'s size, and control_guidance_start / end are fractions of the UNet calls strength runs.
    """
    call = parse_call(pipe, prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, sampler=sampler,
                      karras_sigmas=karras_sigmas, num_images_per_prompt=num_images_per_prompt,
                      output_type=output_type, seed=seed, generator=generator,
                      scheduler_config=scheduler_config, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
                      eta=eta, timesteps=timesteps, sigmas=sigmas, timestep_spacing=timestep_spacing,
                      cache_interval=cache_interval, token_merge_ratio=token_merge_ratio)
    strength = check_strength(strength)
    check_unet_channels(pipe, expected=(pipe.latent_channels,), task="img2img")
    if denoising_start is not None:
        denoising_start = check_fraction(denoising_start, "denoising_start", call.sampler)
        latents = _handoff_latents(pipe, image, call.batch)
        height, width = (int(s) * pipe.vae_scale_factor for s in latents.shape[2:])
    else:
        pixels = per_prompt_images(images_to_tensor(image), len(call.prompts))  # (n, 3, H, W) in [0, 1]
        height, width = check_image_size(pipe, pixels)
    call.micro = parse_micro(pipe, height=height, width=width, values=micro_values(locals()))
    control = parse_control(pipe, len(call.prompts), control_image=control_image,
                            scale=controlnet_conditioning_scale, start=control_guidance_start,
                            end=control_guidance_end, guess_mode=guess_mode)
    if control is not None:  # the control image must have the output's size
        control.bind(call, height=height, width=width, device=pipe.device)
        call.control = control
    denoiser = guided_denoiser(pipe, call)
    if denoising_start is not None:
        sigmas = cut_start(pipe, call, call_sigmas(pipe, call), denoising_start)
        x = from_handoff(expand_to_batch(latents, call.batch), float(sigmas[0]), call.sampler)
    else:
        sigmas = strength_sigmas(pipe, call, strength)
        x0 = encode_for_batch(pipe.vae, to_model_range(pixels).to(pipe.device), batch=call.batch,
                              generator=call.generator)  # (B, C, h, w)
        noise = randn(x0.shape, generator=call.generator, device=pipe.device, dtype=torch.float32)
        x = add_noise(x0, noise, sigmas[0])
    x = run_sampler(pipe, call, denoiser, x, sigmas, callback=callback, progress=progress)
    images = latents_to_output(pipe, final_latents(x, sigmas, sampler=call.sampler), call.output_type)
    recipes = call_recipes(pipe, call, height=height, width=width, task="img2img", strength=strength,
                           **(call.micro.recipe() if call.micro is not None else {}),
                           **({"denoising_start": denoising_start} if denoising_start is not None else {}))
    if denoising_start is None:
        record_hashes(recipes, pixels, "image_hash")
    else:  # the handed-off latents: their exact float32 bytes
        import hashlib

        digest = hashlib.sha256(latents.detach().cpu().float().numpy().tobytes()).hexdigest()[:10]
        for recipe in recipes:
            recipe["latents_hash"] = digest
    return PipelineOutput(images=images, recipes=recipes)


def _handoff_latents(pipe, image: Any, batch: int) -> torch.Tensor:
    """The latents a base model handed off: a float tensor (1 or batch, latent channels, h, w)."""
    if not torch.is_tensor(image) or image.ndim != 4 or image.shape[1] != pipe.latent_channels:
        got = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise ValueError(f"with denoising_start, image must be the latents a base model returned (B, "
                         f"{pipe.latent_channels}, h, w) with output_type='latent' and denoising_end; got {got}")
    if image.shape[0] not in (1, batch):
        raise ValueError(f"got latents for {image.shape[0]} images; this call makes {batch} (pass 1 or {batch})")
    return image.to(device=pipe.device, dtype=torch.float32)
