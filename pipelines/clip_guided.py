"""CLIP guidance for a pipeline call: wraps the guided denoiser with `samplers.CLIPGuidance`.

The image-text model is `pipe.clip_model`: the bundled model's small `ImageTextModel`
(its text side reads the pipeline's own frozen text encoder), or a transformers
`CLIPModel` together with `pipe.clip_tokenizer`.
"""
from __future__ import annotations

from typing import Callable

import torch

from latentloom.samplers.clip_guidance import CLIPGuidance


class ImageTextAdapter:
    """Gives an `ImageTextModel` the two methods CLIP guidance calls: its text side reads the
    pipeline's frozen text encoder; pixels arrive normalized with mean = std = 0.5, i.e. back in
    the [-1, 1] range the model was trained on."""

    def __init__(self, model, text_encoder) -> None:
        self.model = model
        self.text_encoder = text_encoder

    def get_text_features(self, *, prompts: list[str]) -> torch.Tensor:
        weight = next(self.model.parameters())
        return self.model.encode_text(self.text_encoder.encode(prompts).to(device=weight.device))

    def get_image_features(self, *, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = next(self.model.parameters())
        return self.model.encode_image(pixel_values.to(weight.dtype))


def add_clip_guidance(pipe, denoiser: Callable, prompts: list[str], scale: float, *,
                      num_cutouts: int = 4, seed: int = 0) -> CLIPGuidance:
    """Steer `denoiser` toward `prompts` (one per image) with gradient `scale`."""
    model = pipe.clip_model
    if model is None:
        raise ValueError(
            "clip_guidance_scale > 0 needs an image-text model, and this model has none: set "
            "pipe.clip_model (and pipe.clip_tokenizer for a transformers CLIPModel) or use clip_guidance_scale=0"
        )
    vae = pipe.vae
    scaling, shift = vae.config.scaling_factor, float(getattr(vae.config, "shift_factor", None) or 0.0)

    def decode(latents: torch.Tensor) -> torch.Tensor:  # differentiable, unlike vae.decode_latents
        return vae.decode(latents.to(vae.dtype) / scaling + shift).sample.float()

    common = dict(decode=decode, scale=scale, num_cutouts=num_cutouts, generator=torch.Generator().manual_seed(seed),
                  through_denoiser=False)
    if hasattr(model, "encode_image") and hasattr(model, "encode_text"):
        return CLIPGuidance(denoiser, clip_model=ImageTextAdapter(model, pipe.text_encoder),
                            text_inputs={"prompts": prompts},
                            cut_size=model.config.resolution, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                            **common)
    tokenizer = getattr(pipe, "clip_tokenizer", None)
    if tokenizer is None:
        raise ValueError("pipe.clip_model is a CLIP-style model but pipe.clip_tokenizer is not set")
    inputs = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(pipe.device)
    return CLIPGuidance(denoiser, clip_model=model, text_inputs=dict(inputs), **common)
