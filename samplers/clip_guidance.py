"""CLIP guidance as in GLIDE (Nichol et al. 2022, sec. 2.3), for latent diffusion.

At every denoiser call: decode the x0 estimate with the VAE, take random cutouts, embed them
with CLIP and shift the x0 estimate along the gradient (w.r.t. the latents) of the cosine
similarity to the prompt's CLIP text embedding. Adding s * grad log p(c | x) to the score
(D - x) / sigma^2 is the same as adding s * sigma^2 * grad to D, so the wrapper is a denoiser
and works with every solver. The autograd graph lives only inside one call.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .denoiser import append_dims, sigma_batch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(out: Any) -> torch.Tensor:
    """Embeddings from get_text/image_features: a tensor, or (transformers 5) an output whose pooler_output holds them."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(out, (tuple, list)) and len(out) > 1 and isinstance(out[1], torch.Tensor):
        return out[1]
    raise TypeError(f"expected embeddings (a tensor or an output with pooler_output), got {type(out).__name__}")


def make_cutouts(images: torch.Tensor, *, cut_size: int, num_cutouts: int, cut_power: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (num_cutouts * B, C, cut_size, cut_size): random square crops, average-pooled.

    Sizes and offsets are drawn once per cutout and shared by the batch, so each sample's
    cutouts do not depend on the batch it is in.
    """
    _, _, H, W = images.shape
    max_size = min(H, W)
    min_size = min(max_size, cut_size)
    cuts = []
    for _ in range(num_cutouts):
        size = int(torch.rand((), generator=generator) ** cut_power * (max_size - min_size) + min_size)
        ox = int(torch.randint(0, W - size + 1, (), generator=generator))
        oy = int(torch.randint(0, H - size + 1, (), generator=generator))
        crop = images[:, :, oy:oy + size, ox:ox + size]
        cuts.append(F.interpolate(crop, size=(cut_size, cut_size), mode="bilinear", align_corners=False)
                    if size < cut_size else F.adaptive_avg_pool2d(crop, cut_size))
    return torch.cat(cuts)


class CLIPGuidance:
    """Wrap `denoiser(x, sigma, **cond) -> x0` with CLIP guidance toward a prompt.

    clip_model: a transformers `CLIPModel`, or any model with `get_text_features(**text_inputs)`
        and `get_image_features(pixel_values=...)`.
    text_features (B or 1, E) or text_inputs (the tokenizer's output for the prompt): the target.
    decode: latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1] (e.g. the VAE decoder with the
        latent scaling factor); it must be differentiable.
    scale: guidance strength; num_cutouts, cut_size (default: the vision config's image size),
    cut_power: cutout sampling; generator: a CPU generator for the cutouts (kept separate from the
    sampler's so the noise stream stays diffusers'). through_denoiser=True takes the gradient
    through the denoiser (GLIDE, exact); False takes it w.r.t. the x0 estimate and weights it by
    sigma^2 / (sigma^2 + 1) (cheaper: no backward pass through the UNet).
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], *, clip_model: Any,
                 decode: Callable[[torch.Tensor], torch.Tensor], scale: float,
                 text_features: torch.Tensor | None = None, text_inputs: dict[str, torch.Tensor] | None = None,
                 num_cutouts: int = 4, cut_size: int | None = None, cut_power: float = 1.0,
                 image_mean: tuple[float, ...] = CLIP_MEAN, image_std: tuple[float, ...] = CLIP_STD,
                 generator: torch.Generator | None = None, through_denoiser: bool = True):
        for name in ("get_text_features", "get_image_features"):
            if not callable(getattr(clip_model, name, None)):
                raise TypeError(f"clip_model must have a {name}() method; got {type(clip_model).__name__}")
        if (text_features is None) == (text_inputs is None):
            raise ValueError("pass exactly one of text_features or text_inputs")
        if num_cutouts < 1:
            raise ValueError(f"num_cutouts must be >= 1, got {num_cutouts}")
        if text_features is None:
            with torch.no_grad():
                text_features = _features(clip_model.get_text_features(**text_inputs))
        if cut_size is None:
            vision = getattr(getattr(clip_model, "config", None), "vision_config", None)
            cut_size = int(getattr(vision, "image_size", 224))
        self.denoiser = denoiser
        self.clip_model = clip_model
        self.decode = decode
        self.scale = float(scale)
        self.text_features = F.normalize(text_features.detach().float(), dim=-1)  # (B or 1, E)
        self.num_cutouts = num_cutouts
        self.cut_size = cut_size
        self.cut_power = cut_power
        self.image_mean = torch.tensor(image_mean).view(1, -1, 1, 1)
        self.image_std = torch.tensor(image_std).view(1, -1, 1, 1)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.through_denoiser = through_denoiser

    def similarity(self, images: torch.Tensor) -> torch.Tensor:
        """(B,) mean cosine similarity between the prompt and cutouts of images in [-1, 1]."""
        b = images.shape[0]
        cuts = make_cutouts((images + 1) / 2, cut_size=self.cut_size, num_cutouts=self.num_cutouts,
                            cut_power=self.cut_power, generator=self.generator)
        pixels = (cuts - self.image_mean.to(cuts)) / self.image_std.to(cuts)
        image_features = F.normalize(_features(self.clip_model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        text = self.text_features.to(image_features.device)
        if text.shape[0] not in (1, b):
            raise ValueError(f"text_features has batch {text.shape[0]}, expected 1 or {b}")
        text = text.expand(b, -1).repeat(self.num_cutouts, 1)  # (num_cutouts * B, E), cutout-major like cuts
        return (image_features * text).sum(-1).view(self.num_cutouts, b).mean(0)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        sigma = sigma_batch(sigma, x)  # (B,)
        with torch.enable_grad():
            if self.through_denoiser:
                leaf = x.detach().requires_grad_(True)
                x0 = self.denoiser(leaf, sigma, **cond)
                target = x0
            else:
                with torch.no_grad():
                    x0 = self.denoiser(x, sigma, **cond)
                leaf = x0.detach().requires_grad_(True)
                target = leaf
            sim = self.similarity(self.decode(target))
            (grad,) = torch.autograd.grad(sim.sum(), leaf)
        s2 = append_dims(sigma, x.ndim) ** 2
        weight = s2 if self.through_denoiser else s2 / (s2 + 1)
        return x0.detach() + self.scale * weight * grad.detach()
