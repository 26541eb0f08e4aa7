"""ControlNet: a trainable copy of the UNet's encoder that reads a control image (Zhang et al. 2023).

    down, mid = controlnet(x, t, context, control_image, conditioning_scale=1.0)
    # down: one (B, C_k, H_k, W_k) residual per UNet skip tensor; mid: (B, C, h, w) for the middle block

The encoder (conv_in, time embedding, down levels, middle block) is built from the UNet's own
parts; the control image enters through a small conv stack added after conv_in, and every skip
tensor and the middle block's output leave through a zero-initialised 1x1 conv, so a fresh
ControlNet changes nothing. Parameter names are diffusers' ``ControlNetModel`` names (proj_in /
proj_out are Linear, as in the UNet); controlnet_convert.py handles the file layouts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentloom.unet.attention import mask_to_bias
from latentloom.unet.config import UNetConfig, _check_int
from latentloom.unet.model import MidBlock, UNet, _timesteps, build_down_levels, build_embeddings

CHANNEL_ORDERS = ("rgb", "bgr")


@dataclass
class ControlNetConfig(UNetConfig):
    """The UNet's encoder shapes (every UNetConfig field; out_channels unused) plus the control input.

    Defaults: the SD 1.x ControlNets (lllyasviel's 1.0 / 1.1)."""

    conditioning_channels: int = 3  # channels of the control image (RGB maps)
    # widths of the control image's conv stack; each width after the first halves H and W once
    conditioning_embedding_out_channels: list[int] = field(default_factory=lambda: [16, 32, 96, 256])
    controlnet_conditioning_channel_order: str = "rgb"  # "bgr": channels flipped before the embedding
    # ControlNet 1.1 shuffle: each residual is averaged over H and W (the control has no layout)
    global_pool_conditions: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("conditioning_channels", self.conditioning_channels, minimum=1)
        widths = self.conditioning_embedding_out_channels
        if not isinstance(widths, (list, tuple)) or not widths:
            raise TypeError(f"conditioning_embedding_out_channels must be a non-empty list of ints, got {widths!r}")
        self.conditioning_embedding_out_channels = [
            _check_int("conditioning_embedding_out_channels", c, minimum=1) for c in widths]
        if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"controlnet_conditioning_channel_order must be one of {CHANNEL_ORDERS}, "
                             f"got {self.controlnet_conditioning_channel_order!r}")
        if not isinstance(self.global_pool_conditions, bool):
            raise TypeError(f"global_pool_conditions must be a bool, got {self.global_pool_conditions!r}")

    @property
    def control_downscale(self) -> int:
        """How much smaller than the control image the latents are (SD: 8)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_unet_config(cls, unet_config: UNetConfig, **control: Any) -> ControlNetConfig:
        """The ControlNet for a UNet: its encoder shapes and these control fields."""
        if not isinstance(unet_config, UNetConfig):
            raise TypeError(f"expected a UNetConfig, got {type(unet_config).__name__}")
        shared = {k: v for k, v in unet_config.to_dict().items() if k in UNetConfig.__dataclass_fields__}
        return cls(**shared, **control)

    @classmethod
    def from_diffusers_config(cls, d: dict[str, Any]) -> ControlNetConfig:
        """Translate a diffusers ``ControlNetModel`` config.json (absent keys: diffusers' defaults)."""
        from latentloom.unet.controlnet_convert import config_from_diffusers

        return config_from_diffusers(d)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers ``ControlNetModel`` config with the same architecture."""
        from latentloom.unet.controlnet_convert import config_to_diffusers

        return config_to_diffusers(self)


class ConditioningEmbedding(nn.Module):
    """Control image (B, C, H*f, W*f) -> (B, channels[0] of the UNet, H, W): 3x3 convs with SiLU,
    every second one strided; the last conv starts at zero (diffusers' ControlNetConditioningEmbedding)."""

    def __init__(self, in_channels: int, widths: list[int], out_channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = _zero(nn.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(image))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class ControlNet(nn.Module):
    """``controlnet(x, t, context, control_image, *, conditioning_scale=1.0, guess_mode=False, ...)
    -> (down residuals, mid residual)``, the additions to the UNet's skip tensors and middle block."""

    # Helpers of the UNet that read only `_config` (a UNetConfig: ControlNetConfig is one) and the
    # module's own attributes; shared by reference, not copied.
    config = UNet.config
    dtype = UNet.dtype
    device = UNet.device
    attention_backend = UNet.attention_backend
    set_attention_backend = UNet.set_attention_backend
    enable_gradient_checkpointing = UNet.enable_gradient_checkpointing
    guidance_embedding = UNet.guidance_embedding
    embed = UNet.embed
    vector_conditioning = UNet.vector_conditioning
    _run = UNet._run
    _check_inputs = UNet._check_inputs
    _check_vector = UNet._check_vector

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        if not isinstance(config, ControlNetConfig):
            raise TypeError(f"ControlNet expects a ControlNetConfig, got {type(config).__name__}")
        self._config = cfg = config
        ch0, emb_dim = cfg.channels[0], cfg.time_embed_dim
        # the same modules under the same names as UNet.__init__, so UNet weights copy across
        build_embeddings(self, cfg)
        self.controlnet_cond_embedding = ConditioningEmbedding(
            cfg.conditioning_channels, cfg.conditioning_embedding_out_channels, ch0)
        # skip_channels: every tensor the UNet pushes on its skip stack
        self.down_blocks, skip_channels = build_down_levels(cfg)
        self.mid_block = MidBlock(cfg, emb_dim=emb_dim)

        # zero 1x1 convs: a fresh ControlNet adds exactly nothing to the UNet
        self.controlnet_down_blocks = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c in skip_channels)
        self.controlnet_mid_block = _zero(nn.Conv2d(cfg.channels[-1], cfg.channels[-1], 1))
        self.gradient_checkpointing = False
        self._backend = "sdpa"

    @property
    def num_residuals(self) -> int:
        """How many down residuals forward returns (one per UNet skip tensor)."""
        return len(self.controlnet_down_blocks)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float | int,
        context: torch.Tensor,
        control_image: torch.Tensor,
        *,
        conditioning_scale: float = 1.0,
        guess_mode: bool = False,
        context_mask: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        guidance: torch.Tensor | float | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (B, in_ch, H, W), t, context (B, L, D), control_image (B or 1, C, H*f, W*f) with f =
        config.control_downscale (8 for SD's), values as the model was trained on (lllyasviel's: [0, 1])
        -> (down, mid): `num_residuals` tensors shaped like the UNet's skip tensors, and the middle
        block's (B, channels[-1], h, w), in x's dtype, to be added to the UNet's.

        conditioning_scale multiplies every residual. guess_mode (diffusers'): the residuals are
        scaled from 0.1 (first) to 1.0 (middle) on a log scale, for prompts that say little.
        context_mask, class_labels, y, guidance: as the UNet's (the same y the UNet reads).
        """
        cfg = self._config
        self._check_inputs(x, context, context_mask, class_labels)
        self._check_vector(y, x.shape[0])
        self._check_control(control_image, x)
        if isinstance(conditioning_scale, bool) or not isinstance(conditioning_scale, (int, float)):
            raise TypeError(f"conditioning_scale must be a number, got {conditioning_scale!r}")
        B, in_dtype, dtype = x.shape[0], x.dtype, self.dtype
        x, context, control_image = x.to(dtype), context.to(dtype), control_image.to(dtype)
        if cfg.controlnet_conditioning_channel_order == "bgr":
            control_image = control_image.flip(1)

        t = _timesteps(t, B, device=x.device)  # (B,) float32
        emb_act = self.embed(t, dtype, guidance=guidance, class_labels=class_labels, y=y)
        bias = mask_to_bias(context_mask, dtype=dtype)  # (B, 1, 1, L) or None

        h = self.conv_in(x) + self.controlnet_cond_embedding(control_image)
        skips = [h]
        for level in self.down_blocks:
            for j, resnet in enumerate(level.resnets):
                h = self._run(resnet, h, emb_act)
                if len(level.attentions):
                    h = self._run(level.attentions[j], h, context, bias)
                skips.append(h)
            for down in level.downsamplers:
                h = down(h)
                skips.append(h)
        mid = self.mid_block
        h = self._run(mid.resnets[0], h, emb_act)
        h = self._run(mid.attentions[0], h, context, bias)
        h = self._run(mid.resnets[1], h, emb_act)

        down = [zero(s) for zero, s in zip(self.controlnet_down_blocks, skips)]
        h = self.controlnet_mid_block(h)
        if guess_mode and not cfg.global_pool_conditions:
            # diffusers' float32 logspace, times the scale: 0.1 ... 1.0, the last for the middle block
            scales = torch.logspace(-1, 0, len(down) + 1, device=h.device) * conditioning_scale
            down = [s * scale for s, scale in zip(down, scales)]
            h = h * scales[-1]
        else:
            down = [s * conditioning_scale for s in down]
            h = h * conditioning_scale
        if cfg.global_pool_conditions:
            down = [s.mean(dim=(2, 3), keepdim=True) for s in down]  # (B, C, 1, 1): broadcast over H, W
            h = h.mean(dim=(2, 3), keepdim=True)
        return [s.to(in_dtype) for s in down], h.to(in_dtype)

    def _check_control(self, image: torch.Tensor, x: torch.Tensor) -> None:
        cfg = self._config
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"control_image must be a tensor (B, {cfg.conditioning_channels}, H, W), "
                            f"got {type(image).__name__}")
        size = tuple(image.shape[-2:])
        for _ in range(len(cfg.conditioning_embedding_out_channels) - 1):
            size = tuple((s + 1) // 2 for s in size)  # each strided 3x3 conv (padding 1) rounds up
        f, (H, W), B = cfg.control_downscale, x.shape[-2:], x.shape[0]
        if image.ndim != 4 or image.shape[0] not in (1, B) or image.shape[1] != cfg.conditioning_channels \
                or size != (H, W):
            raise ValueError(f"control_image must have shape ({B} or 1, {cfg.conditioning_channels}, {H * f}, "
                             f"{W * f}) for x of size {H}x{W} (the control embedding downsamples {f}x), "
                             f"got {tuple(image.shape)}")

    # ------------------------------------------------------------------ construction and files
    @classmethod
    def from_unet(cls, unet: Any, *, conditioning_channels: int = 3,
                  conditioning_embedding_out_channels: tuple[int, ...] | list[int] = (16, 32, 96, 256),
                  controlnet_conditioning_channel_order: str = "rgb",
                  global_pool_conditions: bool = False) -> ControlNet:
        """A ControlNet to train for `unet` (ours, or a diffusers UNet2DConditionModel): its encoder's
        weights copied, the control embedding freshly initialised, the zero convs at zero."""
        if type(unet).__name__ == "UNet2DConditionModel":
            unet = UNet.from_diffusers(unet)
        if not isinstance(unet, UNet):
            raise TypeError(f"from_unet takes a latentloom UNet or a diffusers UNet2DConditionModel, "
                            f"got {type(unet).__name__}")
        cfg = ControlNetConfig.from_unet_config(
            unet.config, conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=list(conditioning_embedding_out_channels),
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            global_pool_conditions=global_pool_conditions)
        net = cls(cfg).to(device=unet.device, dtype=unet.dtype)
        for name in ("conv_in", "time_embedding", "class_embedding", "add_embedding", "down_blocks", "mid_block"):
            if getattr(unet, name) is not None:
                getattr(net, name).load_state_dict(getattr(unet, name).state_dict())
        return net

    @classmethod
    def from_diffusers(cls, module_or_folder: Any, *, dtype: torch.dtype | None = None) -> ControlNet:
        """From a diffusers ``ControlNetModel`` or its saved folder (config.json + safetensors)."""
        from latentloom.unet.controlnet_loading import load_from_diffusers

        return load_from_diffusers(module_or_folder, dtype=dtype)

    from_pretrained = from_diffusers

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """diffusers' ControlNetModel folder: config.json + diffusion_pytorch_model.safetensors."""
        from latentloom.unet.controlnet_loading import save_pretrained

        save_pretrained(self, folder)

    def to_diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """This ControlNet's weights under diffusers' ``ControlNetModel`` names and shapes."""
        from latentloom.unet.convert import ours_to_diffusers

        return ours_to_diffusers(self.state_dict(), self._config)

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, *, config: ControlNetConfig | None = None,
                         dtype: torch.dtype | None = None) -> ControlNet:
        """From an original ``control_*.safetensors`` (lllyasviel's ControlNet 1.0 / 1.1 layout)."""
        from latentloom.unet.controlnet_loading import load_single_file

        return load_single_file(path, config=config, dtype=dtype)

    @classmethod
    def from_original_state_dict(cls, state_dict: dict[str, torch.Tensor], *,
                                 config: ControlNetConfig | None = None) -> ControlNet:
        """From original-layout tensors (``control_model.*`` keys or bare); config inferred from shapes."""
        from latentloom.unet.controlnet_loading import load_from_original

        return load_from_original(state_dict, config=config)

    def to_original_state_dict(self, *, prefix: str = "control_model.") -> dict[str, torch.Tensor]:
        """This ControlNet's weights in the original layout, each key under `prefix`."""
        from latentloom.unet.controlnet_convert import diffusers_to_original

        bare = diffusers_to_original(self.to_diffusers_state_dict(), self._config)
        return {prefix + k: v for k, v in bare.items()}

    def save_single_file(self, path: str | os.PathLike, *, prefix: str = "control_model.") -> None:
        """One safetensors file in the original layout (as ControlNet 1.1's), written atomically."""
        from latentloom.unet.controlnet_loading import save_single_file

        save_single_file(self, path, prefix=prefix)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
