"""What a pipeline call returns: decoded latents formatted as PIL images, arrays or latents, with recipes."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from latentloom.pipelines.metadata import save_png
from latentloom.vae.codec import decode_latents


@dataclass
class PipelineOutput:
    """`images`: PIL images, a float array (B, H, W, 3) in [0, 1], or latents, per `output_type`.
    `recipes`: one dict per image with everything needed to make it again (also written to PNGs)."""

    images: Any
    recipes: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: str | os.PathLike) -> list[Path]:
        """Write PIL images as PNGs with their recipe. `path` is a file for one image; with
        several, `name.png` becomes `name-0.png`, `name-1.png`, ..."""
        if not self.images or not hasattr(self.images[0], "save"):
            raise TypeError("save() needs PIL images: call the pipeline with output_type='pil'")
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise ValueError(f"images are written as PNG; give a path ending in .png, not {path.name!r}")
        if len(self.images) == 1:
            return [save_png(self.images[0], path, self.recipes[0])]
        return [
            save_png(image, path.with_name(f"{path.stem}-{i}{path.suffix}"), recipe)
            for i, (image, recipe) in enumerate(zip(self.images, self.recipes))
        ]


def images_to_numpy(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> float32 array (B, H, W, 3) in [0, 1] (diffusers' postprocess)."""
    return (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """Float (B, H, W, 3) in [0, 1] -> PIL images, rounding as diffusers does."""
    return [Image.fromarray(img) for img in (images * 255).round().astype("uint8")]


def latents_to_output(pipe, latents: torch.Tensor, output_type: str, *, vae_tiling: bool | None = None,
                      base: torch.Tensor | None = None):
    """Decode latents and format them as `output_type` ("pil", "np" or "latent"); `vae_tiling` as in
    `vae.decode_latents` (None: automatic); `base`: pixels in [-1, 1] added to the decoded ones (a
    residual upscaler's bicubic enlargement)."""
    if output_type == "latent":
        return latents
    pixels = decode_latents(pipe.vae, latents, tiling=vae_tiling)
    if base is not None:
        pixels = pixels.float() + base.to(pixels.device)
    array = images_to_numpy(pixels)
    return array if output_type == "np" else numpy_to_pil(array)
