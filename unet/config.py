"""UNetConfig: every shape and switch of the denoiser, saved as JSON.

One dataclass, passed whole (nanoGPT's GPTConfig). Per-level fields accept one value for
all levels and are stored as lists, so ``to_dict`` / ``from_dict`` round-trips exactly.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentloom.file_io import write_bytes_atomic

_PER_LEVEL_INT = ("layers_per_level", "transformer_depth")
_PER_LEVEL_BOOL = ("attention_levels", "only_cross_attention")
_ADDED_LATER = ("adm_in_channels", "addition_time_embed_dim", "time_cond_proj_dim")


@dataclass
class UNetConfig:
    """Shapes and switches of the Stable-Diffusion-style UNet (defaults: SD 1.x)."""

    in_channels: int = 4  # 4 plain, 9 inpainting (mask + masked latents), 7 x4 upscaler
    out_channels: int = 4
    channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    layers_per_level: list[int] | int = 2  # ResBlocks per level on the way down (up: +1)
    attention_levels: list[bool] | bool = field(default_factory=lambda: [True, True, True, False])
    # Exactly one of num_heads / head_dim is set; channels[i] = heads[i] * head_dim[i].
    num_heads: list[int] | int | None = 8
    head_dim: list[int] | int | None = None
    transformer_depth: list[int] | int = 1  # BasicTransformerBlocks per spatial transformer
    context_dim: int = 768  # width of the text tokens read by cross-attention
    use_linear_projection: bool = False  # SD 2.x: Linear proj_in/out; SD 1.x: 1x1 conv
    upcast_attention: bool = False  # compute attention in float32 when running fp16/bf16
    # x4 upscaler: the first attention of a block also reads the text (no self-attention).
    only_cross_attention: list[bool] | bool = False
    norm_groups: int = 32
    norm_eps: float = 1e-5
    num_class_embeds: int | None = None  # x4 upscaler noise-level embedding (class_labels)
    # Vector conditioning `y` (SDXL: pooled text + sinusoidal embeddings of its size / crop numbers,
    # sgm's "adm"), added to the timestep embedding through an MLP; None: no such input.
    adm_in_channels: int | None = None  # diffusers' projection_class_embeddings_input_dim (SDXL: 2816)
    addition_time_embed_dim: int | None = None  # width of each number's embedding inside y (SDXL: 256)
    # Guidance embedding of LCM-distilled UNets: the guidance scale w, embedded like a timestep at this
    # width, projected and added to the timestep's sinusoidal embedding (diffusers' time_cond_proj_dim)
    time_cond_proj_dim: int | None = None
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_int("in_channels", self.in_channels, minimum=1)
        _check_int("out_channels", self.out_channels, minimum=1)
        if not isinstance(self.channels, (list, tuple)) or not self.channels:
            raise TypeError(f"channels must be a non-empty list of ints, got {self.channels!r}")
        self.channels = [int(_check_int("channels", c, minimum=1)) for c in self.channels]
        levels = len(self.channels)
        for name in _PER_LEVEL_INT:
            setattr(self, name, _per_level(name, getattr(self, name), levels, int))
        for name in _PER_LEVEL_BOOL:
            setattr(self, name, _per_level(name, getattr(self, name), levels, bool))
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(
                f"set exactly one of num_heads / head_dim, got num_heads={self.num_heads!r}, "
                f"head_dim={self.head_dim!r}"
            )
        if self.num_heads is not None:
            self.num_heads = _per_level("num_heads", self.num_heads, levels, int)
        else:
            self.head_dim = _per_level("head_dim", self.head_dim, levels, int)
        _check_int("context_dim", self.context_dim, minimum=1)
        _check_int("norm_groups", self.norm_groups, minimum=1)
        for i, c in enumerate(self.channels):
            split = self.num_heads[i] if self.num_heads is not None else self.head_dim[i]
            if c % split != 0:
                raise ValueError(
                    f"channels[{i}]={c} is not divisible by the attention split "
                    f"(num_heads={self.num_heads!r}, head_dim={self.head_dim!r})"
                )
            if c % self.norm_groups != 0:
                raise ValueError(f"channels[{i}]={c} is not divisible by norm_groups={self.norm_groups}")
        _check_int("freq_shift", self.freq_shift, minimum=0)
        for name in ("use_linear_projection", "upcast_attention", "flip_sin_to_cos"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("norm_eps", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {value!r}")
            setattr(self, name, float(value))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_class_embeds is not None:
            _check_int("num_class_embeds", self.num_class_embeds, minimum=1)
        if (self.adm_in_channels is None) != (self.addition_time_embed_dim is None):
            raise ValueError(f"adm_in_channels and addition_time_embed_dim go together, got "
                             f"{self.adm_in_channels!r} and {self.addition_time_embed_dim!r}")
        if self.adm_in_channels is not None:
            _check_int("adm_in_channels", self.adm_in_channels, minimum=1)
            _check_int("addition_time_embed_dim", self.addition_time_embed_dim, minimum=1)
        if self.time_cond_proj_dim is not None:
            _check_int("time_cond_proj_dim", self.time_cond_proj_dim, minimum=1)

    # ------------------------------------------------------------------ derived shapes
    @property
    def guidance_embedded(self) -> bool:
        """An LCM-distilled UNet: the guidance scale enters through its embedding, not CFG."""
        return self.time_cond_proj_dim is not None

    @property
    def num_levels(self) -> int:
        return len(self.channels)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels[0]

    def heads_at(self, level: int) -> int:
        """Attention heads at ``level`` (diffusers' misnamed ``attention_head_dim``)."""
        if self.num_heads is not None:
            return self.num_heads[level]
        return self.channels[level] // self.head_dim[level]

    # ------------------------------------------------------------------ presets
    @classmethod
    def sd15(cls, **overrides: Any) -> UNetConfig:
        """Stable Diffusion 1.x: 860 M parameters, CLIP ViT-L context (768), 8 heads."""
        return cls(**overrides)

    @classmethod
    def sd2(cls, **overrides: Any) -> UNetConfig:
        """Stable Diffusion 2.x: OpenCLIP ViT-H context (1024), head dim 64, linear projection."""
        base = dict(num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True,
                    upcast_attention=True)
        return cls(**{**base, **overrides})

    @classmethod
    def sd_x4_upscaler(cls, **overrides: Any) -> UNetConfig:
        """SD 2 x4 upscaler: 4 latent + 3 low-res image channels, noise-level embedding."""
        base = dict(in_channels=7, channels=[256, 512, 512, 1024],
                    attention_levels=[False, True, True, True], num_heads=8, context_dim=1024,
                    use_linear_projection=True, only_cross_attention=[False, True, True, False],
                    num_class_embeds=1000)
        return cls(**{**base, **overrides})

    @classmethod
    def sdxl(cls, **overrides: Any) -> UNetConfig:
        """Stable Diffusion XL base: 3 levels, transformer depth 1 / 2 / 10, CLIP-L + OpenCLIP-bigG
        context (2048), y = pooled text (1280) + 6 size / crop numbers x 256."""
        base = dict(channels=[320, 640, 1280], attention_levels=[False, True, True], num_heads=None,
                    head_dim=64, transformer_depth=[1, 2, 10], context_dim=2048, use_linear_projection=True,
                    adm_in_channels=2816, addition_time_embed_dim=256)
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> UNetConfig:
        """Two levels, 16/32 channels: for tests and the bundled toy model."""
        base = dict(channels=[16, 32], layers_per_level=1, attention_levels=[True, True],
                    num_heads=2, context_dim=32, norm_groups=8)
        return cls(**{**base, **overrides})

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        if not isinstance(d, dict):
            raise TypeError(f"UNetConfig.from_dict expects a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        # fields added after configs were first saved may be absent (their default applies)
        missing = [n for n in names if n not in d and n not in _ADDED_LATER]
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}; accepted: {names}")
        if missing:
            raise ValueError(f"missing UNetConfig fields {missing}")
        return cls(**d)

    def save_json(self, path: str | os.PathLike) -> None:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        write_bytes_atomic(path, text.encode())

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> UNetConfig:
        """ValueError naming the file for bad JSON, wrong types or missing fields."""
        from latentloom.unet.loading import _parse_config

        return _parse_config(Path(path), cls.from_dict)

    # ------------------------------------------------------------------ diffusers config
    @classmethod
    def from_diffusers_config(cls, d: dict[str, Any]) -> UNetConfig:
        """Translate a diffusers ``UNet2DConditionModel`` config.json into ours."""
        from latentloom.unet.diffusers_config import config_from_diffusers

        return config_from_diffusers(d)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers ``UNet2DConditionModel`` config with the same architecture."""
        from latentloom.unet.diffusers_config import config_to_diffusers

        return config_to_diffusers(self)


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _per_level(name: str, value: Any, levels: int, kind: type) -> list:
    """One value for every level, or a list with one entry per level."""
    def ok(v: Any) -> bool:
        return isinstance(v, bool) if kind is bool else (isinstance(v, int) and not isinstance(v, bool))

    if ok(value):
        return [value] * levels
    if isinstance(value, (list, tuple)) and all(ok(v) for v in value):
        if len(value) != levels:
            raise ValueError(f"{name} has {len(value)} entries but there are {levels} levels: {value!r}")
        if kind is int and any(v < 1 for v in value):
            raise ValueError(f"{name} entries must be >= 1, got {value!r}")
        return list(value)
    raise TypeError(f"{name} must be a {kind.__name__} or a list of {levels} {kind.__name__}s, got {value!r}")

