"""Convolutional pieces of the UNet: timestep embedding, ResBlock, down/up sampling.

Parameter names follow diffusers' ``UNet2DConditionModel`` so that its state dict loads
without renaming (see convert.py for the few shape differences).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32 (DDPM / "Attention is all you need")."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    args = t[:, None].float() * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb  # (B, dim)


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal embedding (width 4 * channels[0]); with `cond_dim`,
    a condition (LCM's embedded guidance scale) is projected and added to the embedding first."""

    def __init__(self, in_dim: int, dim: int, *, cond_dim: int | None = None) -> None:
        super().__init__()
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim is not None else None
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            x = x + self.cond_proj(cond)
        return self.linear_2(F.silu(self.linear_1(x)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, timestep embedding added in between, residual shortcut."""

    def __init__(self, in_ch: int, out_ch: int, *, emb_dim: int, groups: int, eps: float,
                 dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W); emb_act = silu(time embedding) (B, emb_dim), shared by all blocks."""
        # In-place adds into fresh conv outputs (which no backward saves): on CPU every new
        # large tensor is a fresh mmap with page faults, so fewer allocations are faster.
        h = self.conv1(F.silu(self.norm1(x)))
        h += self.time_emb_proj(emb_act)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(skip)  # (B, C_out, H, W)


class Downsample(nn.Module):
    """Strided 3x3 conv: halves H and W (rounding up)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to the skip connection's size, then a 3x3 conv."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # `size` (not scale 2) so odd latent sizes line up with the down path's skips.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
