"""ControlNet formats: diffusers' ControlNetModel config.json, and the original (lllyasviel) key layout.

The original layout (ControlNet 1.0 / 1.1, ``control_model.`` prefix or bare) names the encoder as
the LDM UNet does (``input_blocks``, ``middle_block``, ``time_embed``, ``label_emb``: convert.py
renames those) and adds:
- ``input_hint_block.{0, 2, ..., 4n-2}``: the control embedding, a Sequential of n convs pairs with
  SiLUs at the odd indices (0: conv_in; 2 .. 4n-4: the blocks; 4n-2: conv_out);
- ``zero_convs.{i}.0``: the 1x1 conv of skip tensor i (diffusers' controlnet_down_blocks.{i});
- ``middle_block_out.0``: the middle block's 1x1 conv (diffusers' controlnet_mid_block).
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from latentloom.unet.controlnet import ControlNetConfig
from latentloom.unet.convert import diffusers_to_ldm, infer_config_from_ldm_state_dict, ldm_to_diffusers
from latentloom.unet.diffusers_config import config_from_diffusers as unet_config_from_diffusers
from latentloom.unet.diffusers_config import config_to_diffusers as unet_config_to_diffusers

CONTROL_PREFIX = "control_model."
_HINT, _ZERO, _MID_OUT = "input_hint_block.", "zero_convs.", "middle_block_out.0."
_HINT_KEY = re.compile(r"input_hint_block\.(\d+)\.(.+)$")
_ZERO_KEY = re.compile(r"zero_convs\.(\d+)\.0\.(.+)$")

# ------------------------------------------------------------------ diffusers config.json
# ControlNetModel's own keys and their defaults.
_CONTROL_DEFAULTS: dict[str, Any] = {
    "conditioning_channels": 3, "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False,
}
# ControlNetModel's other keys: they mean what they mean in UNet2DConditionModel (diffusers_config.py).
_SHARED = {
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type", "only_cross_attention",
    "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
    "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim",
    "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads", "use_linear_projection",
    "class_embed_type", "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
    "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "addition_embed_type_num_heads",
}
# Ours, not diffusers': written only when set (diffusers' ControlNetModel has neither).
_EXTENSIONS = {"time_cond_proj_dim": None, "dropout": 0.0}
_UP_FOR_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


def config_from_diffusers(d: dict[str, Any]) -> ControlNetConfig:
    """diffusers ``ControlNetModel`` config -> ControlNetConfig; absent keys take diffusers' defaults,
    unknown keys warn, unsupported values raise (as for the UNet)."""
    if not isinstance(d, dict):
        raise TypeError(f"expected a diffusers ControlNetModel config dict, got {type(d).__name__}")
    cls_name = d.get("_class_name", "ControlNetModel")
    if cls_name != "ControlNetModel":
        raise ValueError(f"_class_name {cls_name!r} is not supported here; expected 'ControlNetModel'")
    unknown = sorted(k for k in d if not k.startswith("_") and k not in _SHARED and k not in _CONTROL_DEFAULTS
                     and k not in _EXTENSIONS)
    if unknown:
        warnings.warn(f"ignoring diffusers ControlNetModel config keys latentloom does not know: {unknown}",
                      stacklevel=3)
    unet = {k: v for k, v in d.items() if k in _SHARED or k in _EXTENSIONS}
    # ControlNetModel has no up path; give the UNet translation the mirror of the down path
    down = d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    if isinstance(down, (list, tuple)):
        unet["up_block_types"] = [_UP_FOR_DOWN.get(kind, "UpBlock2D") for kind in reversed(down)]
    layers = d.get("layers_per_block", 2)
    if isinstance(layers, bool) or not isinstance(layers, int):
        raise ValueError(f"layers_per_block must be one int for a ControlNetModel, got {layers!r}")
    widths = d.get("conditioning_embedding_out_channels", _CONTROL_DEFAULTS["conditioning_embedding_out_channels"])
    if not isinstance(widths, (list, tuple)):
        raise ValueError(f"conditioning_embedding_out_channels must be a list of ints, got {widths!r}")
    ucfg = unet_config_from_diffusers(unet)
    control = {k: d.get(k, default) for k, default in _CONTROL_DEFAULTS.items()}
    control["conditioning_embedding_out_channels"] = list(widths)
    return ControlNetConfig.from_unet_config(ucfg, **control)


def config_to_diffusers(cfg: ControlNetConfig) -> dict[str, Any]:
    """ControlNetConfig -> a config.json diffusers' ``ControlNetModel`` builds the same network from."""
    if len(set(cfg.layers_per_level)) != 1:
        raise ValueError(f"diffusers' ControlNetModel takes one layers_per_block for all levels; this ControlNet "
                         f"has layers_per_level={cfg.layers_per_level}")
    unet = unet_config_to_diffusers(cfg)
    out = {"_class_name": "ControlNetModel"}
    out.update({k: v for k, v in unet.items() if k in _SHARED})
    out["layers_per_block"] = cfg.layers_per_level[0]
    out.update({k: getattr(cfg, k) for k in _CONTROL_DEFAULTS})
    out.update({k: getattr(cfg, k) for k, default in _EXTENSIONS.items() if getattr(cfg, k) != default})
    return out


# ------------------------------------------------------------------ original layout <-> diffusers names
def strip_control_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ControlNet's keys, bare: a ControlNet 1.0 file also holds the whole SD model (dropped)."""
    if any(k.startswith(CONTROL_PREFIX) for k in sd):
        return {k[len(CONTROL_PREFIX):]: v for k, v in sd.items() if k.startswith(CONTROL_PREFIX)}
    return dict(sd)


def _is_control_key(key: str) -> bool:
    return key.startswith((_HINT, _ZERO, _MID_OUT))


def original_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: ControlNetConfig) -> dict[str, torch.Tensor]:
    """Bare original keys -> diffusers ``ControlNetModel`` names (tensors unchanged); keys the config
    does not explain raise, named as in the file."""
    n = len(cfg.conditioning_embedding_out_channels)
    hint_out = 4 * n - 2  # index of the last conv in input_hint_block
    zeros = 1 + sum(cfg.layers_per_level) + cfg.num_levels - 1
    encoder = {k: v for k, v in sd.items() if not _is_control_key(k)}
    out = ldm_to_diffusers(encoder, cfg)
    unexpected = []
    for key, value in sd.items():
        if not _is_control_key(key):
            continue
        new = None
        if (m := _HINT_KEY.match(key)) is not None:
            k = int(m.group(1))
            if k == 0:
                new = "controlnet_cond_embedding.conv_in."
            elif k == hint_out:
                new = "controlnet_cond_embedding.conv_out."
            elif k % 2 == 0 and 0 < k < hint_out:
                new = f"controlnet_cond_embedding.blocks.{k // 2 - 1}."
            new = new and new + m.group(2)
        elif (m := _ZERO_KEY.match(key)) is not None and int(m.group(1)) < zeros:
            new = f"controlnet_down_blocks.{int(m.group(1))}.{m.group(2)}"
        elif key.startswith(_MID_OUT):
            new = "controlnet_mid_block." + key[len(_MID_OUT):]
        if new is None:
            unexpected.append(key)
        else:
            out[new] = value
    if unexpected:
        raise ValueError(f"ControlNet state dict has keys that the config does not explain ({len(unexpected)}): "
                         f"{sorted(unexpected)} (control embedding: input_hint_block.{{0,2,...,{hint_out}}}, "
                         f"zero_convs.{{0..{zeros - 1}}}.0, middle_block_out.0)")
    return out


def diffusers_to_original(sd: Mapping[str, torch.Tensor], cfg: ControlNetConfig) -> dict[str, torch.Tensor]:
    """Inverse of ``original_to_diffusers`` (bare original keys)."""
    hint_out = 4 * len(cfg.conditioning_embedding_out_channels) - 2
    encoder, out = {}, {}
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        if key.startswith("controlnet_cond_embedding."):
            part, _, tail = rest.partition(".")
            if part == "conv_in":
                out[f"{_HINT}0.{tail}"] = value
            elif part == "conv_out":
                out[f"{_HINT}{hint_out}.{tail}"] = value
            else:  # blocks.{k}.weight
                k, _, tail = tail.partition(".")
                out[f"{_HINT}{2 * int(k) + 2}.{tail}"] = value
        elif head == "controlnet_down_blocks":
            i, _, tail = rest.partition(".")
            out[f"{_ZERO}{i}.0.{tail}"] = value
        elif head == "controlnet_mid_block":
            out[_MID_OUT + rest] = value
        else:
            encoder[key] = value
    out.update(diffusers_to_ldm(encoder, cfg))
    return out


# ------------------------------------------------------------------ config from shapes
def infer_config_from_original(sd: Mapping[str, torch.Tensor]) -> ControlNetConfig:
    """Read the architecture off an original ControlNet state dict's shapes.

    The encoder as ``convert.infer_config_from_ldm_state_dict`` reads a UNet (heads follow the released
    models: 768-wide context 8 heads, 1024-wide head dim 64); the control embedding's widths and input
    channels from input_hint_block. Not in the shapes: global_pool_conditions (True for 1.1's shuffle)
    and the channel order; pass ``config=`` for those.
    """
    sd = strip_control_prefix(sd)
    needed = [k for k in ("input_blocks.0.0.weight", f"{_HINT}0.weight") if k not in sd]
    if needed:
        raise ValueError(f"not an original ControlNet state dict: {needed} missing (expected keys like "
                         f"'control_model.input_hint_block.0.weight' and 'control_model.input_blocks.0.0.weight')")
    encoder = {k: v for k, v in sd.items() if not _is_control_key(k)}
    # The UNet inference also reads the output conv's width; a ControlNet has none (out_channels is unused).
    encoder["out.2.weight"] = torch.empty(4, 0, device="meta")
    ucfg = infer_config_from_ldm_state_dict(encoder)
    hint = sorted({int(m.group(1)) for k in sd if (m := _HINT_KEY.match(k))})
    n = (len(hint) + 1) // 2
    if hint != list(range(0, 4 * n - 1, 2)) or n < 1:
        raise ValueError(f"input_hint_block convs at indices {hint}; expected 0, 2, ..., 4n-2 (conv_in, pairs of "
                         f"convs, conv_out), e.g. 0, 2, ..., 14 for ControlNet 1.x")
    first = sd[f"{_HINT}0.weight"]  # (widths[0], conditioning_channels, 3, 3)
    widths = [first.shape[0]] + [sd[f"{_HINT}{4 * i + 4}.weight"].shape[0] for i in range(n - 1)]
    return ControlNetConfig.from_unet_config(ucfg, conditioning_channels=first.shape[1],
                                             conditioning_embedding_out_channels=widths)
