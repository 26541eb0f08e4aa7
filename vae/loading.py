"""Loading a VAE folder, one way for every caller (pipelines, training, evaluation)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from latentloom.file_io import read_json_object


def load_vae(folder: str | os.PathLike):
    """A VAE folder: diffusers' AutoencoderKL from safetensors (each file checked first, every weight
    required to fit the config), or a weightless PixelShuffleVAE config."""
    from diffusers import AutoencoderKL

    from latentloom.vae.pixel_shuffle import is_pixel_shuffle_folder, load_pixel_shuffle
    from latentloom.weight_files import check_safetensors

    folder = Path(folder)
    if is_pixel_shuffle_folder(folder):  # weightless: its config.json is all of it
        return load_pixel_shuffle(folder).eval()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no VAE weights (*.safetensors) in {folder}; pickle weights are not loaded")
    for path in files:
        check_safetensors(path)
    read_json_object(folder / "config.json")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # low_cpu_mem_usage=False: a missing weight is reported instead of left on the meta device
            vae, info = AutoencoderKL.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                      low_cpu_mem_usage=False, output_loading_info=True)
    except (OSError, RuntimeError, TypeError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{folder}: the VAE could not be built from its config and weights: {err}") from err
    wrong = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if wrong:
        raise ValueError(f"{folder}: the VAE weights do not fit its config.json: {wrong}")
    return vae.eval()
