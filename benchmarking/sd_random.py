"""Stable-Diffusion-sized components with random weights, built in memory (no hub, no network),
and the same weights behind a diffusers `StableDiffusionPipeline` and a latentloom `Pipeline`.

Presets: "sd15" (SD 1.5 shapes: 860 M-parameter UNet, the SD VAE, a 12-layer 768-wide CLIP
text model with 77 positions) and "tiny" (the same architecture families at a few M
parameters, so a test can run a whole benchmark in seconds). The tokenizer is a byte-level
character vocabulary (CLIP's 256 byte symbols, each also as a word end, no merges) written
to a temporary folder: tokens are characters, the sequence length is SD's 77.
"""
from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PRESETS = ("sd15", "tiny")

# Stable Diffusion 1.5's scheduler/scheduler_config.json (PNDM, PLMS steps only)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None,
)
SD15_VOCAB_SIZE = 49408  # CLIP's vocabulary: the embedding has SD's size even if the tokenizer uses 514 ids


@dataclass
class RandomSD:
    """The two pipelines on identical weights (separate copies, so each can change dtype alone)."""

    diffusers: Any  # diffusers.StableDiffusionPipeline
    latentloom: Any  # latentloom.pipelines.pipeline.Pipeline
    preset: str


def check_preset(preset: Any) -> str:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    return preset


def unet_config(preset: str):
    """latentloom UNetConfig of the preset (sd15: SD 1.5; tiny: 3 levels, 32-64 channels)."""
    from latentloom.unet import UNetConfig

    if check_preset(preset) == "sd15":
        return UNetConfig.sd15()
    return UNetConfig(channels=[32, 64, 64], layers_per_level=1, attention_levels=[True, True, False],
                      num_heads=2, context_dim=64, norm_groups=16)


def diffusers_unet(preset: str, *, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(preset).to_diffusers_config()).eval()


def vae_config(preset: str) -> dict[str, Any]:
    """AutoencoderKL arguments: SD's four levels (factor 8); SD's widths for sd15."""
    widths, groups = ((128, 256, 512, 512), 32) if check_preset(preset) == "sd15" else ((16, 32, 32, 32), 8)
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=widths,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2 if preset == "sd15" else 1, norm_num_groups=groups, act_fn="silu",
                sample_size=512, scaling_factor=0.18215)


def vae(preset: str, *, seed: int = 0):
    from diffusers import AutoencoderKL

    config = vae_config(preset)
    torch.manual_seed(seed)
    return AutoencoderKL(**config).eval()


def byte_vocab() -> dict[str, int]:
    """CLIP's layout with no merges: start/end tokens, then each byte symbol and its word-end form."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in bytes_to_unicode().values():
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    return vocab


def tokenizer(folder: str | Path | None = None):
    """A CLIPTokenizer read from vocab.json + merges.txt generated into `folder` (a temp dir by default)."""
    from transformers import CLIPTokenizer

    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            return tokenizer(tmp)
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(byte_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: tokens are single bytes
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)


def text_config(preset: str):
    """CLIPTextConfig: SD 1.5's (12 layers, 768 wide, 12 heads, 77 positions) or a 2-layer 64-wide one."""
    from transformers import CLIPTextConfig

    if check_preset(preset) == "sd15":
        shape = dict(vocab_size=SD15_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, projection_dim=768)
    else:
        shape = dict(vocab_size=len(byte_vocab()), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, projection_dim=64)
    return CLIPTextConfig(**shape, max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)


def text_model(preset: str, *, seed: int = 0):
    from transformers import CLIPTextModel

    config = text_config(preset)
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def build(*, preset: str = "sd15", seed: int = 0, resolution: int | None = None) -> RandomSD:
    """Both pipelines, fp32 on CPU, from one set of seeded random weights.

    diffusers: a `StableDiffusionPipeline` as SD 1.5 ships (PNDM, no safety checker).
    latentloom: UNet converted from the diffusers module, a copy of the VAE, a CLIPEncoder
    around a copy of the text model; its call defaults are latentloom's (`CallDefaults`) at
    `resolution` (default 512 for sd15, 64 for tiny).
    """
    import diffusers

    from latentloom.pipelines.defaults import CallDefaults
    from latentloom.pipelines.pipeline import Pipeline
    from latentloom.samplers.schedules import ScheduleConfig
    from latentloom.text_encoders import CLIPEncoder
    from latentloom.unet import UNet

    check_preset(preset)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    side = default_resolution(preset) if resolution is None else check_resolution(resolution)
    unet = diffusers_unet(preset, seed=seed)
    autoencoder = vae(preset, seed=seed + 1)
    text = text_model(preset, seed=seed + 2)
    tok = tokenizer()
    scheduler = diffusers.PNDMScheduler(**SD15_SCHEDULER)
    reference = diffusers.StableDiffusionPipeline(
        vae=autoencoder, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    ours = Pipeline(
        unet=UNet.from_diffusers(unet).eval(), vae=copy.deepcopy(autoencoder),
        text_encoder=CLIPEncoder(copy.deepcopy(text), tok),
        schedule_config=ScheduleConfig.from_diffusers_config(dict(scheduler.config)),
        name=f"random:{preset}", use_context_mask=False, defaults=CallDefaults(height=side, width=side),
    )
    return RandomSD(diffusers=reference, latentloom=ours, preset=preset)


def default_resolution(preset: str) -> int:
    return 512 if check_preset(preset) == "sd15" else 64


def check_resolution(resolution: Any) -> int:
    """Image side in pixels: a positive multiple of 8 (the VAE's factor) whose latent side the
    UNet's three downsamplings divide, i.e. a multiple of 64."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 64 or resolution % 64:
        raise ValueError(f"resolution must be a multiple of 64 and >= 64 (e.g. 512), got {resolution!r}")
    return resolution


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' info warnings (e.g. on every `.to(dtype)`): the
    benchmark's output is its tables."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
