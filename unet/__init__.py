"""The denoiser: a UNet that reads the prompt through cross-attention.

``UNet(UNetConfig.sd15())(x, t, context, context_mask=..., class_labels=...)``; weights
load from diffusers (module or folder), original LDM state dicts, or our own folders.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "UNetConfig": "latentloom.unet.config",
    "UNet": "latentloom.unet.model",
    "ControlNet": "latentloom.unet.controlnet",
    "ControlNetConfig": "latentloom.unet.controlnet",
    "DeepCache": "latentloom.unet.step_cache",
    "infer_config_from_ldm_state_dict": "latentloom.unet.convert",
    "attention": "latentloom.unet.attention",
    "BACKENDS": "latentloom.unet.attention",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'latentloom.unet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
