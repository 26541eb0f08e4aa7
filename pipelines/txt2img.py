"""Text to image: encode the prompt, draw noise, make sigmas, sample, decode, record the recipe."""
from __future__ import annotations

from typing import Any, Callable

import torch

import latentloom
from latentloom.pipelines.common import (
    build_denoiser, check_bool, check_float, check_int, check_negative, check_output_type, check_prompt_list,
    check_size, latents_to_output, make_generators, repeat_cond, run_sampler, text_conditions,
)
from latentloom.pipelines.output import PipelineOutput
from latentloom.samplers import get_sampler
from latentloom.samplers.noise import final_latents, initial_latents, randn
from latentloom.samplers.schedules import make_sigmas


@torch.no_grad()
def text_to_image(
    pipe,
    prompt: str | list[str],
    *,
    negative_prompt: str | list[str] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    sampler: str | None = None,
    karras_sigmas: bool | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    seed: int | None = None,
    num_images_per_prompt: int = 1,
    clip_guidance_scale: float = 0.0,
    output_type: str = "pil",
    callback: Callable | None = None,
    progress: bool = True,
) -> PipelineOutput:
    """Make images from `prompt` (a str or a list of str).

    Argument names follow diffusers. `guidance_scale` <= 1 runs the conditional model
    alone (as diffusers does); above 1, classifier-free guidance with one batched forward.
    `seed=s` makes image i from seed s + i, so any image of a batch can be re-made alone;
    `generator` is used exactly as diffusers uses it, so the same generator gives the same
    image as diffusers with the same weights and sampler. `sampler` is a name from
    `latentloom.samplers.SAMPLERS`. Returns `PipelineOutput(images, recipes)`.
    """
    d = pipe.defaults
    prompts = check_prompt_list(prompt)
    negatives = check_negative(negative_prompt, len(prompts))
    steps = check_int(d.num_inference_steps if num_inference_steps is None else num_inference_steps,
                      "num_inference_steps", low=1, high=pipe.schedule.num_train_timesteps)
    scale = check_float(d.guidance_scale if guidance_scale is None else guidance_scale, "guidance_scale", low=0.0)
    rescale = check_float(guidance_rescale, "guidance_rescale", low=0.0, high=1.0)
    clip_scale = check_float(clip_guidance_scale, "clip_guidance_scale", low=0.0)
    height, width = check_size(pipe, d.height if height is None else height, d.width if width is None else width)
    sampler = sampler or d.sampler
    get_sampler(sampler)  # unknown names fail before any work
    per_prompt = check_int(num_images_per_prompt, "num_images_per_prompt", low=1, high=64)
    output_type = check_output_type(output_type)
    karras = pipe.schedule_config.use_karras_sigmas if karras_sigmas is None else check_bool(karras_sigmas,
                                                                                             "karras_sigmas")
    batch = len(prompts) * per_prompt
    generator, seeds = make_generators(seed=seed, generator=generator, batch=batch)

    guided = scale > 1.0
    cond, uncond = text_conditions(pipe, prompts, negatives, guided=guided)
    cond = repeat_cond(cond, per_prompt)
    uncond = repeat_cond(uncond, per_prompt) if uncond is not None else None
    denoiser = build_denoiser(pipe, cond=cond, uncond=uncond, guidance_scale=scale, guidance_rescale=rescale)
    if clip_scale > 0:
        from latentloom.pipelines.clip_guided import add_clip_guidance

        denoiser = add_clip_guidance(pipe, denoiser, [p for p in prompts for _ in range(per_prompt)], clip_scale)

    cfg = pipe.schedule_config
    sigmas = make_sigmas(pipe.schedule, steps, sampler=sampler, timestep_spacing=cfg.timestep_spacing,
                         steps_offset=cfg.steps_offset, karras=karras, set_alpha_to_one=cfg.set_alpha_to_one)
    f = pipe.vae_scale_factor
    shape = (batch, pipe.latent_channels, height // f, width // f)
    noise = randn(shape, generator=generator, device=pipe.device, dtype=torch.float32)
    x = initial_latents(noise, sigmas, sampler=sampler, timestep_spacing=cfg.timestep_spacing)
    x = run_sampler(sampler, denoiser, x, sigmas.to(pipe.device), generator=generator,
                    callback=callback, progress=progress)
    latents = final_latents(x, sigmas)
    images = latents_to_output(pipe, latents, output_type)

    shared = {
        "negative_prompt": None, "num_inference_steps": steps, "sampler": sampler, "karras_sigmas": karras,
        "guidance_scale": scale, "guidance_rescale": rescale, "clip_guidance_scale": clip_scale,
        "height": height, "width": width, "model": pipe.name, "model_hash": pipe.model_hash(),
        "dtype": str(pipe.dtype).removeprefix("torch."), "latentloom_version": latentloom.__version__,
        "task": "txt2img",
    }
    recipes = [
        {**shared, "prompt": prompts[i // per_prompt], "seed": seeds[i],
         "negative_prompt": negatives[i // per_prompt] if negatives else None}
        for i in range(batch)
    ]
    return PipelineOutput(images=images, recipes=recipes)
