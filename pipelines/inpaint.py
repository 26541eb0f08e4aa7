"""Inpainting: repaint the white part of a mask, keep the rest.

Two ways, chosen by the UNet's input channels:
- 9 (SD-inpainting): the mask and the masked image's latents are concatenated to the latents
  (Rombach et al. 2022, as diffusers' `StableDiffusionInpaintPipeline`);
- 4 (any model): `InpaintBlend` re-noises the known region to the current sigma before each
  model call and puts it back into the denoised estimate, so every sampler keeps it (with the
  single-step and multistep samplers, diffusers' 4-channel loop, which blends after each step).
Then the result is pasted back onto the original through a feathered mask (see `masks`). Without
paste-back the latent mask is diffusers' (nearest sampling), so the same generator gives its image.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from latentloom.pipelines.arguments import check_int, check_unet_channels, parse_call
from latentloom.pipelines.control import parse_control
from latentloom.pipelines.denoising import call_sigmas, guided_denoiser, run_sampler
from latentloom.pipelines.metadata import call_recipes
from latentloom.pipelines.output import latents_to_output
from latentloom.pipelines.image_input import (
    check_image_size, draw_as_encode_for_batch, encode_for_batch, expand_to_batch, images_to_tensor,
    per_prompt_images, record_hashes, to_model_range,
)
from latentloom.pipelines.img2img import check_strength
from latentloom.pipelines.micro_conditioning import micro_values, parse_micro
from latentloom.pipelines.masks import (
    binarize, check_mask_size, dilated_latent_mask, feathered, mask_to_tensor, nearest_latent_mask, paste_onto,
)
from latentloom.pipelines.output import PipelineOutput, images_to_numpy, numpy_to_pil
from latentloom.samplers.forward import add_noise
from latentloom.samplers.guidance import InpaintBlend
from latentloom.samplers.noise import final_latents, initial_latents, randn, sigmas_for_strength
from latentloom.vae.codec import decode_latents


@torch.no_grad()
def inpaint(
    pipe,
    prompt: str | list[str],
    *,
    image: Any,
    mask_image: Any,
    strength: float = 1.0,
    paste_back: bool = True,
    feather: int | None = None,
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
    controlnet_conditioning_scale: float | list[float] = 0.5,  # diffusers' default for this task
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
    generator: torch.Generator | list[torch.Generator] | None = None,
    seed: int | None = None,
    num_images_per_prompt: int = 1,
    output_type: str = "pil",
    callback: Callable | None = None,
    progress: bool = True,
) -> PipelineOutput:
    """Repaint the white part of `mask_image` in `image` following `prompt`.

    image / mask_image: one for every prompt, or one per prompt; the mask must have the image's
    size (accepted forms: `masks`), binarized at 0.5. strength: 1 starts from pure noise; below
    1 from the image noised to that level (as img2img). paste_back (default True): the
    output is the original image outside the mask, bit for bit, blended into the generated
    image over `feather` pixels inside the mask's edge (default: the VAE factor, 8 for SD),
    and a 9-channel UNet is asked to repaint every latent cell the mask touches. False returns
    the decoded image as is, with the mask conditioned exactly as diffusers does (so the same
    generator gives `StableDiffusionInpaintPipeline`'s image, for 4-channel models too with the
    single-step and multistep samplers). output_type="latent" returns
    latents without paste-back. Other arguments as `text_to_image` (SDXL's included: 4- and 9-channel
    SDXL models give `StableDiffusionXLInpaintPipeline`'s image). `control_image` and the other control
    arguments: as `text_to_image` (diffusers' StableDiffusionControlNetInpaintPipeline, 4- or 9-channel UNet;
    the ControlNet reads the latents, not the mask channels); the control image must have `image`'s size.
    """
    call = parse_call(pipe, prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, sampler=sampler,
                      karras_sigmas=karras_sigmas, num_images_per_prompt=num_images_per_prompt,
                      output_type=output_type, seed=seed, generator=generator,
                      scheduler_config=scheduler_config, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
                      eta=eta, timesteps=timesteps, sigmas=sigmas, timestep_spacing=timestep_spacing,
                      cache_interval=cache_interval, token_merge_ratio=token_merge_ratio)
    strength = check_strength(strength)
    c = pipe.latent_channels
    channels = check_unet_channels(pipe, expected=(c, 2 * c + 1), task="inpaint")
    f = pipe.vae_scale_factor
    radius = f if feather is None else check_int(feather, "feather", low=0, high=256)
    pixels = per_prompt_images(images_to_tensor(image), len(call.prompts))  # (n, 3, H, W) in [0, 1]
    mask = per_prompt_images(mask_to_tensor(mask_image), len(call.prompts), name="mask_image")  # (m, 1, H, W)
    check_mask_size(mask, pixels)
    height, width = check_image_size(pipe, pixels)
    call.micro = parse_micro(pipe, height=height, width=width, values=micro_values(locals()))
    control = parse_control(pipe, len(call.prompts), control_image=control_image,
                            scale=controlnet_conditioning_scale, start=control_guidance_start,
                            end=control_guidance_end, guess_mode=guess_mode)
    if control is not None:  # the control image must have the output's size
        control.bind(call, height=height, width=width, device=pipe.device)
        call.control = control
    sigmas = sigmas_for_strength(call_sigmas(pipe, call), strength, sampler=call.sampler)

    device, batch, gen = pipe.device, call.batch, call.generator
    mask = binarize(mask).to(device)
    init = to_model_range(pixels).to(device)  # (n, 3, H, W) in [-1, 1]
    x0 = None
    if channels == c:  # any model: blend the known region in at every step
        x0 = encode_for_batch(pipe.vae, init, batch=batch, generator=gen)  # (B, C, h, w)
        noise = randn(x0.shape, generator=gen, device=device, dtype=torch.float32)
        draw_as_encode_for_batch(pipe.vae, init, batch=batch, generator=gen)  # diffusers' masked-image encode
        # with paste-back, every latent the mask touches is repainted (no repainted pixel decodes from a
        # kept latent); without it, diffusers' mask (nearest sampling)
        latent_mask = dilated_latent_mask(mask, f) if paste_back else nearest_latent_mask(mask, f)
        latent_mask = expand_to_batch(latent_mask, batch)  # (B, 1, h, w)
        denoiser = InpaintBlend(guided_denoiser(pipe, call), x0=x0, noise=noise, mask=latent_mask)
    else:  # SD-inpainting UNet; generator draws in diffusers' order: [image latents], noise, masked image
        if strength < 1.0:
            x0 = encode_for_batch(pipe.vae, init, batch=batch, generator=gen)
        noise = randn((batch, c, height // f, width // f), generator=gen, device=device, dtype=torch.float32)
        cond_mask = mask
        if paste_back:
            # repaint every latent cell the mask touches, so no cell is half kept / half repainted (a seam
            # on the latent grid); the pixel-space paste-back then restores everything outside the mask.
            # Without paste-back the mask is conditioned exactly as diffusers does (nearest sampling).
            cond_mask = F.interpolate(dilated_latent_mask(mask, f, grow=0), scale_factor=f)
        masked_latents = encode_for_batch(pipe.vae, init * (cond_mask < 0.5), batch=batch, generator=gen)
        latent_mask = expand_to_batch(nearest_latent_mask(cond_mask, f), batch)
        denoiser = guided_denoiser(pipe, call, extra={"concat": torch.cat([latent_mask, masked_latents], dim=1)})

    if strength == 1.0:  # pure noise, as diffusers (not x0 + sigma_max * noise)
        x = initial_latents(noise, sigmas, sampler=call.sampler, timestep_spacing=call.schedule.timestep_spacing)
    else:
        x = add_noise(x0, noise, sigmas[0])
    x = run_sampler(pipe, call, denoiser, x, sigmas, callback=callback, progress=progress)
    latents = final_latents(x, sigmas, sampler=call.sampler)
    if channels == c:
        latents = torch.lerp(x0, latents, latent_mask)

    if paste_back and call.output_type != "latent":
        generated = images_to_numpy(decode_latents(pipe.vae, latents))  # (B, H, W, 3)
        original = expand_to_batch(pixels, batch).permute(0, 2, 3, 1).numpy()
        soft = expand_to_batch(feathered(mask, radius), batch).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 1)
        array = paste_onto(generated, original, soft)
        images = array if call.output_type == "np" else numpy_to_pil(array)
    else:
        images = latents_to_output(pipe, latents, call.output_type)
    recipes = call_recipes(pipe, call, height=height, width=width, task="inpaint", strength=strength,
                           paste_back=bool(paste_back), feather=radius,
                           inpaint_mode="concat" if channels != c else "blend",
                           **(call.micro.recipe() if call.micro is not None else {}))
    record_hashes(recipes, pixels, "image_hash")
    record_hashes(recipes, mask.cpu().expand(-1, 3, -1, -1), "mask_hash")
    return PipelineOutput(images=images, recipes=recipes)
