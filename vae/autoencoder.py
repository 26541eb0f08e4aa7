"""latentloom's KL autoencoder: Stable Diffusion's VAE (Rombach et al. 2022), module for module
and name for name as diffusers' `AutoencoderKL`, so its folders and state dicts load unchanged.

The encoder maps images (B, 3, H, W) in [-1, 1] to the mean and log-variance of a diagonal
Gaussian over latents (B, C, H/f, W/f); the decoder maps latents back. Both are a stack of
GroupNorm-SiLU-conv residual blocks with one self-attention block in the middle. Only the runtime
lives here; training a VAE from scratch (`train --model vae`) uses diffusers' class, whose folders
this one reads.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from latentloom.vae.config import VAEConfig
from latentloom.vae.tiling import tiled_apply

_EPS = 1e-6  # every GroupNorm of SD's VAE
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=_EPS)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus the input (through a 1x1 conv where the width changes)."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class SelfAttention(nn.Module):
    """One head as wide as the feature map, over all H x W positions, with a residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return out + x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, *, attention: bool) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)] if attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """A stride-2 3x3 conv; the input is padded on the right and bottom only, as SD's VAE was trained."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder (resnets, then a downsampler) or decoder (resnets, then an upsampler)."""

    def __init__(self, widths: list[tuple[int, int]], groups: int, resample: nn.Module | None, *, down: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin, cout, groups) for cin, cout in widths])
        self._resample_name = "downsamplers" if down else "upsamplers"  # diffusers' state-dict names
        setattr(self, self._resample_name, nn.ModuleList([resample] if resample is not None else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for resample in getattr(self, self._resample_name):
            x = resample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, groups, n = cfg.block_out_channels, cfg.norm_num_groups, cfg.layers_per_block
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, width in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            last = i == len(ch) - 1
            widths = [(cin if j == 0 else width, width) for j in range(n)]
            self.down_blocks.append(Level(widths, groups, None if last else Downsample(width), down=True))
        self.mid_block = MidBlock(ch[-1], groups, attention=cfg.mid_block_add_attention)
        self.conv_norm_out = _norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, groups, n = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, cfg.layers_per_block
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.up_blocks = nn.ModuleList()  # registered before mid_block: diffusers' state-dict order
        self.mid_block = MidBlock(ch[0], groups, attention=cfg.mid_block_add_attention)
        for i, width in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            last = i == len(ch) - 1
            widths = [(cin if j == 0 else width, width) for j in range(n + 1)]
            self.up_blocks.append(Level(widths, groups, None if last else Upsample(width), down=False))
        self.conv_norm_out = _norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior over latents: mean and log-variance (clamped to [-30, 20]) per element."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std x noise; a generator on another device draws there and the noise is moved, so a
        CPU generator gives the same latents on any device."""
        where = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=where, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to the standard normal, summed per image: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


@dataclass
class EncoderOutput:
    latent_dist: DiagonalGaussian


@dataclass
class DecoderOutput:
    sample: torch.Tensor


class AutoencoderKL(nn.Module):
    """`encode(images).latent_dist` and `decode(latents).sample`, as diffusers' AutoencoderKL.

    Tiling (`use_tiling`, off by default; `latentloom.vae.codec` turns it on for large images): inputs
    larger than one tile (config.sample_size pixels, or that over the downsample factor in latents)
    are processed in tiles overlapping by a quarter, blended linearly across the overlap as diffusers
    does, so peak memory stays about one tile's.
    """

    tile_overlap_factor = 0.25

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        if not isinstance(config, VAEConfig):
            raise TypeError(f"AutoencoderKL takes a VAEConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None
        self.use_tiling = False

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def tile_sample_min_size(self) -> int:
        return self.config.sample_size

    @property
    def tile_latent_min_size(self) -> int:
        return self.config.tile_latent_size

    def enable_tiling(self, enabled: bool = True) -> None:
        self.use_tiling = bool(enabled)

    def disable_tiling(self) -> None:
        self.use_tiling = False

    # ------------------------------------------------------------------ encode / decode
    def _moments(self, images: torch.Tensor) -> torch.Tensor:
        h = self.encoder(images)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _pixels(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents if self.post_quant_conv is None else self.post_quant_conv(latents)
        return self.decoder(z)

    def encode(self, images: torch.Tensor) -> EncoderOutput:
        """Images (B, in_channels, H, W) -> the posterior over (B, latent_channels, H/f, W/f)."""
        _check_4d(images, self.config.in_channels, "images")
        if self.use_tiling and max(images.shape[-2:]) > self.tile_sample_min_size:
            return self.tiled_encode(images)
        return EncoderOutput(DiagonalGaussian(self._moments(images)))

    def decode(self, latents: torch.Tensor) -> DecoderOutput:
        """Latents (B, latent_channels, h, w) -> images (B, out_channels, h x f, w x f), about [-1, 1]."""
        _check_4d(latents, self.config.latent_channels, "latents")
        if self.use_tiling and max(latents.shape[-2:]) > self.tile_latent_min_size:
            return self.tiled_decode(latents)
        return DecoderOutput(self._pixels(latents))

    def tiled_encode(self, images: torch.Tensor) -> EncoderOutput:
        moments = tiled_apply(self._moments, images, tile=self.tile_sample_min_size, out_tile=self.tile_latent_min_size,
                              overlap=self.tile_overlap_factor)
        return EncoderOutput(DiagonalGaussian(moments))

    def tiled_decode(self, latents: torch.Tensor) -> DecoderOutput:
        pixels = tiled_apply(self._pixels, latents, tile=self.tile_latent_min_size, out_tile=self.tile_sample_min_size,
                             overlap=self.tile_overlap_factor)
        return DecoderOutput(pixels)

    def to_diffusers(self):
        """diffusers' AutoencoderKL with these weights (same names and config), in this dtype: for code that
        needs diffusers' class (its pipelines in benchmarks, `train --model vae`). Imports diffusers."""
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL

        config = {k: v for k, v in self.config.to_diffusers_config().items() if not k.startswith("_")}
        twin = DiffusersAutoencoderKL(**config)
        twin.load_state_dict(self.state_dict(), strict=True)
        return twin.to(dtype=self.dtype).eval()

    # ------------------------------------------------------------------ files
    def save_pretrained(self, folder: str | os.PathLike, *, safe_serialization: bool = True) -> None:
        """config.json + diffusion_pytorch_model.safetensors, the files diffusers' AutoencoderKL reads."""
        from safetensors.torch import save_file

        if not safe_serialization:
            raise ValueError("latentloom writes VAE weights as safetensors only (safe_serialization=True)")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_diffusers_config(), indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_NAME))


def _check_4d(x: torch.Tensor, channels: int, name: str) -> None:
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be (B, {channels}, H, W), got {shape}")
