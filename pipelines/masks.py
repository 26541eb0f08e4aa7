"""Inpainting masks: the accepted forms, the latent-grid mask, and the feathered paste-back.

White (1) = repaint, black (0) = keep. Accepted forms (a list of any of them makes a batch):
- PIL images of mode L, 1, P, LA, RGB or RGBA. RGB is turned to gray with PIL's luma (as
  diffusers does); LA / RGBA are gray times alpha, so transparent pixels are kept;
- numpy arrays (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (same rules as PIL's modes);
- torch tensors (H, W), (1, H, W) or (B, 1, H, W).
Integer dtypes are 0-255, bool is 0/1, float is 0-1, or 0-255 when its largest value is above 1.
The mask is binarized at 0.5 (diffusers' rule); a mask of another size than the image is an
error, not resized (a mask made for another image is a mistake more often than not).

The seam at the latent grid (8 pixels in Stable Diffusion) is handled twice: the latent mask
is dilated (a latent touching any repainted pixel, and its neighbours, is repainted), and the
result is blended with the original in pixel space through a mask feathered *inward*: 1 deep
inside the mask, falling to 0 at its edge, 0 outside, so the pixels outside the mask come back
exactly as they were.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_PIL_MODES = ("L", "1", "P", "LA", "RGB", "RGBA")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's RGB -> L


def mask_to_tensor(mask_image: Any) -> torch.Tensor:
    """Any accepted form -> (n, 1, H, W) float32 in [0, 1] (not yet binarized), on CPU."""
    items = list(mask_image) if isinstance(mask_image, (list, tuple)) else [mask_image]
    if not items:
        raise ValueError("mask_image is an empty list; pass at least one mask")
    masks = [_one(item) for item in items]
    sizes = {tuple(m.shape[2:]) for m in masks}
    if len(sizes) > 1:
        raise ValueError(f"the masks in mask_image have different sizes {sorted(sizes)}; give them one size")
    return torch.cat(masks)


def _one(item: Any) -> torch.Tensor:
    if isinstance(item, Image.Image):
        if item.mode not in _PIL_MODES:
            raise ValueError(f"mask_image: PIL mode {item.mode!r} is not accepted; use one of {_PIL_MODES}")
        if item.mode in ("LA", "RGBA"):
            array = np.asarray(item.convert("RGBA"))
            gray = np.asarray(item.convert("RGB").convert("L"), dtype=np.float32) / 255.0
            return torch.from_numpy(gray * (array[..., 3].astype(np.float32) / 255.0))[None, None]
        gray = np.asarray(item.convert("L"), dtype=np.float32) / 255.0
        return torch.from_numpy(gray)[None, None]
    if isinstance(item, np.ndarray):
        if item.ndim == 3 and item.shape[-1] in (1, 3, 4):
            values = _unit(torch.from_numpy(np.ascontiguousarray(item)))
            gray = values[..., :1] if item.shape[-1] == 1 else _luma(values[..., :3])
            if item.shape[-1] == 4:
                gray = gray * values[..., 3:4]
            return gray.permute(2, 0, 1)[None]
        if item.ndim == 2:
            return _unit(torch.from_numpy(np.ascontiguousarray(item)))[None, None]
        raise ValueError(f"mask_image: a numpy mask must be (H, W) or (H, W, 1|3|4), got shape {item.shape}")
    if torch.is_tensor(item):
        mask = item.detach().cpu()
        if mask.ndim == 2:
            mask = mask[None, None]
        elif mask.ndim == 3 and mask.shape[0] == 1:
            mask = mask[None]
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(f"mask_image: a tensor mask must be (H, W), (1, H, W) or (B, 1, H, W), "
                             f"got {tuple(item.shape)}")
        return _unit(mask)
    raise TypeError(f"mask_image must be a PIL image, a numpy array, a torch tensor or a list of them, "
                    f"got {type(item).__name__}")


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 1) gray, PIL's weights."""
    weights = rgb.new_tensor(_LUMA)
    return (rgb * weights).sum(-1, keepdim=True)


def _unit(values: torch.Tensor) -> torch.Tensor:
    """Mask values -> float32 in [0, 1]: bool 0/1, integers 0-255, floats 0-1 (or 0-255 if above 1)."""
    if values.dtype == torch.bool:
        return values.float()
    if values.is_floating_point() and not torch.isfinite(values).all():  # NaN passes every comparison below
        raise ValueError("mask_image values must be finite numbers, got NaN or inf")
    if not values.is_floating_point():
        values = values.to(torch.int64)  # uint16 / uint32 have no min() in torch
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 255:
        raise ValueError(f"mask_image values must be in 0-1 or 0-255, got {low:.3g}..{high:.3g}")
    if not values.is_floating_point() or high > 1.0:
        return values.float() / 255.0
    return values.float()


def binarize(mask: torch.Tensor) -> torch.Tensor:
    """1 where mask >= 0.5 (repaint), else 0: diffusers' `do_binarize`."""
    return (mask >= 0.5).to(mask.dtype)


def check_mask_size(mask: torch.Tensor, pixels: torch.Tensor) -> None:
    if mask.shape[2:] != pixels.shape[2:]:
        mh, mw = mask.shape[2:]
        ih, iw = pixels.shape[2:]
        raise ValueError(f"mask_image is {mw}x{mh} but image is {iw}x{ih}; give a mask of the image's size "
                         "(latentloom does not resize masks)")


def nearest_latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(n, 1, H, W) -> (n, 1, H/f, W/f) by nearest sampling: what SD-inpainting UNets were trained on
    (diffusers' `prepare_mask_latents`), so the 9-channel conditioning uses exactly this."""
    return F.interpolate(mask, size=(mask.shape[2] // factor, mask.shape[3] // factor))


def dilated_latent_mask(mask: torch.Tensor, factor: int, *, grow: int = 1) -> torch.Tensor:
    """(n, 1, H, W) binary -> (n, 1, H/f, W/f): 1 for every latent whose f x f cell holds any repainted
    pixel, grown by `grow` latents, so no repainted pixel is decoded from a kept latent."""
    latent = F.max_pool2d(mask, kernel_size=factor, stride=factor)
    for _ in range(grow):
        latent = F.max_pool2d(latent, kernel_size=3, stride=1, padding=1)
    return latent


def feathered(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary (n, 1, H, W) -> soft mask: exactly 0 outside the mask, 1 / (radius + 1) on its edge, rising
    by that much per pixel inward, 1 from `radius + 1` pixels in (the mean of the mask eroded 0..radius
    times by a 3 x 3 square, so it never reaches outside the mask)."""
    total, eroded = mask.clone(), mask
    for _ in range(max(0, radius)):
        # max-pool pads with -inf: the image border counts as mask, so a mask touching it stays 1 there
        eroded = -F.max_pool2d(-eroded, kernel_size=3, stride=1, padding=1)
        total = total + eroded
    return total / (max(0, radius) + 1)


def paste_onto(generated: np.ndarray, original: np.ndarray, soft: np.ndarray) -> np.ndarray:
    """Blend (B, H, W, 3) images in [0, 1]: the original where soft == 0 (bit for bit), the generated
    image where soft == 1, a linear mix between."""
    mixed = original * (1.0 - soft) + generated * soft
    return np.where(soft == 0.0, original, mixed).astype(np.float32)
