"""Original single-file SDXL checkpoints (`sd_xl_base_1.0.safetensors`, the refiner, inpainting).

Beside the UNet (`model.diffusion_model.`, with its `label_emb` vector conditioning) and the VAE
(`first_stage_model.`), the file holds sgm's conditioner: the base's `conditioner.embedders.0` is CLIP
ViT-L in transformers' layout and `conditioner.embedders.1` OpenCLIP bigG (in_proj split into q/k/v,
the text projection transposed, by diffusers' converter); the refiner's `conditioner.embedders.0` is
bigG alone. The settings the file does not carry are those of the releases diffusers' `from_single_file`
reads for SDXL: the VAE's scaling factor 0.13025, the scheduler of SDXL base 1.0
(tests/data/release_configs), force_zeros_for_empty_prompt (base: true, refiner: false).
"""
from __future__ import annotations

from pathlib import Path

import torch

from latentloom.pipelines.defaults import call_defaults
from latentloom.pipelines.pipeline import Pipeline

CONDITIONER = "conditioner.embedders."
SDXL_VAE_SCALING = 0.13025
# SDXL base 1.0's scheduler/scheduler_config.json, the keys ScheduleConfig models, as published
SDXL_SCHEDULER_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                             num_train_timesteps=1000, prediction_type="epsilon", set_alpha_to_one=False,
                             steps_offset=1, timestep_spacing="leading", trained_betas=None, use_karras_sigmas=False)


def is_sdxl_checkpoint(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(CONDITIONER) for k in state)


def build_sdxl(path: Path, state: dict[str, torch.Tensor], unet, vae, *, tokenizer) -> Pipeline:
    """The SDXL pipeline of a single file whose UNet and VAE are built; `tokenizer`: a folder holding
    tokenizer/ and tokenizer_2/ (a diffusers SDXL folder), or tokenizer_2/ alone for the refiner."""
    from latentloom.pipelines.single_file_text import clip_l_text_model, open_clip_text_model
    from latentloom.samplers.schedules import ScheduleConfig
    from latentloom.text_encoders.clip import CLIPEncoder
    from latentloom.text_encoders.sdxl import SDXL_CLIP_SKIP, SDXL_FINAL_LAYER_NORM, SDXLTextEncoders

    refiner = not any(k.startswith(CONDITIONER + "1.") for k in state)
    bigg = CONDITIONER + ("0" if refiner else "1") + ".model."
    tok_2 = _tokenizer(tokenizer, path, "tokenizer_2")
    second = open_clip_text_model(state, path, prefix=bigg, projection=True, token_ids=_ids(tok_2))
    first = tok_1 = None
    if not refiner:
        tok_1 = _tokenizer(tokenizer, path, "tokenizer")
        first = clip_l_text_model(state, path, prefix=CONDITIONER + "0.transformer.", token_ids=_ids(tok_1))
    for tok, model, sub in ((tok_1, first, "tokenizer"), (tok_2, second, "tokenizer_2")):
        if model is not None and len(tok) != model.config.vocab_size:
            raise ValueError(f"the tokenizer in {Path(tokenizer) / sub} has {len(tok)} tokens but the checkpoint's "
                             f"text encoder has {model.config.vocab_size}; give the tokenizers of {path.name}")
    kw = dict(clip_skip=SDXL_CLIP_SKIP, final_layer_norm=SDXL_FINAL_LAYER_NORM)
    encoders = SDXLTextEncoders(None if first is None else CLIPEncoder(first, tok_1, **kw),
                                CLIPEncoder(second, tok_2, **kw), force_zeros_for_empty_prompt=not refiner)
    vae.config.scaling_factor = SDXL_VAE_SCALING
    schedule = ScheduleConfig.from_diffusers_config(SDXL_SCHEDULER_CONFIG)
    return Pipeline(unet=unet, vae=vae, text_encoder=encoders, schedule_config=schedule, name=str(path),
                    use_context_mask=False, weights_files=[path],
                    defaults=call_defaults(1024, sdxl=True, guidance_embedded=unet.config.guidance_embedded))


def _tokenizer(folder, path: Path, subfolder: str):
    """The CLIP tokenizer in FOLDER/subfolder."""
    from transformers import CLIPTokenizer

    if folder is None:
        raise FileNotFoundError(f"{path.name} does not contain its tokenizers: pass tokenizer='an SDXL folder with "
                                "tokenizer/ and tokenizer_2/' (a diffusers SDXL folder has them)")
    where = Path(folder) / subfolder
    if not any((where / name).is_file() for name in ("vocab.json", "tokenizer.json")):
        raise FileNotFoundError(f"no CLIP tokenizer in {where} (expected vocab.json + merges.txt, or tokenizer.json)")
    return CLIPTokenizer.from_pretrained(str(where), local_files_only=True)


def _ids(tokenizer) -> dict[str, int]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}
