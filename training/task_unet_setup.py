"""Setting up the denoiser's training task (`task_unet.UNetTask`): a text-to-image UNet or an upscaler,
from scratch (cfg.model_config, or a small default), from a latentloom model folder, or from a
foreign Stable Diffusion model (a diffusers folder or a single file, loaded by the pipeline loader).
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from latentloom.file_io import read_json_object
from latentloom.model_folder import (
    INDEX_NAME, find_vae_folder, is_latentloom_folder, read_model_index, read_scheduler_config,
)
from latentloom.training.config import PIXEL_SHUFFLE, TrainConfig
from latentloom.training.objective import train_alphas_cumprod
from latentloom.training.tasks import captions_as_plain_text, load_dataset, load_text_encoder
from latentloom.vae.loading import load_vae


def build_unet_task(cfg: TrainConfig, *, device: torch.device, is_main: bool, barrier: Callable[[], None]):
    """The UNetTask for cfg.model "unet" or "upscaler"."""
    if cfg.model == "unet" and cfg.pretrained is not None and not is_latentloom_folder(cfg.pretrained):
        return _foreign_unet_task(cfg, device=device, is_main=is_main, barrier=barrier)
    use_context_mask = True
    if cfg.pretrained is not None and cfg.model == "upscaler":
        cfg = _match_pretrained_residual(cfg, upscaler_folder(cfg.pretrained))
    if cfg.pretrained is not None and cfg.model in ("unet", "upscaler"):
        index_folder = upscaler_folder(cfg.pretrained) if cfg.model == "upscaler" else Path(cfg.pretrained)
        index = read_model_index(index_folder)
        kind = (index.get("text_encoder") or {}).get("kind", "minilm")
        use_context_mask = bool(index.get("use_context_mask", True))
        if kind != cfg.text_encoder:
            cfg = TrainConfig.from_dict({**cfg.to_dict(), "text_encoder": kind})
    text_encoder = load_text_encoder(cfg.text_encoder, device=device, folder=cfg.pretrained)

    from latentloom.vae.codec import vae_scale_factor
    from latentloom.training.task_unet import UNetTask
    from latentloom.unet import UNet

    upscaler = cfg.model == "upscaler"
    vae = vae_source = copy_from = None
    if cfg.pretrained is not None:
        source = upscaler_folder(cfg.pretrained) if upscaler else Path(cfg.pretrained)
        cfg = _check_schedule_matches(cfg, read_scheduler_config(source), source)
        unet = UNet.from_pretrained(source / "unet")
        if (source / "vae").is_dir():
            vae_source = source / "vae"
        copy_from = None if upscaler else source
    else:
        unet = None
    if cfg.vae == PIXEL_SHUFFLE:
        if not upscaler:
            raise ValueError(f"vae='{PIXEL_SHUFFLE}' is for the upscaler (--model upscaler); a {cfg.model} "
                             "without a VAE folder already trains in pixel space")
        from latentloom.vae.pixel_shuffle import PixelShuffleVAE, factor_for

        from latentloom.pipelines.upscale_residual import RESIDUAL_SCALE

        vae = PixelShuffleVAE(factor_for(cfg.resolution, cfg.low_resolution),
                              scaling_factor=RESIDUAL_SCALE if cfg.residual else 1.0).to(device)
    elif cfg.vae is not None:
        vae_source = find_vae_folder(cfg.vae)
    elif vae_source is None and (Path(cfg.output) / "vae").is_dir():
        vae_source = find_vae_folder(Path(cfg.output) / "vae")  # a VAE trained into the same OUT
    if vae_source is not None:
        vae = load_vae(vae_source).to(device).eval().requires_grad_(False)
    if cfg.residual:
        from latentloom.vae.pixel_shuffle import is_pixel_shuffle

        if not is_pixel_shuffle(vae):
            raise ValueError(f"residual=True learns in pixel space, but the VAE from {vae_source} is a "
                             f"{type(vae).__name__}: use vae='{PIXEL_SHUFFLE}'")
    if upscaler:
        # SD-x4-upscaler style, as pipelines.upscale samples it: the low-res image sits beside
        # latents of the same size, so the VAE's factor is the upscaling factor.
        if vae is None:
            raise ValueError(f"the upscaler learns VAE latents: pass vae=<folder> (or train {cfg.output}/vae first), "
                             f"or vae='{PIXEL_SHUFFLE}' for pixel space")
        factor = vae_scale_factor(vae)
        if cfg.low_resolution * factor != cfg.resolution:
            raise ValueError(
                f"the upscaler's VAE downsamples by {factor}, so resolution must be low_resolution x {factor} = "
                f"{cfg.low_resolution * factor}, got resolution={cfg.resolution}, low_resolution={cfg.low_resolution}"
            )
    if vae is None and not upscaler and is_main:
        print(f"latentloom train: no VAE (pass vae=<folder> or train one into {cfg.output}/vae first): "
              "the UNet learns in pixel space, and load_pipeline needs a vae/ to load the result")
    if unet is None:
        image_channels = vae.config.latent_channels if vae is not None else 3
        config = _unet_config(
            cfg, in_channels=image_channels + (3 if upscaler else 0), out_channels=image_channels,
            context_dim=text_encoder.hidden_size, upscaler=upscaler,
        )
        unet = UNet(config)
    dataset = load_dataset(cfg)
    if cfg.cache_latents:
        dataset = build_latent_cache(cfg, dataset, vae=vae, vae_source=vae_source, text_encoder=text_encoder,
                                     device=device, is_main=is_main, barrier=barrier)
    alphas_cumprod = _prepare_unet(cfg, unet)
    index = {}
    if cfg.text_encoder == "sdxl":
        index["force_zeros_for_empty_prompt"] = text_encoder.force_zeros_for_empty_prompt
    return UNetTask(cfg, unet=unet, text_encoder=text_encoder, dataset=dataset, alphas_cumprod=alphas_cumprod,
                    vae=vae, vae_source=vae_source, copy_from=copy_from, upscaler=upscaler,
                    use_context_mask=use_context_mask, index=index)


def _prepare_unet(cfg: TrainConfig, unet: Any) -> torch.Tensor:
    """Gradient checkpointing and LoRA adapters as the run asks; returns the training schedule's
    cumulative alphas (T,)."""
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.lora_rank:
        from latentloom.training.lora import add_lora

        add_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    return train_alphas_cumprod(
        num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule, beta_start=cfg.beta_start,
        beta_end=cfg.beta_end, rescale_zero_terminal_snr=cfg.rescale_zero_terminal_snr,
    )


def _unet_config(cfg: TrainConfig, *, in_channels: int, out_channels: int, context_dim: int, upscaler: bool):
    from latentloom.unet import UNetConfig

    if cfg.model_config is not None:
        # A hand-written config may name only what differs from UNetConfig's defaults.
        values = read_json_object(cfg.model_config)
        known = {f.name for f in dataclasses.fields(UNetConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cfg.model_config}: unknown UNetConfig fields {unknown}; known: {sorted(known)}")
        config = UNetConfig(**values)
    else:
        extra = {"num_class_embeds": cfg.max_noise_level + 1} if upscaler else {}
        config = UNetConfig.tiny(in_channels=in_channels, out_channels=out_channels, context_dim=context_dim, **extra)
    if config.context_dim != context_dim:
        raise ValueError(f"the UNet config has context_dim={config.context_dim}, the text encoder gives {context_dim}")
    return config


def _check_schedule_matches(cfg: TrainConfig, schedule: dict[str, Any], source: Path) -> TrainConfig:
    """Fine-tuning keeps the model's own noise schedule and prediction type."""
    keys = {"num_train_timesteps": "num_train_timesteps", "beta_schedule": "beta_schedule",
            "beta_start": "beta_start", "beta_end": "beta_end", "prediction_type": "prediction_type",
            "rescale_betas_zero_snr": "rescale_zero_terminal_snr"}
    changed = {}
    for theirs, ours in keys.items():
        if theirs in schedule and schedule[theirs] != getattr(cfg, ours):
            changed[ours] = schedule[theirs]
    if changed:
        warnings.warn(f"fine-tuning {source}: using its scheduler settings {changed} instead of the run's", stacklevel=4)
        values = cfg.to_dict()
        values.update(changed)
        return TrainConfig.from_dict(values)
    return cfg


def build_latent_cache(cfg: TrainConfig, dataset: Any, *, vae: Any, vae_source: Any, text_encoder: Any,
                       device: torch.device, is_main: bool, barrier: Callable[[], None]):
    """Encode the whole dataset once (main process), then every process reads the file."""
    from latentloom.training.data import LatentCache

    if cfg.model == "upscaler":
        raise ValueError("cache_latents is not supported for the upscaler (it needs the pixels for its condition)")
    if vae is None:
        raise ValueError("cache_latents needs a VAE (pass vae=<folder>); pixel-space training has nothing to cache")
    from latentloom.vae.codec import encode_images

    def encode_image(pixels: torch.Tensor) -> torch.Tensor:
        # The posterior mean: a cache stores one latent per image, and a frozen sample would be worse.
        return encode_images(vae, pixels.to(device), sample=False).float().cpu()

    # Names the VAE by its weights file (path, size, mtime): a retrained VAE invalidates the cache. A
    # foreign model's VAE and text encoders come from one folder or file, named the same way.
    source = Path(vae_source)
    if source.is_dir() and (source / "vae").is_dir():
        source = source / "vae"
    weights = sorted(source.glob("*.safetensors"))[0] if source.is_dir() else source
    stat = weights.stat()
    key = f"vae:{weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}+{cfg.text_encoder}"
    if cfg.text_encoder in ("clip", "sdxl") and cfg.pretrained is not None:
        key += f":{Path(cfg.pretrained).resolve()}"
    path = cfg.checkpoint_dir / f"latent-cache-{cfg.resolution}.safetensors"
    if is_main:
        cache = LatentCache(dataset, encode_image=encode_image, encode_text=text_encoder.encode, path=path, key=key)
        cache.fill()
    barrier()
    if not is_main:
        cache = LatentCache(dataset, encode_image=encode_image, encode_text=text_encoder.encode, path=path, key=key)
    return cache


def upscaler_folder(pretrained: str | Path) -> Path:
    """The upscaler to fine-tune: a model folder's upscaler/ stage, or an upscaler folder itself
    (what `latentloom train --model upscaler` writes to OUT/upscaler)."""
    for folder in (Path(pretrained) / "upscaler", Path(pretrained)):
        if (folder / INDEX_NAME).is_file() and read_model_index(folder).get("kind") == "upscaler":
            return folder
    raise ValueError(f"pretrained={str(pretrained)!r} holds no upscaler: pass a model folder with an upscaler/ "
                     "stage, or an upscaler folder (its model_index.json says \"kind\": \"upscaler\")")


def _match_pretrained_residual(cfg: TrainConfig, folder: Path) -> TrainConfig:
    """A fine-tune learns the same target as the upscaler it starts from (residual or whole image)."""
    residual = read_model_index(folder).get("residual") is not None
    if residual == cfg.residual:
        return cfg
    if cfg.residual:
        raise ValueError(f"residual=True, but {folder} learned whole images (its model_index.json has no "
                         "\"residual\"): fine-tune it without residual")
    warnings.warn(f"fine-tuning {folder}: it learned the residual over bicubic, so this run does too", stacklevel=4)
    return TrainConfig.from_dict({**cfg.to_dict(), "residual": True})


def _foreign_unet_task(cfg: TrainConfig, *, device: torch.device, is_main: bool, barrier: Callable[[], None]):
    """Fine-tune a Stable Diffusion or SDXL model (diffusers folder or single .safetensors file),
    loaded by the pipeline loader; the result is a latentloom folder with its text encoder(s).
    SDXL learns with each image's real original size and crop as its micro-conditioning."""
    from latentloom.pipelines.loading import load_pipeline
    from latentloom.training.task_unet import UNetTask

    pipe = load_pipeline(cfg.pretrained, device="cpu", dtype=torch.float32)
    # the schedule diffusers' training scripts use: the model's config read into a DDPMScheduler
    schedule = dataclasses.asdict(pipe.schedule_config.for_sampler("ddpm"))
    if schedule.get("trained_betas") is not None:
        raise ValueError(f"{cfg.pretrained}: trained_betas schedules are not supported for training")
    cfg = _check_schedule_matches(cfg, schedule, Path(cfg.pretrained))
    text_encoder = pipe.text_encoder.to(device)
    sdxl = hasattr(text_encoder, "encoders")  # SDXLTextEncoders: the CLIP pair
    if sdxl and text_encoder.encoder_1 is None:
        raise ValueError(f"{cfg.pretrained} is an SDXL refiner (its UNet reads an aesthetic score, not the target "
                         "size): fine-tuning refiners is not supported; fine-tune an SDXL base model")
    kind = "sdxl" if sdxl else "clip"
    if cfg.text_encoder != kind:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "text_encoder": kind})
    captions_as_plain_text(text_encoder)
    vae = pipe.vae.to(device).eval().requires_grad_(False)
    unet = pipe.unet
    dataset = load_dataset(cfg)
    if cfg.cache_latents:
        dataset = build_latent_cache(cfg, dataset, vae=vae, vae_source=cfg.pretrained, text_encoder=text_encoder,
                                     device=device, is_main=is_main, barrier=barrier)
    alphas_cumprod = _prepare_unet(cfg, unet)
    writers = {"vae": lambda tmp: vae.save_pretrained(str(tmp), safe_serialization=True)}
    parts = [("", text_encoder.encoder_1), ("_2", text_encoder.encoder_2)] if sdxl else [("", text_encoder)]
    for suffix, encoder in parts:
        writers[f"text_encoder{suffix}"] = lambda tmp, e=encoder: e.model.save_pretrained(str(tmp))
        writers[f"tokenizer{suffix}"] = lambda tmp, e=encoder: e.tokenizer.save_pretrained(str(tmp))
    index = {"force_zeros_for_empty_prompt": text_encoder.force_zeros_for_empty_prompt} if sdxl else {}
    return UNetTask(cfg, unet=unet, text_encoder=text_encoder, dataset=dataset, alphas_cumprod=alphas_cumprod,
                    vae=vae, use_context_mask=pipe.use_context_mask, writers=writers, index=index)
