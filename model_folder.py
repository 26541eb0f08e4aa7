"""The model folder: what `latentloom.load_pipeline` reads and `latentloom train` writes.

    OUT/model_index.json        {"format": "latentloom", "version": 1, "text_encoder": {...}, "resolution": R}
    OUT/unet/                   UNet.save_pretrained
    OUT/vae/                    AutoencoderKL.save_pretrained (or a weightless PixelShuffleVAE config)
    OUT/scheduler/scheduler_config.json
    OUT/clip/                   the small image-text model (optional)
    OUT/upscaler/               its own model_index.json + unet/ + scheduler/ (optional)

A diffusers folder has the same component folders and a model_index.json naming classes. Each
component is written to a temp folder and renamed into place, and model_index.json is written
last (temp file + rename): a folder that has a model_index.json never has a half-written
component, and a kill during export leaves the previous component whole. A model part: it
imports only the other model parts.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from latentloom.file_io import default_mode, fsync_tree, read_json_object, replace_folder, write_json_atomic

FORMAT = "latentloom"
FORMAT_VERSION = 1
INDEX_NAME = "model_index.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


def read_model_index(folder: str | os.PathLike) -> dict[str, Any]:
    """FOLDER/model_index.json as a dict (clear errors for a missing or broken file)."""
    return read_json_object(Path(folder) / INDEX_NAME)


def is_latentloom_folder(folder: str | os.PathLike) -> bool:
    """A folder written by `latentloom train` (not a diffusers one)."""
    index = Path(folder) / INDEX_NAME
    return index.is_file() and read_json_object(index).get("format") == FORMAT


def scheduler_config(
    *,
    num_train_timesteps: int,
    beta_schedule: str,
    beta_start: float,
    beta_end: float,
    prediction_type: str,
    rescale_zero_terminal_snr: bool,
) -> dict[str, Any]:
    """The training noise schedule in diffusers' scheduler_config.json keys."""
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": beta_schedule,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "prediction_type": prediction_type,
        # Zero terminal SNR needs sampling to start at the last timestep (Lin et al. 2024, sec. 3.3).
        "timestep_spacing": "trailing" if rescale_zero_terminal_snr else "leading",
        "steps_offset": 0 if rescale_zero_terminal_snr else 1,
        "rescale_betas_zero_snr": rescale_zero_terminal_snr,
        "clip_sample": False,
        "set_alpha_to_one": False,
        # every key stated: a left-out one would take each sampler's diffusers class default
        "use_karras_sigmas": False,
    }


def read_scheduler_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / SCHEDULER_CONFIG
    if not path.is_file():
        raise ValueError(f"{folder} is not a model folder: {path} is missing")
    return read_json_object(path)


def update_model_index(output: str | os.PathLike, **values: Any) -> dict[str, Any]:
    """Merge values into OUT/model_index.json (keeping keys other stages wrote)."""
    path = Path(output) / INDEX_NAME
    index = read_json_object(path) if path.is_file() else {}
    index.update({"format": FORMAT, "version": FORMAT_VERSION}, **values)
    write_json_atomic(path, index)
    return index


def write_component(output: str | os.PathLike, name: str, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_folder)``, then swap tmp_folder into ``output/name``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output, prefix=f".tmp-{name}-"))
    try:
        write(tmp)
        for path in [tmp, *tmp.rglob("*")]:
            if path.is_dir() or path.is_file():
                default_mode(path, folder=path.is_dir())
        fsync_tree(tmp)
        return replace_folder(tmp, output / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_component(source: str | os.PathLike, output: str | os.PathLike, name: str) -> Path:
    source = Path(source)
    if source.resolve() == (Path(output) / name).resolve():
        return source  # already in place (e.g. OUT/vae trained into the same OUT)
    return write_component(output, name, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))


def find_vae_folder(path: str | os.PathLike) -> Path:
    """A VAE folder (config.json + weights) given itself or a model folder holding vae/."""
    from latentloom.vae.pixel_shuffle import is_pixel_shuffle_folder

    path = Path(path)
    for candidate in (path, path / "vae"):
        if (candidate / "config.json").is_file() and (any(candidate.glob("*.safetensors"))
                                                      or is_pixel_shuffle_folder(candidate)):
            return candidate
    raise ValueError(
        f"{path} is not a VAE folder: expected config.json + *.safetensors in it or in {path / 'vae'}"
    )
