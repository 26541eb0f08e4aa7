"""The architecture of a KL autoencoder, in the keys of diffusers' `AutoencoderKL` config.json.

A VAE folder written by diffusers (or by latentloom, which writes the same file) reads into
`VAEConfig.from_diffusers_config`; the values are reachable as attributes (`config.scaling_factor`)
and by key (`config["scaling_factor"]`), as code written against diffusers' config expects.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

# config.json bookkeeping that describes the file, not the model
_BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32  # pixel side of one tile when tiling
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # fp16 decodes of this VAE overflow; run it in fp32 (pipelines/runtime.py)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    act_fn: str = "silu"
    down_block_types: tuple[str, ...] | None = None  # None: DOWN_BLOCK at every level
    up_block_types: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        levels = len(self.block_out_channels)
        if levels < 1 or any(c < 1 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels must be one or more positive widths, got {self.block_out_channels}")
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        if self.act_fn != "silu":
            raise ValueError(f"act_fn {self.act_fn!r} is not supported (Stable Diffusion's VAEs use 'silu')")
        for name, kind in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            types = tuple(getattr(self, name) or (kind,) * levels)
            if len(types) != levels or set(types) != {kind}:
                raise ValueError(f"{name} must be {levels} x {kind!r} (one per width), got {list(types)}")
            setattr(self, name, types)
        if isinstance(self.sample_size, (list, tuple)):  # diffusers allows [h, w]; tiles use the first
            self.sample_size = int(self.sample_size[0])
        for name in ("latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(float(v) for v in getattr(self, name)))

    # ------------------------------------------------------------------ derived
    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for Stable Diffusion's four levels)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def tile_latent_size(self) -> int:
        """The latent side of one tile: the pixel tile (sample_size) over the downsample factor."""
        return int(self.sample_size / self.downsample_factor)

    # ------------------------------------------------------------------ mapping access
    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    # ------------------------------------------------------------------ diffusers config.json
    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], *, source: str = "the VAE config") -> VAEConfig:
        if not isinstance(config, dict):
            raise TypeError(f"{source} must be a JSON object, got {type(config).__name__}")
        known = set(cls().keys())
        values = {k: v for k, v in config.items() if k in known}
        unknown = sorted(k for k in config if k not in known and k not in _BOOKKEEPING)
        if unknown:
            warnings.warn(f"{source}: keys {unknown} are not AutoencoderKL settings latentloom knows; ignored",
                          stacklevel=2)
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err

    def to_diffusers_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"_class_name": "AutoencoderKL"}
        for key in self.keys():
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        return out
