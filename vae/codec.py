"""Latents <-> pixels around a VAE (latentloom's AutoencoderKL, diffusers' with the same interface, or
the weightless PixelShuffleVAE).

Pixel tensors are (B, 3, H, W) in [-1, 1]; latents are scaled by the VAE's
`scaling_factor` (and shifted by `shift_factor` where the config has one), as diffusers does.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import torch


def vae_scale_factor(vae) -> int:
    """Pixels per latent along each side (8 for Stable Diffusion's VAE)."""
    factor = getattr(vae.config, "downsample_factor", None)  # PixelShuffleVAE says it outright
    return int(factor) if factor else 2 ** (len(vae.config.block_out_channels) - 1)


def _shift(vae) -> float:
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


# Automatic tiling (tiling=None): a tiled decode's peak memory is about one tile's whatever the image
# size, but it costs seams and time (overlaps are decoded twice), so it is chosen only from a side of
# 2 tiles and when the untiled decode would be large in bytes (the measurements behind both numbers:
# README, "Performance", VAE tiling).
AUTO_TILE_SIDES = 2.0  # latent side / tile side from which tiling is considered
AUTO_TILE_BYTES = 1 << 30  # estimated untiled decode activations from which it is chosen
# Peak decode activations per (batch x full-resolution channel x pixel x byte), as measured on SD's VAE
_ACTIVATIONS_PER_ELEMENT = 8


def _tile_latent_side(vae) -> int | None:
    """The latent side of one decoder tile, or None for a VAE without AutoencoderKL's tiling."""
    if not hasattr(vae, "use_tiling") or not hasattr(vae, "tile_latent_min_size"):
        return None
    return int(vae.tile_latent_min_size)


def untiled_decode_bytes(vae, latent_shape: tuple[int, ...]) -> int:
    """Rough peak bytes of an untiled decode of latents `latent_shape` (B, C, h, w): the decoder's
    widest full-resolution activations, several alive at once (the constant is measured, see above)."""
    batch, _, h, w = latent_shape
    f = vae_scale_factor(vae)
    channels = int(vae.config.block_out_channels[0])
    itemsize = torch.empty(0, dtype=vae.dtype).element_size()
    return _ACTIVATIONS_PER_ELEMENT * batch * channels * (h * f) * (w * f) * itemsize


def auto_tiling(vae, latent_shape: tuple[int, ...]) -> bool:
    """What `tiling=None` chooses for latents of `latent_shape` (B, C, h, w): tile when the latents
    are at least AUTO_TILE_SIDES tiles on a side and the untiled decode would need AUTO_TILE_BYTES."""
    tile = _tile_latent_side(vae)
    if tile is None or tile < 1:
        return False
    big = max(latent_shape[-2:]) >= AUTO_TILE_SIDES * tile
    return big and untiled_decode_bytes(vae, latent_shape) >= AUTO_TILE_BYTES


def check_tiling(tiling) -> bool | None:
    """None (automatic), True or False; anything else (e.g. the string "on") is a TypeError."""
    if tiling is not None and not isinstance(tiling, bool):
        raise TypeError(f"vae_tiling must be None (automatic), True or False, got {type(tiling).__name__} {tiling!r}")
    return tiling


@contextmanager
def _tiling_state(vae, enabled: bool) -> Iterator[None]:
    """The VAE's tiling switch, set for one call and put back: the caller's VAE is unchanged."""
    if _tile_latent_side(vae) is None:
        if enabled:
            raise ValueError(f"vae_tiling=True needs a VAE with tiling (AutoencoderKL); "
                             f"{type(vae).__name__} has none. Pass vae_tiling=None or False")
        yield
        return
    previous = vae.use_tiling
    vae.use_tiling = enabled
    try:
        yield
    finally:
        vae.use_tiling = previous


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, *, tiling: bool | None = None) -> torch.Tensor:
    """Latents (B, C, h, w) -> images (B, 3, H, W) in about [-1, 1].

    tiling: None chooses (`auto_tiling`: on for latents of 2+ VAE tiles a side whose untiled decode
    would need 1 GB or more), True / False force it. Tiling is diffusers' scheme (overlapping tiles of
    the VAE's `tile_latent_min_size`, blended: vae/tiling.py), so tiled images differ slightly near the
    tile seams.
    A low-precision decode that overflows (non-finite pixels) is redone in fp32 with a
    warning, so a black image is never returned silently.
    """
    tiling = check_tiling(tiling)
    if tiling is None:
        tiling = auto_tiling(vae, tuple(latents.shape))
    z = latents.to(vae.dtype) / vae.config.scaling_factor + _shift(vae)
    with _tiling_state(vae, tiling):
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
def encode_images(vae, images: torch.Tensor, *, generator=None, sample: bool = True,
                  tiling: bool | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> scaled latents, sampling the posterior as diffusers' img2img does.

    tiling: as in `decode_latents` (the encoder's activations mirror the decoder's, so the same
    automatic rule is applied to the latents this image will have)."""
    tiling = check_tiling(tiling)
    if tiling is None:
        f = vae_scale_factor(vae)
        b, _, h, w = images.shape
        tiling = auto_tiling(vae, (b, int(vae.config.latent_channels), h // f, w // f))
    images = images.to(device=vae.device, dtype=vae.dtype)
    with _tiling_state(vae, tiling):
        if sample and isinstance(generator, (list, tuple)):
            if len(generator) != images.shape[0]:
                raise ValueError(f"got {len(generator)} generators for {images.shape[0]} images; pass one per image")
            # each image alone through the encoder with its own generator, as diffusers' img2img does
            # (sampling a batch posterior with generator i and keeping row i draws other numbers)
            z = torch.cat([vae.encode(images[i : i + 1]).latent_dist.sample(generator=g)
                           for i, g in enumerate(generator)])
        else:
            dist = vae.encode(images).latent_dist
            z = dist.sample(generator=generator) if sample else dist.mode()
    return (z - _shift(vae)) * vae.config.scaling_factor
