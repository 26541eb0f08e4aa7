"""Build a ControlNet from diffusers modules / folders or original single files; save both formats.

Weights come from safetensors only. As for the UNet (loading.py), the network is built on the meta
device and the file's tensors are assigned in: no random init, no second copy.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from latentloom.file_io import write_atomic, write_json_atomic
from latentloom.unet.controlnet import ControlNet, ControlNetConfig
from latentloom.unet.controlnet_convert import (
    CONTROL_PREFIX, diffusers_to_original, infer_config_from_original, original_to_diffusers, strip_control_prefix,
)
from latentloom.unet.convert import diffusers_to_ours, ours_to_diffusers
from latentloom.unet import loading as unet_loading
from latentloom.unet.loading import CONFIG_NAME, build_with_weights
from latentloom.weight_files import load_safetensors

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # what diffusers' save_pretrained writes and reads first


def load_from_diffusers(module_or_folder: Any, *, dtype: torch.dtype | None = None) -> ControlNet:
    return unet_loading.load_from_diffusers(module_or_folder, dtype=dtype, config_cls=ControlNetConfig,
                                            model_cls=ControlNet, diffusers_class="ControlNetModel",
                                            part="controlnet")


def save_pretrained(model: ControlNet, folder: str | os.PathLike) -> None:
    config = model.config.to_diffusers_config()  # raises before anything is written
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.to_diffusers_state_dict().items()}
    # Weights first, config last: a folder with a config always has its weights.
    write_atomic(folder / WEIGHTS_NAME, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
    write_json_atomic(folder / CONFIG_NAME, config)


def load_from_original(state_dict: Mapping[str, torch.Tensor], *, config: ControlNetConfig | None = None,
                       dtype: torch.dtype | None = None, source: str = "ControlNet state dict") -> ControlNet:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"from_original_state_dict takes a dict of tensors, got {type(state_dict).__name__}")
    if config is not None and not isinstance(config, ControlNetConfig):
        raise TypeError(f"config must be a ControlNetConfig, got {type(config).__name__}")
    prefixed = any(k.startswith(CONTROL_PREFIX) for k in state_dict)
    bare = strip_control_prefix(state_dict)
    cfg = config if config is not None else infer_config_from_original(bare)
    _check_original_keys(bare, cfg, source=source, prefix=CONTROL_PREFIX if prefixed else "")
    sd = diffusers_to_ours(original_to_diffusers(bare, cfg), cfg)
    return build_with_weights(cfg, sd, source=source, dtype=dtype, model_cls=ControlNet)


def _check_original_keys(sd: Mapping[str, torch.Tensor], cfg: ControlNetConfig, *, source: str, prefix: str) -> None:
    """Missing / unexpected keys named as the file names them (shapes are checked after renaming)."""
    with torch.device("meta"):
        expected = set(diffusers_to_original(ours_to_diffusers(ControlNet(cfg).state_dict(), cfg), cfg))
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        parts = [f"{source} does not match the ControlNet config:"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {[prefix + k for k in missing]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {[prefix + k for k in unexpected]}")
        raise ValueError("\n".join(parts))


def load_single_file(path: str | os.PathLike, *, config: ControlNetConfig | None = None,
                     dtype: torch.dtype | None = None) -> ControlNet:
    path = Path(path)
    if path.suffix.lower() in (".pth", ".pt", ".ckpt", ".bin"):
        raise ValueError(f"{path} is a pickle checkpoint; latentloom reads safetensors. Load it with "
                         "torch.load(path, weights_only=True) and pass the dict to ControlNet.from_original_state_dict")
    return load_from_original(load_safetensors(path, dtype=dtype), config=config, dtype=dtype, source=str(path))


def save_single_file(model: ControlNet, path: str | os.PathLike, *, prefix: str = CONTROL_PREFIX) -> None:
    sd = {k: v.detach().contiguous() for k, v in model.to_original_state_dict(prefix=prefix).items()}
    write_atomic(path, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
