"""Build a UNet from diffusers modules/folders, LDM state dicts or our own folders; save one.

Weights come from safetensors only; a folder holding just pickle files (.bin) is refused.
The UNet is built on the meta device and the checkpoint's tensors are assigned in, so
loading SD-sized weights costs no random init and no second copy.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from latentloom.file_io import read_json_object, write_atomic
from latentloom.unet.config import UNetConfig
from latentloom.unet.convert import (
    check_state_dict, diffusers_to_ours, infer_config_from_ldm_state_dict, ldm_to_diffusers,
    strip_ldm_prefix,
)
from latentloom.unet.model import UNet
from latentloom.weight_files import load_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Looked up in this order in a diffusers folder.
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "model.safetensors")
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def build_with_weights(cfg: UNetConfig, sd: Mapping[str, torch.Tensor], *, source: str,
                       dtype: torch.dtype | None = None, copy: bool = False, model_cls: type = UNet) -> Any:
    """model_cls(cfg) (UNet, or an add-on such as ControlNet) holding exactly ``sd`` (our names);
    any key mismatch raises, listing the keys."""
    with torch.device("meta"):
        model = model_cls(cfg)
    check_state_dict(sd, model.state_dict(), source=source)
    # An integer tensor where a float weight belongs would be assigned as is: an integer UNet.
    wrong = sorted(k for k, v in model.state_dict().items() if v.is_floating_point() and not sd[k].is_floating_point())
    if wrong:
        raise ValueError(f"{source}: these weights are not floating point: "
                         f"{[f'{k} ({sd[k].dtype})' for k in wrong[:8]]}{' ...' if len(wrong) > 8 else ''}")
    if dtype is None:
        floats = {v.dtype for v in sd.values() if v.is_floating_point()}
        dtype = floats.pop() if len(floats) == 1 else torch.float32
    # One dtype for all weights; copy when the tensors belong to a live module.
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    if copy:
        sd = {k: v.detach().clone() for k, v in sd.items()}
    model.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


def load_from_diffusers(module_or_folder: Any, *, dtype: torch.dtype | None = None,
                        config_cls: type = UNetConfig, model_cls: type = UNet,
                        diffusers_class: str = "UNet2DConditionModel", part: str = "unet") -> Any:
    """A diffusers module or folder of `diffusers_class` as latentloom's `model_cls` (the UNet, or an add-on
    such as the ControlNet, whose config class reads diffusers' config.json); `part`: the subfolder a
    pipeline folder keeps it in, for the hint when a pipeline folder is given."""
    if isinstance(module_or_folder, torch.nn.Module):
        module = module_or_folder
        if not hasattr(module, "config") or type(module).__name__ != diffusers_class:
            raise TypeError(f"expected a diffusers {diffusers_class}, got {type(module).__name__}")
        cfg = config_cls.from_diffusers_config(dict(module.config))
        sd = diffusers_to_ours(module.state_dict(), cfg)
        return build_with_weights(cfg, sd, source=f"{type(module).__name__} state dict",
                                  dtype=dtype, copy=True, model_cls=model_cls)
    if not isinstance(module_or_folder, (str, os.PathLike)):
        raise TypeError(f"from_diffusers takes a {diffusers_class} or a folder path, "
                        f"got {type(module_or_folder).__name__}")
    folder = Path(module_or_folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        hint = f" (a pipeline folder? pass its '{part}' subfolder)" if (folder / part).is_dir() else ""
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}{hint}")
    cfg = _parse_config(config_path, config_cls.from_diffusers_config)
    sd = diffusers_to_ours(_read_diffusers_weights(folder, dtype), cfg)
    return build_with_weights(cfg, sd, source=str(folder), dtype=dtype, model_cls=model_cls)


def _read_diffusers_weights(folder: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The folder's weights, cast to `dtype` (if given) tensor by tensor as they are read."""
    for name in DIFFUSERS_WEIGHTS:
        if (folder / name).is_file():
            return load_safetensors(folder / name, dtype=dtype)
    index = folder / DIFFUSERS_INDEX
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:  # a shard name must not lead out of the folder
                raise ValueError(f"{index}: shard {shard!r} is not a file name in {folder}")
            sd.update(load_safetensors(folder / shard, dtype=dtype))
        return sd
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if pickles:
        raise ValueError(f"{folder} holds only pickle weights {pickles}; latentloom reads safetensors "
                         f"(convert them, or load the module with diffusers and pass it in)")
    raise FileNotFoundError(f"no weights in {folder}; looked for {list(DIFFUSERS_WEIGHTS)} and {DIFFUSERS_INDEX}")


def load_from_ldm(state_dict: Mapping[str, torch.Tensor], *, config: UNetConfig | None = None) -> UNet:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"from_ldm_state_dict takes a dict of tensors, got {type(state_dict).__name__}")
    bare = strip_ldm_prefix(state_dict)
    cfg = config if config is not None else infer_config_from_ldm_state_dict(bare)
    sd = diffusers_to_ours(ldm_to_diffusers(bare, cfg), cfg)
    return build_with_weights(cfg, sd, source="LDM state dict")


def save_pretrained(model: UNet, folder: str | os.PathLike) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Weights first, config last: a folder with a config always has its weights.
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_atomic(folder / WEIGHTS_NAME, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt", "latentloom": "unet"}))
    model.config.save_json(folder / CONFIG_NAME)


def load_pretrained(folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> UNet:
    """Our folder (config.json + model.safetensors) or a diffusers UNet folder."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}")
    raw = read_json_object(config_path)
    if "_class_name" in raw or "block_out_channels" in raw:
        return load_from_diffusers(folder, dtype=dtype)
    cfg = _parse_config(config_path, UNetConfig.from_dict)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}")
    return build_with_weights(cfg, load_safetensors(weights, dtype=dtype), source=str(weights), dtype=dtype)


def _parse_config(path: Path, parse) -> UNetConfig:
    """parse(dict) -> UNetConfig, with wrong types and missing fields reported against the file."""
    try:
        return parse(read_json_object(path))
    except (TypeError, ValueError, KeyError) as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: {err}") from err
