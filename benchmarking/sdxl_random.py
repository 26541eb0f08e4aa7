"""SDXL-sized random weights saved once as a diffusers `StableDiffusionXLPipeline` folder, which both
libraries then load the way a user's download is loaded, each in its own process.

Two SDXL UNets (2.6 B parameters, 10.3 GB each in fp32) do not fit one 24 GiB process beside each
other, so the SDXL benchmarks cannot alternate two models in one process as the SD-1.5 ones do:
the folder is written once (part by part, so the writer holds one part at a time) and every
measurement is a fresh process reading it.

Presets: "sdxl" (SDXL base 1.0's shapes: the UNet, CLIP ViT-L 12 x 768 and OpenCLIP bigG 32 x 1280
with a 1280 projection, the SDXL VAE) and "sdxl-tiny" (the same families at a few M parameters,
for tests). Tokenizers are `sd_random`'s byte-level vocabulary; the second pads with "!" as bigG's.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

PRESETS = ("sdxl", "sdxl-tiny")
COMPLETE = ".complete"  # written last: a folder without it was interrupted and is rebuilt


def check_preset(preset: Any) -> str:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    return preset


def unet_config(preset: str):
    """latentloom UNetConfig: SDXL base's, or two levels with the same vector conditioning layout."""
    from latentloom.unet import UNetConfig

    if check_preset(preset) == "sdxl":
        return UNetConfig.sdxl()
    return UNetConfig(channels=[32, 64], layers_per_level=1, attention_levels=[False, True], num_heads=None,
                      head_dim=16, transformer_depth=[1, 2], context_dim=96, use_linear_projection=True,
                      norm_groups=16, adm_in_channels=64 + 6 * 16, addition_time_embed_dim=16)


def text_configs(preset: str):
    """(CLIP ViT-L's CLIPTextConfig, OpenCLIP bigG's) at SDXL's sizes, or 32- and 64-wide ones."""
    from transformers import CLIPTextConfig

    from latentloom.benchmarking.sd_random import SD15_VOCAB_SIZE, byte_vocab

    if check_preset(preset) == "sdxl":
        first = dict(vocab_size=SD15_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
        second = dict(vocab_size=SD15_VOCAB_SIZE, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
    else:
        first = dict(vocab_size=len(byte_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, projection_dim=32, hidden_act="quick_gelu")
        second = dict(vocab_size=len(byte_vocab()), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, projection_dim=64, hidden_act="gelu")
    common = dict(max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextConfig(**first, **common), CLIPTextConfig(**second, **common)


def vae_config(preset: str) -> dict[str, Any]:
    """The SDXL VAE's config (SD's architecture; scaling 0.13025, fp16 upcast, 1024 px tiles)."""
    from latentloom.benchmarking.sd_random import vae_config as sd_vae_config

    config = sd_vae_config("sd15" if check_preset(preset) == "sdxl" else "tiny")
    return {**config, "scaling_factor": 0.13025, "force_upcast": True, "sample_size": 1024}


def default_root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "latentloom" / "bench"


def saved_folder(preset: str, *, seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """ROOT/<preset>-seed<seed>: the random SDXL folder, written now unless a complete one is there
    (default ROOT: ~/.cache/latentloom/bench; sdxl takes ~14 GB of disk)."""
    check_preset(preset)
    folder = Path(root or default_root()) / f"{preset}-seed{seed}"
    if (folder / COMPLETE).is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_folder(preset, folder, seed=seed)
    (folder / COMPLETE).write_text("")
    return folder


def write_folder(preset: str, folder: Path, *, seed: int) -> None:
    """Each part built from `seed`, saved in diffusers' layout and freed before the next."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from latentloom.benchmarking.sd_random import tokenizer
    from latentloom.pipelines.single_file_sdxl import SDXL_SCHEDULER_CONFIG

    torch.manual_seed(seed)
    config = {**unet_config(preset).to_diffusers_config(), "sample_size": 128 if preset == "sdxl" else 32}
    unet = diffusers.UNet2DConditionModel(**config)
    unet.save_pretrained(folder / "unet")
    del unet
    torch.manual_seed(seed + 1)
    diffusers.AutoencoderKL(**vae_config(preset)).save_pretrained(folder / "vae")
    first, second = text_configs(preset)
    torch.manual_seed(seed + 2)
    CLIPTextModel(first).save_pretrained(folder / "text_encoder")
    torch.manual_seed(seed + 3)
    CLIPTextModelWithProjection(second).save_pretrained(folder / "text_encoder_2")
    for name in ("tokenizer", "tokenizer_2"):
        (folder / name).mkdir()
        tok = tokenizer(folder / name)
        if name == "tokenizer_2":
            tok.pad_token = "!"
        tok.save_pretrained(folder / name)
    diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
             "force_zeros_for_empty_prompt": True, "feature_extractor": [None, None], "image_encoder": [None, None],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
