"""Write trained models as the folder ``latentloom.load_pipeline`` reads.

    OUT/model_index.json        {"format": "latentloom", "version": 1, "text_encoder": {...}, "resolution": R}
    OUT/unet/                   UNet.save_pretrained
    OUT/vae/                    AutoencoderKL.save_pretrained
    OUT/scheduler/scheduler_config.json
    OUT/clip/                   the small image-text model (optional)
    OUT/upscaler/               its own model_index.json + unet/ + scheduler/ (optional)

Each component is written to a temp folder and renamed into place, and model_index.json
is written last (temp file + rename): a folder that has a model_index.json never has a
half-written component, and a kill during export leaves the previous component whole.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

FORMAT_VERSION = 1


def write_component(output: str | os.PathLike, name: str, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_folder)``, then swap tmp_folder into ``output/name``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output, prefix=f".tmp-{name}-"))
    final = output / name
    try:
        write(tmp)
        # mkdtemp/mkstemp make owner-only entries; an exported model (e.g. the bundled one, shipped
        # in the package) must be readable by everyone the umask allows
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.rglob("*")]:
            if path.is_dir():
                os.chmod(path, 0o777 & ~umask)
            elif path.is_file():
                os.chmod(path, 0o666 & ~umask)
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=output, prefix=f".old-{name}-"))
            os.rename(final, old / name)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ValueError(f"{folder} is not a model folder: {path} is missing")
    return json.loads(path.read_text())


def update_model_index(output: str | os.PathLike, **values: Any) -> dict[str, Any]:
    """Merge values into OUT/model_index.json (keeping keys other stages wrote)."""
    path = Path(output) / "model_index.json"
    index = json.loads(path.read_text()) if path.is_file() else {}
    index.update({"format": "latentloom", "version": FORMAT_VERSION}, **values)
    write_json_atomic(path, index)
    return index


def find_vae_folder(path: str | os.PathLike) -> Path:
    """A VAE folder (config.json + weights) given itself or a model folder holding vae/."""
    from latentloom.pipelines.pixel_shuffle_vae import is_pixel_shuffle_folder

    path = Path(path)
    for candidate in (path, path / "vae"):
        if (candidate / "config.json").is_file() and (any(candidate.glob("*.safetensors"))
                                                      or is_pixel_shuffle_folder(candidate)):
            return candidate
    raise ValueError(
        f"{path} is not a VAE folder: expected config.json + *.safetensors in it or in {path / 'vae'}"
    )


def copy_component(source: str | os.PathLike, output: str | os.PathLike, name: str) -> Path:
    source = Path(source)
    if source.resolve() == (Path(output) / name).resolve():
        return source  # already in place (e.g. OUT/vae trained into the same OUT)
    return write_component(output, name, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))
