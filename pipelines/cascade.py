"""A cascade in one call: a base stage (text to image, img2img or inpaint) then a super-resolution
stage (Ho et al. 2022, cascaded diffusion), carrying the prompt, the seed and the mask through."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from latentloom.pipelines.arguments import check_int, check_output_type, check_prompt_list, check_size
from latentloom.pipelines.image_input import expand_to_batch, images_to_tensor
from latentloom.pipelines.masks import binarize, check_mask_size, feathered, mask_to_tensor, paste_onto
from latentloom.pipelines.output import PipelineOutput
from latentloom.pipelines.upscale import upscaler_parts
from latentloom.pipelines.output import numpy_to_pil


# arguments the cascade itself gives the stages
_CARRIED = {"prompt", "image", "mask_image", "strength", "height", "width", "num_images_per_prompt", "noise_level",
            "paste_back", "feather", "output_type"}


class Cascade:
    """`Cascade(base, upscaler)(prompt, ...)`: the base pipeline makes a small image, the upscaler
    (an SD-x4-upscaler-style pipeline) enlarges it by its VAE factor.

    Sizes are the final ones: `height` / `width` (default: the base model's default size times the
    factor), or the size of `image` / `mask_image`, which the base stage receives downscaled by the
    factor (area average for the image; for the mask, a low-res pixel is repainted when any of its
    pixels is, so nothing to repaint is lost). With a mask, the final image is pasted back onto the
    full-resolution original (feathered inside the mask, as `inpaint`), so the pixels outside the
    mask come back unchanged.
    """

    def __init__(self, base, upscaler) -> None:
        upscaler_parts(upscaler)  # fails now, not after the base stage, for a model that is no upscaler
        self.base = base
        self.upscaler = upscaler

    @property
    def factor(self) -> int:
        return self.upscaler.vae_scale_factor

    def __call__(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        strength: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        noise_level: int = 20,
        paste_back: bool = True,
        feather: int | None = None,
        base_kwargs: dict[str, Any] | None = None,
        upscale_kwargs: dict[str, Any] | None = None,
        output_type: str = "pil",
        progress: bool = True,
    ) -> PipelineOutput:
        """Run both stages. The base stage is text to image without `image`, img2img with it, inpaint
        with `mask_image` too; `strength` is the base stage's (default 0.8 for img2img, 1.0 for inpaint).
        `base_kwargs` / `upscale_kwargs` go to one stage only (num_inference_steps, guidance_scale,
        sampler, ...). `seed=s`: image i is made from seed s + i in both stages."""
        prompts = check_prompt_list(prompt)
        per_prompt = check_int(num_images_per_prompt, "num_images_per_prompt", low=1, high=64)
        if check_output_type(output_type) == "latent":
            raise ValueError("a cascade returns images; use output_type 'pil' or 'np'")
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs the image it masks; pass image= too")
        k = self.factor
        pixels = mask = None
        if image is not None:
            if height is not None or width is not None:
                raise ValueError("with image=, the output size is the image's size; leave height and width out")
            pixels = images_to_tensor(image)  # (n, 3, H, W) in [0, 1]
            height, width = int(pixels.shape[2]), int(pixels.shape[3])
        if mask_image is not None:
            mask = binarize(mask_to_tensor(mask_image))  # (m, 1, H, W)
            check_mask_size(mask, pixels)
        d = self.base.defaults
        height = d.height * k if height is None else height
        width = d.width * k if width is None else width
        height, width = check_size(self.upscaler, height, width)
        step = k * self.base.vae_scale_factor  # the base image must suit the base model's VAE
        for name, value in (("height", height), ("width", width)):
            if value % step:
                raise ValueError(f"{name} {value} must be a multiple of {step} (the upscale factor {k} times the "
                                 f"base model's VAE factor {self.base.vae_scale_factor})")
        low_h, low_w = check_size(self.base, height // k, width // k)

        common = dict(negative_prompt=negative_prompt, seed=seed, generator=generator, progress=progress)
        for name, extra in (("base_kwargs", base_kwargs), ("upscale_kwargs", upscale_kwargs)):
            taken = sorted(set(extra or {}) & (set(common) | _CARRIED))
            if taken:
                raise ValueError(f"{name} must not set {taken}: the cascade passes those to both stages; "
                                 "give them to the cascade call itself")
        base_args = {**(base_kwargs or {}), **common, "output_type": "np", "num_images_per_prompt": per_prompt}
        if pixels is None:
            low = self.base(prompts, height=low_h, width=low_w, **base_args)
        elif mask is None:
            low = self.base.img2img(prompts, image=_down(pixels, k), strength=0.8 if strength is None else strength,
                                    **base_args)
        else:
            low = self.base.inpaint(prompts, image=_down(pixels, k), mask_image=F.max_pool2d(mask, k),
                                    strength=1.0 if strength is None else strength, paste_back=paste_back,
                                    **base_args)

        # one upscale input per base image, with its own prompt (and seed, when seeded)
        each = [p for p in prompts for _ in range(per_prompt)]
        negatives = negative_prompt
        if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) > 1:
            negatives = [n for n in negative_prompt for _ in range(per_prompt)]
        up_args = {**(upscale_kwargs or {}), **common, "negative_prompt": negatives, "output_type": "np"}
        high = self.upscaler.upscale(each, image=low.images, noise_level=noise_level, **up_args)

        array = high.images  # (B, H, W, 3) in [0, 1]
        if mask is not None and paste_back:
            batch = array.shape[0]
            radius = self.base.vae_scale_factor * k if feather is None else check_int(feather, "feather", low=0)
            soft = expand_to_batch(feathered(mask, radius), batch).permute(0, 2, 3, 1).numpy()
            original = expand_to_batch(pixels, batch).permute(0, 2, 3, 1).numpy()
            array = paste_onto(array, original, soft)
        images = numpy_to_pil(array) if output_type == "pil" else array
        recipes = [
            {**up, "task": "cascade", "base": base, "paste_back": bool(paste_back) if mask is not None else None}
            for up, base in zip(high.recipes, low.recipes)
        ]
        return PipelineOutput(images=images, recipes=recipes)


def _down(pixels: torch.Tensor, k: int) -> np.ndarray:
    """(n, 3, H, W) in [0, 1] -> (n, H/k, W/k, 3) area average, for the base stage."""
    return F.avg_pool2d(pixels, k).permute(0, 2, 3, 1).numpy()
