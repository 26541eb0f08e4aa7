"""Loading a VAE, one way for every caller (pipelines, training, evaluation): diffusers' VAE folders
and the VAE inside original single-file checkpoints, into latentloom's AutoencoderKL (no diffusers
import), or a weightless PixelShuffleVAE."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from latentloom.file_io import read_json_object


def load_vae(folder: str | os.PathLike, *, dtype: torch.dtype | None = None):
    """A VAE folder: config.json + safetensors weights (each file checked first; every weight must
    fit the config, and a missing, extra or wrongly-shaped one is an error naming it), or a
    weightless PixelShuffleVAE config."""
    from latentloom.vae.autoencoder import AutoencoderKL
    from latentloom.vae.config import VAEConfig
    from latentloom.vae.convert import rename_old_attention
    from latentloom.vae.pixel_shuffle import is_pixel_shuffle_folder, load_pixel_shuffle
    from latentloom.weight_files import load_safetensors

    folder = Path(folder)
    if is_pixel_shuffle_folder(folder):  # weightless: its config.json is all of it
        return load_pixel_shuffle(folder).eval()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no VAE weights (*.safetensors) in {folder}; pickle weights are not loaded")
    config = VAEConfig.from_diffusers_config(read_json_object(folder / "config.json"),
                                             source=str(folder / "config.json"))
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_safetensors(path, dtype=dtype))
    vae = AutoencoderKL(config)
    load_state_exact(vae, rename_old_attention(state), str(folder))
    if dtype is not None:
        vae.to(dtype)
    return vae.eval()


def vae_from_ldm(state: Mapping[str, torch.Tensor], *, scaling_factor: float, sample_size: int, source: str):
    """The VAE of an original single-file checkpoint from its bare LDM keys (no `first_stage_model.`)."""
    import dataclasses

    from latentloom.vae.autoencoder import AutoencoderKL
    from latentloom.vae.convert import infer_config_from_ldm, ldm_to_diffusers

    config = dataclasses.replace(infer_config_from_ldm(state, scaling_factor=scaling_factor), sample_size=sample_size)
    vae = AutoencoderKL(config)
    load_state_exact(vae, ldm_to_diffusers(state), source)
    return vae.eval()


def load_state_exact(vae: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `vae`, every key and shape matching, or a ValueError listing the differences."""
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                    for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{source}: the VAE weights do not fit its config"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                parts.append(f"{label} ({len(keys)}): {keys[:12]}{' ...' if len(keys) > 12 else ''}")
        raise ValueError("; ".join(parts))
    vae.load_state_dict(dict(state), strict=True)
