"""A residual upscaler: the UNet learns the image minus the bicubic enlargement of its low-res input.

Where the learned correction is zero the result is plain bicubic enlargement, so the network only
has edges left to learn (the runs that led here, whole-image and residual, are in weights/README.md).
Set in training by `latentloom train --model upscaler
--vae pixel-shuffle --residual`; the exported model_index.json says `"residual": "bicubic"`, and
`pipe.upscale` adds the base back after decoding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RESIDUAL_BASES = ("bicubic",)
# Bicubic's error on the shapes domain has an RMS of 0.029 in [-1, 1] pixels: x 32 brings it near the
# unit variance the training noise schedule is built for (why x 8 failed: weights/README.md).
RESIDUAL_SCALE = 32.0


def residual_base(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, h, w) low-res pixels in [-1, 1] -> (B, 3, H, W) bicubic enlargement, in float32."""
    return F.interpolate(low.float(), size=size, mode="bicubic", align_corners=False)


def check_residual(value: object, source: object) -> str | None:
    """The model index's "residual" entry: None, or one of RESIDUAL_BASES."""
    if value is None or value in RESIDUAL_BASES:
        return value
    raise ValueError(f"{source}: residual={value!r} is not one of {RESIDUAL_BASES} (or absent)")
