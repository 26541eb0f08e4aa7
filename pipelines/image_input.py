"""Input images for img2img / inpaint / upscale: PIL, numpy or torch -> one float tensor.

Accepted forms (a list of any of them makes a batch; all must have one size):
- PIL images of any mode PIL can convert to RGB;
- numpy arrays (H, W, 3) / (H, W, 4, alpha dropped) / (H, W) gray, or a batch (B, H, W, 3):
  integer dtypes are 0-255, float dtypes 0-1 (what `output_type="np"` returns);
- torch tensors (3, H, W) or (B, 3, H, W), float in 0-1 (integer dtypes 0-255).
The result is (n, 3, H, W) float32 in [0, 1]; `to_model_range` gives diffusers' [-1, 1].
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from PIL import Image

from latentloom.pipelines.arguments import check_size
from latentloom.vae.codec import encode_images, vae_scale_factor


def images_to_tensor(image: Any, *, name: str = "image") -> torch.Tensor:
    """Any accepted form -> (n, 3, H, W) float32 in [0, 1] (on CPU)."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError(f"{name} is an empty list; pass at least one image")
    tensors = [_one(item, name) for item in items]
    sizes = {tuple(t.shape[2:]) for t in tensors}
    if len(sizes) > 1:
        raise ValueError(f"the images in {name} have different sizes {sorted(sizes)}; give them one size")
    return torch.cat(tensors)


def _one(item: Any, name: str) -> torch.Tensor:
    if isinstance(item, Image.Image):
        # u8 / 255 in float32, as diffusers' VaeImageProcessor, so the pixels are bit-identical
        array = np.asarray(item.convert("RGB")).astype(np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)[None]
    if isinstance(item, np.ndarray):
        array = item
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] not in (3, 4):
            raise ValueError(f"{name}: a numpy image must be (H, W), (H, W, 3|4) or (B, H, W, 3|4), "
                             f"got shape {item.shape}")
        pixels = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(0, 3, 1, 2)
        return _to_unit(pixels, name)
    if torch.is_tensor(item):
        pixels = item.detach().cpu()
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"{name}: a tensor image must be (3, H, W) or (B, 3, H, W), got {tuple(item.shape)}")
        return _to_unit(pixels, name)
    raise TypeError(f"{name} must be a PIL image, a numpy array, a torch tensor or a list of them, "
                    f"got {type(item).__name__}")


def _to_unit(pixels: torch.Tensor, name: str) -> torch.Tensor:
    if pixels.dtype == torch.bool:
        return pixels.float()
    if not pixels.is_floating_point():
        pixels = pixels.to(torch.int64)  # uint16 / uint32 have no min() in torch
        if int(pixels.min()) < 0 or int(pixels.max()) > 255:
            raise ValueError(f"{name}: integer pixels must be in 0-255, got {int(pixels.min())}..{int(pixels.max())}")
        return pixels.float() / 255.0
    pixels = pixels.float()
    if not torch.isfinite(pixels).all():  # NaN passes every comparison below
        raise ValueError(f"{name}: pixels must be finite numbers, got NaN or inf")
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"{name}: float pixels must be in [0, 1] (integers: 0-255), got {low:.3g}..{high:.3g}; "
                         "for [-1, 1] data pass (x + 1) / 2")
    return pixels


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] with diffusers' arithmetic (2x - 1)."""
    return 2.0 * pixels - 1.0


def check_image_size(pipe, pixels: torch.Tensor, *, name: str = "image") -> tuple[int, int]:
    """(height, width) of the images; they must suit the VAE (no silent resizing)."""
    height, width = int(pixels.shape[2]), int(pixels.shape[3])
    try:
        return check_size(pipe, height, width)
    except ValueError as err:
        raise ValueError(f"{name} is {width}x{height}: {err}; resize the image first") from None


def per_prompt_images(pixels: torch.Tensor, n_prompts: int, *, name: str = "image") -> torch.Tensor:
    """One image for all prompts, or one per prompt."""
    if pixels.shape[0] not in (1, n_prompts):
        raise ValueError(f"got {pixels.shape[0]} images in {name} for {n_prompts} prompts; pass one, "
                         "or one per prompt")
    return pixels


def expand_to_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(n, ...) -> (batch, ...) with each row repeated batch // n times, prompt-major like the prompts."""
    return x.repeat_interleave(batch // x.shape[0], dim=0)


def encode_for_batch(vae, images: torch.Tensor, *, batch: int, generator: Any) -> torch.Tensor:
    """Scaled latents (batch, C, h, w) float32 of images (n, 3, H, W) in [-1, 1], sampling the posterior.

    One generator: the n images are encoded once and repeated, as diffusers does. A list
    (one per image of the batch, as `seed=` makes): row i is encoded with generator i, so an
    image made in a batch equals the image made alone.
    """
    if isinstance(generator, (list, tuple)) and len(generator) > 1:
        # each row alone through the encoder, as diffusers: sampling a batch posterior with generator i
        # and keeping row i would draw other numbers than sampling row i alone
        rows = expand_to_batch(images, batch)
        return torch.cat([encode_images(vae, rows[i : i + 1], generator=g) for i, g in enumerate(generator)]).float()
    if isinstance(generator, (list, tuple)):
        generator = generator[0]
    return expand_to_batch(encode_images(vae, images, generator=generator).float(), batch)


def draw_as_encode_for_batch(vae, images: torch.Tensor, *, batch: int, generator: Any) -> None:
    """Advance the generator(s) exactly as `encode_for_batch(vae, images, ...)` would (its posterior
    samples), without encoding. diffusers' inpainting encodes the masked image even where a 4-channel
    UNet never reads it; drawing the same numbers keeps the later (ancestral) noise equal to its own."""
    if generator is None:
        return
    f = vae_scale_factor(vae)
    n, _, height, width = images.shape
    latent = (int(vae.config.latent_channels), height // f, width // f)
    if isinstance(generator, (list, tuple)) and len(generator) > 1:
        draws = [(g, 1) for g in generator]
    else:
        draws = [(generator[0] if isinstance(generator, (list, tuple)) else generator, n)]
    for g, rows in draws:
        torch.randn((rows, *latent), generator=g, device=g.device, dtype=vae.dtype)


def pixels_hash(pixels: torch.Tensor) -> str:
    """First 10 hex digits of the SHA-256 of the 8-bit pixels (recorded in the recipe)."""
    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()[:10]


def record_hashes(recipes: list[dict], pixels: torch.Tensor, key: str) -> list[dict]:
    """Store under `key` the hash of the input each image of the batch was made from."""
    hashes = [pixels_hash(p[None]) for p in pixels]
    per_input = len(recipes) // len(hashes)
    for i, recipe in enumerate(recipes):
        recipe[key] = hashes[i // per_input]
    return recipes
