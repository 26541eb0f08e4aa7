"""Guidance wrappers: classifier-free guidance (Ho & Salimans 2022) with guidance rescale (Lin et al.
2023, Alg. 2), and the inpainting blend that keeps a known region.

Each takes a denoiser and is a denoiser, so it works with every solver.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .denoiser import Denoiser, sigma_batch
from .forward import add_noise

_COND_KEYS = ("context", "context_mask", "class_labels", "concat", "y")


def _batch(v: torch.Tensor, b: int, name: str) -> torch.Tensor:
    if v.shape[0] == b:
        return v
    if v.shape[0] == 1:
        return v.expand(b, *v.shape[1:])
    raise ValueError(f"{name} has batch {v.shape[0]}, expected {b} (or 1 to share it)")


def merge_cond(uncond: dict[str, Any], cond: dict[str, Any], b: int) -> dict[str, Any]:
    """Stack uncond then cond along the batch (diffusers' [uncond, cond] order).

    Contexts of different length L are zero-padded to the longer one; a padded side then gets a
    context_mask (1 = real token) so attention can ignore the padding.
    """
    for d, side in ((uncond, "uncond"), (cond, "cond")):
        unknown = set(d) - set(_COND_KEYS)
        if unknown:
            raise ValueError(f"{side} has unknown keys {sorted(unknown)}; accepted: {_COND_KEYS}")
    if (set(uncond) ^ set(cond)) - {"context_mask"}:
        raise ValueError(f"cond and uncond must hold the same keys, got {sorted(cond)} and {sorted(uncond)}")
    out: dict[str, Any] = {}
    if "context" in cond:
        cu, cc = _batch(uncond["context"], b, "uncond context"), _batch(cond["context"], b, "cond context")  # (B, L, D)
        if cu.shape[2] != cc.shape[2]:
            raise ValueError(f"cond and uncond contexts differ in width: {cc.shape[2]} vs {cu.shape[2]}")
        L = max(cu.shape[1], cc.shape[1])
        out["context"] = torch.cat([F.pad(cu, (0, 0, 0, L - cu.shape[1])), F.pad(cc, (0, 0, 0, L - cc.shape[1]))])
        if cu.shape[1] != cc.shape[1] or "context_mask" in uncond or "context_mask" in cond:
            masks = []
            for c, d in ((cu, uncond), (cc, cond)):
                m = d.get("context_mask")
                m = c.new_ones(c.shape[:2], dtype=torch.long) if m is None else _batch(m, b, "context_mask")
                masks.append(F.pad(m.long(), (0, L - c.shape[1])))  # (B, L), 0 over the padding
            out["context_mask"] = torch.cat(masks)
    for key in ("class_labels", "concat", "y"):  # y: SDXL's vector, its own per side (negative sizes)
        if key in cond:
            out[key] = torch.cat([_batch(uncond[key], b, f"uncond {key}"), _batch(cond[key], b, f"cond {key}")])
    return out


def rescale_guidance(guided: torch.Tensor, cond_out: torch.Tensor, rescale: float) -> torch.Tensor:
    """Match the per-sample std of the guided output to the conditional one, blended by `rescale` (Lin et al. 2023)."""
    dims = tuple(range(1, guided.ndim))
    std_cond = cond_out.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1 - rescale) * guided


class CFGDenoiser:
    """x0 = D_u + scale * (D_c - D_u) from ONE batched forward of 2B samples.

    cond / uncond: dicts with `context` (B, L, D) (cond and uncond L may differ), optional
    `context_mask`, `class_labels`, `concat`. Wrapping a `Denoiser`, guidance and rescale act on
    the network's own output (eps or v), as diffusers does; wrapping any other denoiser, on x0.
    With scale == 1 only the conditional half is run.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], *, cond: dict[str, Any], uncond: dict[str, Any],
                 scale: float, rescale: float = 0.0):
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale must be in [0, 1], got {rescale}")
        self.denoiser = denoiser
        self.cond = dict(cond)
        self.uncond = dict(uncond)
        self.scale = float(scale)
        self.rescale = float(rescale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        b = x.shape[0]
        sigma = sigma_batch(sigma, x)  # (B,)
        if self.scale == 1.0:
            cond = {k: _batch(v, b, k) for k, v in self.cond.items()}
            return self.denoiser(x, sigma, **cond)
        both = merge_cond(self.uncond, self.cond, b)
        x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])  # (2B, ...), (2B,)
        raw = isinstance(self.denoiser, Denoiser)
        out = self.denoiser.predict(x_in, sigma_in, **both) if raw else self.denoiser(x_in, sigma_in, **both)
        out_u, out_c = out.chunk(2)
        guided = out_u + self.scale * (out_c - out_u)
        if self.rescale > 0:
            guided = rescale_guidance(guided, out_c, self.rescale)
        return self.denoiser.to_x0(x, sigma, guided) if raw else guided


class InpaintBlend:
    """A denoiser that keeps the known region (mask 0) of `x0` (Lugmayr et al. 2022, RePaint, without
    resampling): before each model call but the first, the known region of x is replaced by x0 noised
    to the current sigma with the run's own noise; after every call, the denoised known region is x0.

    The first call takes x as the sampler starts it (pure noise at full strength, x0 noised everywhere
    below it): with single-step and multistep samplers, whose updates act pixel by pixel, this is
    diffusers' 4-channel inpainting, which blends x0 noised to the next timestep in after each step.

    x0, noise: (B, C, h, w); mask: (B, 1, h, w), 1 = repaint. Works with every sampler.
    """

    def __init__(self, denoiser: Callable, *, x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor):
        if x0.shape != noise.shape or mask.shape[0] != x0.shape[0] or mask.shape[2:] != x0.shape[2:]:
            raise ValueError(f"x0 {tuple(x0.shape)}, noise {tuple(noise.shape)} and mask {tuple(mask.shape)} "
                             "must share batch and spatial size")
        self.denoiser = denoiser
        self.x0, self.noise, self.mask = x0, noise, mask
        self.first = True

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        if not self.first:
            x = torch.lerp(add_noise(self.x0, self.noise, sigma), x, self.mask)
        self.first = False
        denoised = self.denoiser(x, sigma)
        return torch.lerp(self.x0, denoised, self.mask)
