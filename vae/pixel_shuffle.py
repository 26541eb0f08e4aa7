"""A lossless, weightless stand-in for the VAE: pixels <-> space-to-depth "latents".

`encode` folds each f x f block of pixels into channels ((B, 3, H, W) -> (B, 3f^2, H/f, W/f)),
`decode` unfolds them. A UNet on these latents is pixel-space diffusion at 1/f the side (the
"patching" of Hoogeboom et al. 2023, simple diffusion), so a pixel-space super-resolution
stage runs through the same SD-x4-style upscale pipeline and training task as a latent one.

Why it exists: a learned VAE caps what a latent upscaler can reach. The bundled shapes
domain is flat colors with sharp edges, where bicubic 64 -> 128 px already scores 34.5 dB PSNR
against the true render (PIL's; torch's, the residual upscaler's base, 34.8 dB: weights/README.md), while small learned factor-2 VAEs trained here reconstructed 128-px
images at only 29-30 dB; space-to-depth is exact, so the UNet alone decides the quality.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

CLASS_NAME = "PixelShuffleVAE"


@dataclass(frozen=True)
class PixelShuffleConfig:
    """What the pipelines read from a VAE config. scaling_factor 1: pixels in [-1, 1] are the latents."""

    downsample_factor: int
    latent_channels: int
    scaling_factor: float = 1.0
    shift_factor: float | None = None
    force_upcast: bool = False


class _Posterior:
    """The encoder's output in diffusers' shape: a point mass, so mode() and sample() agree."""

    def __init__(self, latents: torch.Tensor) -> None:
        self.latents = latents

    def mode(self) -> torch.Tensor:
        return self.latents

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents


class PixelShuffleVAE(nn.Module):
    """`PixelShuffleVAE(factor)`: encode / decode as diffusers' AutoencoderKL is called
    (`encode(x).latent_dist`, `decode(z).sample`), exactly invertible, no weights.

    scaling_factor: what the pipelines multiply latents by after encoding (as for a learned VAE);
    above 1 for signals much smaller than [-1, 1], e.g. an upscaler's residual over bicubic."""

    def __init__(self, factor: int = 2, *, scaling_factor: float = 1.0) -> None:
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2 or factor & (factor - 1):
            raise ValueError(f"factor must be a power of two >= 2 (2, 4, 8, ...), got {factor!r}")
        if not isinstance(scaling_factor, (int, float)) or isinstance(scaling_factor, bool) or not scaling_factor > 0:
            raise ValueError(f"scaling_factor must be a number > 0, got {scaling_factor!r}")
        self.config = PixelShuffleConfig(downsample_factor=factor, latent_channels=3 * factor * factor,
                                         scaling_factor=float(scaling_factor))
        # No weights; this buffer carries the module's device and dtype for `.to()` and `.dtype`.
        self.register_buffer("anchor", torch.zeros(()), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def encode(self, images: torch.Tensor) -> SimpleNamespace:
        f = self.config.downsample_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"image sides must be multiples of {f}, got {tuple(images.shape[-2:])}")
        return SimpleNamespace(latent_dist=_Posterior(F.pixel_unshuffle(images, f)))

    def decode(self, latents: torch.Tensor) -> SimpleNamespace:
        if latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected {self.config.latent_channels} latent channels, got {latents.shape[1]}")
        return SimpleNamespace(sample=F.pixel_shuffle(latents, self.config.downsample_factor))

    def save_pretrained(self, folder: str | Path, **_: object) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": CLASS_NAME, **asdict(self.config)}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_config_dict(cls, config: dict) -> "PixelShuffleVAE":
        factor = config.get("downsample_factor")
        vae = cls(factor, scaling_factor=config.get("scaling_factor", 1.0))
        if config.get("latent_channels", vae.config.latent_channels) != vae.config.latent_channels:
            raise ValueError(f"a factor-{factor} pixel shuffle has {vae.config.latent_channels} latent channels, "
                             f"the config says {config['latent_channels']}")
        return vae


def is_pixel_shuffle(vae: object) -> bool:
    return isinstance(vae, PixelShuffleVAE)


def is_pixel_shuffle_folder(folder: str | Path) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("_class_name") == CLASS_NAME
    except (json.JSONDecodeError, AttributeError):
        return False


def load_pixel_shuffle(folder: str | Path) -> PixelShuffleVAE:
    return PixelShuffleVAE.from_config_dict(json.loads((Path(folder) / "config.json").read_text()))


def factor_for(resolution: int, low_resolution: int) -> int:
    """The pixel-shuffle factor of an upscaler from low_resolution to resolution (a power of two)."""
    factor = resolution // low_resolution if low_resolution > 0 else 0
    if factor * low_resolution != resolution or factor < 2 or factor & (factor - 1):
        raise ValueError(f"a pixel-shuffle upscaler needs resolution = low_resolution x 2, 4, 8, ...; "
                         f"got resolution={resolution}, low_resolution={low_resolution}")
    return factor
