"""Which task trains what (`TASKS`), and what every task reads: the captioned data and the frozen text encoder.

From scratch: ``cfg.model_config`` (a JSON file of the model's config; a small default
when absent). Fine-tuning: ``cfg.pretrained`` (a model folder, "bundled:NAME", or for the UNet a
Stable Diffusion folder or single file). Each kind of model sets its task up in its own module.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from latentloom.training.config import TrainConfig


def load_dataset(cfg: TrainConfig):
    from latentloom.training.data import CaptionedImageDataset

    if cfg.data is None:
        raise ValueError(f"training model={cfg.model!r} needs data=<folder of captioned images>")
    return CaptionedImageDataset(cfg.data, resolution=cfg.resolution, crop=cfg.crop, random_flip=cfg.random_flip,
                                 seed=cfg.seed)


def captions_as_plain_text(text_encoder) -> None:
    """Set a pipeline's text encoder(s) to read captions: plain text (no "(word:1.2)" weighting), and a
    big cache so that each caption is encoded once."""
    for encoder in getattr(text_encoder, "encoders", [text_encoder]):
        encoder.weighting = False
        encoder.cache_size = 1 << 16


def load_frozen_model(source, *, device: torch.device, purpose: str):
    """The text-to-image model a task learns from without changing it (the LCM teacher, the model a
    ControlNet steers): in fp32 on `device`, its VAE frozen, its text encoders kept and reading captions.
    Refused, naming why: an SDXL refiner, an LCM-distilled UNet, a UNet that is not text-to-image.
    purpose: what the task is, for those messages ("distillation", "ControlNet training")."""
    from latentloom.pipelines.loading import load_pipeline

    pipe = load_pipeline(source, device=device, dtype=torch.float32)
    pipe.release_text_encoders = False  # they encode every uncached batch's captions
    if hasattr(pipe.text_encoder, "encoders") and pipe.text_encoder.encoder_1 is None:
        raise ValueError(f"{source} is an SDXL refiner (no first text encoder, an aesthetic score for its "
                         f"vector): {purpose} needs a base model")
    if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
        raise ValueError(f"{source} is LCM-distilled (its UNet has a guidance embedding): {purpose} needs the "
                         "model it was distilled from")
    if pipe.unet.config.in_channels != pipe.latent_channels:
        raise ValueError(f"{source}: {purpose} needs a text-to-image UNet ({pipe.latent_channels} input "
                         f"channels), this one has {pipe.unet.config.in_channels}")
    captions_as_plain_text(pipe.text_encoder)
    pipe.vae.requires_grad_(False).eval()
    return pipe


def load_text_encoder(kind: str, *, device: torch.device, folder: str | Path | None = None):
    """The frozen text encoder named in the model folder: "minilm" (the bundled one), "clip" (a
    fine-tuned Stable Diffusion's: ``folder/text_encoder`` + ``folder/tokenizer``), or "sdxl" (a
    fine-tuned SDXL's pair, with text_encoder_2/ + tokenizer_2/)."""
    from latentloom import text_encoders

    # Captions are plain text (no "(word:1.2)" weighting); a big cache encodes each caption once.
    if kind == "minilm":
        return text_encoders.MiniLMEncoder(weighting=False, cache_size=1 << 16).to(device)
    if kind == "clip" and folder is not None:
        return text_encoders.CLIPEncoder.from_pretrained(folder, weighting=False, cache_size=1 << 16).to(device)
    if kind == "sdxl" and folder is not None:
        from latentloom.text_encoders.sdxl import SDXLTextEncoders

        return SDXLTextEncoders.from_pretrained(folder, weighting=False, cache_size=1 << 16).to(device)
    raise ValueError(f"text_encoder {kind!r} is not supported by `latentloom train` here; use 'minilm' "
                     "(or fine-tune a folder whose model_index.json names a 'clip' or 'sdxl' text encoder)")


def _resolve_bundled(cfg: TrainConfig) -> TrainConfig:
    """pretrained="bundled:NAME" -> the installed weights/NAME folder (the run's saved config keeps the name)."""
    from latentloom.weights import bundled_model_dir, bundled_name

    if not (isinstance(cfg.pretrained, str) and cfg.pretrained.startswith("bundled:")):
        return cfg
    folder = bundled_model_dir(bundled_name(cfg.pretrained))
    return TrainConfig.from_dict({**cfg.to_dict(), "pretrained": str(folder)})


# What `latentloom train --model KIND` trains: the function that sets up each kind's task, in that
# task's own module ("module:function", imported when used).
TASKS = {
    "vae": "latentloom.training.task_vae:build_vae_task",
    "clip": "latentloom.training.task_clip:build_clip_task",
    "unet": "latentloom.training.task_unet_setup:build_unet_task",
    "upscaler": "latentloom.training.task_unet_setup:build_unet_task",
    "lcm": "latentloom.training.task_lcm:build_lcm_task",
    "controlnet": "latentloom.training.task_controlnet:build_controlnet_task",
}


def make_task(cfg: TrainConfig, *, device: torch.device, is_main: bool = True,
              barrier: Callable[[], None] = lambda: None):
    """The task for cfg.model: its model, data, frozen encoders, loss and export (see TASKS)."""
    import importlib

    cfg = _resolve_bundled(cfg)
    module, function = TASKS[cfg.model].split(":")
    return getattr(importlib.import_module(module), function)(cfg, device=device, is_main=is_main, barrier=barrier)
