"""Text to image: encode the prompt, draw noise, make sigmas, sample, decode, record the recipe."""
from __future__ import annotations

from typing import Any, Callable

import torch

from latentloom.pipelines.arguments import check_float, check_size, parse_call
from latentloom.pipelines.control import parse_control
from latentloom.pipelines.denoising import call_sigmas, guided_denoiser, run_sampler
from latentloom.pipelines.metadata import call_recipes
from latentloom.pipelines.output import latents_to_output
from latentloom.pipelines.handoff import base_sampler_options, check_fraction, cut_end, to_handoff
from latentloom.pipelines.micro_conditioning import micro_values, parse_micro
from latentloom.pipelines.output import PipelineOutput
from latentloom.samplers.noise import final_latents, initial_latents, randn


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
    scheduler_config: dict | None = None,
    eta: float | None = None,
    timesteps: list[int] | None = None,
    sigmas: list[float] | None = None,
    timestep_spacing: str | None = None,
    cache_interval: int | None = None,
    token_merge_ratio: float | None = None,
    control_image: Any = None,
    controlnet_conditioning_scale: float | list[float] = 1.0,
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
    denoising_end: float | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    seed: int | None = None,
    num_images_per_prompt: int = 1,
    clip_guidance_scale: float | None = None,
    output_type: str = "pil",
    callback: Callable | None = None,
    progress: bool = True,
    vae_tiling: bool | None = None,
) -> PipelineOutput:
    """Make images from `prompt` (a str or a list of str).

    Argument names follow diffusers. `guidance_scale` <= 1 runs the conditional model
    alone (as diffusers does); above 1, classifier-free guidance with one batched forward. An
    LCM-distilled UNet (config.time_cond_proj_dim) instead reads w = guidance_scale - 1 through its
    guidance embedding, one call per step (diffusers' LCM pipelines); recipes record which
    (`guidance_mode`). `sampler="lcm"` / `"tcd"` sample consistency-distilled models (LCM, LCM-LoRA,
    TCD) on the teacher's grid of `original_inference_steps`; `eta` is TCD's gamma (default 0.3).
    `timesteps=[999, 759, 499, 259]` or `sigmas=[...]` (descending) replace the step schedule for any
    sampler, as diffusers' arguments of those names do; `timestep_spacing` ("leading", "trailing",
    "linspace") overrides the model folder's for this call (Turbo-style models sample "trailing").
    `seed=s` makes image i from seed s + i, so any image of a batch can be re-made alone;
    `generator` is used exactly as diffusers uses it, so the same generator gives the same
    image as diffusers with the same weights and sampler. `sampler` is a name from
    `latentloom.samplers.SAMPLERS`; it runs on the model's scheduler settings as diffusers'
    scheduler of that name swapped in with `Cls.from_config(pipe.scheduler.config)` would: a key
    the model's scheduler_config.json leaves out takes that class's default (README, "Same images
    as diffusers"). `scheduler_config`: settings stated over the model's for this call (a dict of
    scheduler_config.json keys, e.g. `{"timestep_spacing": "trailing"}`; recipes record them under
    that name). `vae_tiling`: None decodes large images in VAE tiles
    (see `latentloom.vae.codec.decode_latents`), True / False force it. Returns
    `PipelineOutput(images, recipes)`. SDXL models also take `prompt_2` / `negative_prompt_2` (their
    second text encoder) and the micro-conditioning of `pipelines.micro_conditioning`
    (`original_size`, `crops_coords_top_left`, `target_size`, their `negative_*` twins, and for
    refiners `aesthetic_score` / `negative_aesthetic_score`). `denoising_end=f` stops at the fraction
    f of the schedule and, with `output_type="latent"`, returns the latents a refiner's img2img
    continues from with `denoising_start=f` (`pipelines.handoff`). `cache_interval=N` (opt-in step
    caching, DeepCache): the whole UNet runs every N sampler steps (step 0 first; a Heun step's two
    calls together) and only its shallow branch in between, on the deep feature of the last full
    step (`unet.step_cache`); None or 1: every step exact. Recipes record N when it is above 1.
    `token_merge_ratio=r` in [0, 1) (opt-in token merging, ToMe for SD): in the transformers of the
    UNet's highest-resolution level that has them, self-attention runs on (1 - r) of the tokens, the
    r x H*W most similar averaged into their match and copied back after (`unet.token_merge`); it
    pays at large latents only (SD-1.5 UNet on one CPU thread, bf16: 1.26x per step at 512 px and
    1.5x at 768 px with r = 0.5; fp32 1.1x at 512 px) and composes with step caching; None or 0:
    exact. Recipes record r when it is above 0.
    `control_image`, with ControlNets loaded (`load_pipeline(model, controlnet=...)`): the control map(s),
    one per ControlNet in order (each an image, a path, or a list of one per prompt), RGB in [0, 1] at the
    output's size (never resized); `controlnet_conditioning_scale`, `control_guidance_start` / `_end`
    (fractions of the run's UNet calls: its steps, 2N - 1 for Heun) and `guess_mode` as diffusers' ControlNet
    pipelines (`pipelines.control`).
    Without height / width, a control image sets the size, as diffusers'.
    """
    call = parse_call(pipe, prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, sampler=sampler,
                      karras_sigmas=karras_sigmas, num_images_per_prompt=num_images_per_prompt,
                      output_type=output_type, seed=seed, generator=generator, vae_tiling=vae_tiling,
                      scheduler_config=scheduler_config, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
                      eta=eta, timesteps=timesteps, sigmas=sigmas, timestep_spacing=timestep_spacing,
                      cache_interval=cache_interval, token_merge_ratio=token_merge_ratio)
    d = pipe.defaults
    control = parse_control(pipe, len(call.prompts), control_image=control_image,
                            scale=controlnet_conditioning_scale, start=control_guidance_start,
                            end=control_guidance_end, guess_mode=guess_mode)
    if control is not None:  # diffusers: the size defaults to the control image's
        height = control.size[0] if height is None else height
        width = control.size[1] if width is None else width
    height, width = check_size(pipe, d.height if height is None else height, d.width if width is None else width)
    if control is not None:
        control.bind(call, height=height, width=width, device=pipe.device)
        call.control = control
    call.micro = parse_micro(pipe, height=height, width=width, values=micro_values(locals()))
    if clip_guidance_scale is None:  # the model's default; 0 unless it ships an image-text model
        clip_guidance_scale = d.clip_guidance_scale if pipe.clip_model is not None else 0.0
    clip_scale = check_float(clip_guidance_scale, "clip_guidance_scale", low=0.0)
    if denoising_end is not None:
        denoising_end = check_fraction(denoising_end, "denoising_end", call.sampler)

    denoiser = guided_denoiser(pipe, call)
    if clip_scale > 0:
        from latentloom.pipelines.clip_guided import add_clip_guidance

        prompts = [p for p in call.prompts for _ in range(call.per_prompt)]
        denoiser = add_clip_guidance(pipe, denoiser, prompts, clip_scale)

    sigmas = call_sigmas(pipe, call)
    f = pipe.vae_scale_factor
    shape = (call.batch, pipe.latent_channels, height // f, width // f)
    noise = randn(shape, generator=call.generator, device=pipe.device, dtype=torch.float32)
    x = initial_latents(noise, sigmas, sampler=call.sampler, timestep_spacing=call.schedule.timestep_spacing)
    options = {}
    if denoising_end is not None:
        steps = len(sigmas) - 1
        sigmas = cut_end(pipe, call, sigmas, denoising_end)
        options = base_sampler_options(call.sampler, steps_after=steps - (len(sigmas) - 1))
    x = run_sampler(pipe, call, denoiser, x, sigmas, callback=callback, progress=progress, options=options)
    if denoising_end is None:
        latents = final_latents(x, sigmas, sampler=call.sampler)
    else:
        latents = to_handoff(x, float(sigmas[-1]), call.sampler)
    images = latents_to_output(pipe, latents, call.output_type, vae_tiling=call.vae_tiling)
    recipes = call_recipes(pipe, call, height=height, width=width, task="txt2img", clip_guidance_scale=clip_scale,
                           vae_tiling=call.vae_tiling, **(call.micro.recipe() if call.micro is not None else {}),
                           **({"denoising_end": denoising_end} if denoising_end is not None else {}))
    return PipelineOutput(images=images, recipes=recipes)
