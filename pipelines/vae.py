"""Glue between latents and pixels around diffusers' AutoencoderKL (which we do not rewrite).

Pixel tensors are (B, 3, H, W) in [-1, 1]; latents are scaled by the VAE's
`scaling_factor` (and shifted by `shift_factor` where the config has one), as diffusers does.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image


def vae_scale_factor(vae) -> int:
    """Pixels per latent along each side (8 for Stable Diffusion's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _shift(vae) -> float:
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) -> images (B, 3, H, W) in about [-1, 1].

    A low-precision decode that overflows (non-finite pixels) is redone in fp32 with a
    warning, so a black image is never returned silently.
    """
    z = latents.to(vae.dtype) / vae.config.scaling_factor + _shift(vae)
    images = vae.decode(z).sample
    if not torch.isfinite(images).all() and vae.dtype != torch.float32:
        warnings.warn(
            f"VAE decode in {vae.dtype} produced non-finite pixels; decoding again in float32",
            RuntimeWarning, stacklevel=2,
        )
        original = vae.dtype
        vae.to(torch.float32)
        try:
            images = vae.decode(z.float()).sample
        finally:
            vae.to(original)
    if not torch.isfinite(images).all():
        raise FloatingPointError("the VAE decoded non-finite pixels even in float32; the latents are broken")
    return images


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, *, generator=None, sample: bool = True) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> scaled latents, sampling the posterior as diffusers' img2img does."""
    images = images.to(device=vae.device, dtype=vae.dtype)
    if sample and isinstance(generator, (list, tuple)):
        if len(generator) != images.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {images.shape[0]} images; pass one per image")
        # each image alone through the encoder with its own generator, as diffusers' img2img does
        # (sampling a batch posterior with generator i and keeping row i draws other numbers)
        z = torch.cat([vae.encode(images[i : i + 1]).latent_dist.sample(generator=g) for i, g in enumerate(generator)])
    else:
        dist = vae.encode(images).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
    return (z - _shift(vae)) * vae.config.scaling_factor


def images_to_numpy(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> float32 array (B, H, W, 3) in [0, 1] (diffusers' postprocess)."""
    return (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """Float (B, H, W, 3) in [0, 1] -> PIL images, rounding as diffusers does."""
    return [Image.fromarray(img) for img in (images * 255).round().astype("uint8")]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """One PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]
