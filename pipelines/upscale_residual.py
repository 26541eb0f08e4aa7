"""A residual upscaler: the UNet learns the image minus the bicubic enlargement of its low-res input.

Where the learned correction is zero the result is plain bicubic enlargement, so the network only
has edges left to learn (a pixel-space upscaler of the shapes domain that learned whole images
stayed near 22 dB after 16k samples; bicubic alone scores 34.8 dB on unseen scenes; how far the
residual models got is in weights/README.md). Set in training by `latentloom train --model upscaler
--vae pixel-shuffle --residual`; the exported model_index.json says `"residual": "bicubic"`, and
`pipe.upscale` adds the base back after decoding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RESIDUAL_BASES = ("bicubic",)
# Bicubic's error on the shapes domain has an RMS of 0.029 in [-1, 1] pixels (edges up to 0.9): the
# latents are that error x 32, near the unit variance the training noise schedule is built for. At
# x 8 (RMS 0.23) the v target is almost all noise at most timesteps, and models never learned to read
# the low-res image in 1000-1250 steps; at x 32 (with --x0-weighting) one did by step 1000.
RESIDUAL_SCALE = 32.0


def residual_base(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, h, w) low-res pixels in [-1, 1] -> (B, 3, H, W) bicubic enlargement, in float32."""
    return F.interpolate(low.float(), size=size, mode="bicubic", align_corners=False)


def check_residual(value: object, source: object) -> str | None:
    """The model index's "residual" entry: None, or one of RESIDUAL_BASES."""
    if value is None or value in RESIDUAL_BASES:
        return value
    raise ValueError(f"{source}: residual={value!r} is not one of {RESIDUAL_BASES} (or absent)")
