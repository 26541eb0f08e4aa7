"""`load_pipeline`: the bundled model, a diffusers folder, a latentloom folder, a single-file
Stable Diffusion checkpoint, or (online only) a Hugging Face hub id."""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from latentloom.pipelines.defaults import CallDefaults, call_defaults, resolve_device, resolve_dtype
from latentloom.pipelines.pipeline import Pipeline, UpscalerSettings
from latentloom.file_io import read_json_object
from latentloom.model_folder import FORMAT, INDEX_NAME, read_model_index
from latentloom.samplers.schedules import ScheduleConfig
from latentloom.vae.loading import load_vae
from latentloom.weights import bundled_model_dir, bundled_name

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_pipeline(
    path: str | os.PathLike | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: str | os.PathLike | None = None,
    prediction_type: str | None = None,
    allow_pickle: bool = False,
    unet_config=None,
    channels_last: bool = True,
    compile: bool = False,
    controlnet: Any = None,
) -> Pipeline:
    """Load a model into a `Pipeline`.

    path: None for the bundled default model (offline), "bundled:upscaler" for its bundled
    upscale stage ("bundled:default" names the default); a diffusers Stable Diffusion folder
    (model_index.json with unet / vae / text_encoder / tokenizer / scheduler); a folder
    written by `latentloom train`; an original single-file `.safetensors` SD 1.x / 2.x
    checkpoint; or a hub id such as "org/model" (needs the network).
    device: default CUDA when available, else CPU. dtype: default the fast one for the device
    (`runtime.fast_dtype`: float16 on CUDA, bfloat16 on CPUs with native bf16, else float32);
    pass "fp32" for exact parity with a float32 reference.
    channels_last: run the UNet's convolutions in NHWC (the fast layout on CPU and GPU).
    compile: `torch.compile` the UNet (slow first call; see `Pipeline.compile`).
    tokenizer: single-file checkpoints do not contain their tokenizer: a folder holding CLIP's
    vocab.json + merges.txt (or a diffusers folder's tokenizer/).
    prediction_type: override the prediction type of a single-file checkpoint ("epsilon" or
    "v_prediction"); diffusers folders say it in scheduler_config.json.
    allow_pickle: read a pickle checkpoint (.ckpt/.bin/.pt) with torch.load(weights_only=True);
    refused by default because unpickling can run code.
    unet_config: the `UNetConfig` of a single-file checkpoint whose UNet is not SD-shaped
    (by default it is inferred from the weights).
    controlnet: a ControlNet for the model, or a list of them (their residuals are summed, in order): a
    diffusers ControlNetModel folder or an original single `.safetensors` file (or a loaded `ControlNet`).
    It replaces the ControlNet(s) a folder saved by diffusers' StableDiffusionControlNetPipeline brings
    (controlnet/, or controlnet/, controlnet_1/, ... for a MultiControlNetModel), which load otherwise.
    Each must fit the UNet (skip channels, text width, control image at the VAE's factor). Calls then
    take control_image= and the other control arguments (`pipelines.control`).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    bundled = bundled_name(path)
    if bundled is not None:
        folder = bundled_model_dir(bundled)
        if not (folder / INDEX_NAME).is_file():
            raise FileNotFoundError(
                f"the bundled {bundled} model is not in this install yet (expected "
                f"{folder}/model_index.json); pass a model path, e.g. a Stable Diffusion folder"
            )
        if bundled == "fast":
            pipe = _bundled_fast(folder)
        else:
            pipe = load_latentloom_folder(folder, name=f"bundled:{bundled}", dtype=dtype)
    else:
        source = Path(path)
        if source.is_dir():
            pipe = load_folder(source, dtype=dtype)
        elif source.is_file():
            from latentloom.pipelines.single_file import load_single_file

            pipe = load_single_file(source, tokenizer=tokenizer, prediction_type=prediction_type,
                                    allow_pickle=allow_pickle, unet_config=unet_config)
        elif isinstance(path, str) and _HUB_ID.match(path) and not path.startswith((".", "/")):
            pipe = load_folder(_download(path), dtype=dtype)
            pipe.name = path
        else:
            raise FileNotFoundError(
                f"no model at {str(path)!r}: give a folder (diffusers or latentloom layout), a .safetensors "
                "file, a hub id like 'org/model' (online only), or nothing for the bundled model"
            )
    if controlnet is not None:
        from latentloom.pipelines.control import attach

        attach(pipe, controlnet)
    from latentloom.pipelines.runtime import optimize

    return optimize(pipe.to(device=device, dtype=dtype), channels_last=channels_last, compile=compile)


def _bundled_fast(folder: Path) -> Pipeline:
    """bundled:fast: the default model with its distilled LCM-LoRA merged (in fp32, before any cast) and
    the few-step call defaults it was distilled for."""
    import dataclasses

    from latentloom.weights import FAST_DEFAULTS, FAST_LORA

    lora = folder / FAST_LORA
    if not lora.is_file():
        raise FileNotFoundError(f"bundled:fast needs {lora} (the bundled model's LCM-LoRA), which this install lacks")
    pipe = load_latentloom_folder(folder, name="bundled:fast")
    pipe.load_lora(lora)
    pipe.defaults = dataclasses.replace(pipe.defaults, **FAST_DEFAULTS)
    return pipe


def load_folder(folder: Path, *, dtype: torch.dtype | None = None) -> Pipeline:
    """A diffusers or latentloom model folder; `dtype`: the UNet's, read straight into it (one copy)."""
    if not (folder / INDEX_NAME).is_file():
        hint = " (this looks like a UNet folder; pass the pipeline folder above it)" if (folder / "config.json").is_file() else ""
        raise FileNotFoundError(f"{folder} has no model_index.json, so it is not a model folder{hint}")
    index = read_model_index(folder)
    if index.get("format") == FORMAT:
        return load_latentloom_folder(folder, name=str(folder), dtype=dtype)
    return load_diffusers_folder(folder, index, dtype=dtype)


def load_diffusers_folder(folder: Path, index: dict[str, Any], *, dtype: torch.dtype | None = None) -> Pipeline:
    """A diffusers Stable Diffusion folder (1.x / 2.x, or SDXL with text_encoder_2/): our UNet,
    diffusers' VAE, transformers' CLIP."""
    from latentloom.text_encoders import CLIPEncoder
    from latentloom.unet import UNet

    sdxl = (folder / "text_encoder_2").is_dir() or index.get("text_encoder_2") is not None
    # the SDXL refiner has no first text encoder
    text_parts = ("text_encoder_2", "tokenizer_2") if sdxl else ("text_encoder", "tokenizer")
    for part in ("unet", "vae", *text_parts, "scheduler"):
        if not (folder / part).is_dir():
            raise FileNotFoundError(f"{folder} is missing its {part}/ folder (a Stable Diffusion folder needs "
                                    f"unet/, vae/, {'/, '.join(text_parts)}/ and scheduler/)")
    encoder_class = (index.get("text_encoder") or [None, None])[1]
    if encoder_class not in ("CLIPTextModel", None):
        raise ValueError(f"{folder}: text encoder {encoder_class!r} is not supported here (CLIPTextModel is)")
    unet = UNet.from_diffusers(folder / "unet", dtype=dtype)
    vae = load_vae(folder / "vae")
    if sdxl:
        from latentloom.text_encoders.sdxl import SDXLTextEncoders

        text_encoder = SDXLTextEncoders.from_pretrained(folder)
    else:
        text_encoder = CLIPEncoder.from_pretrained(folder)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise FileNotFoundError(f"{folder} is missing scheduler/scheduler_config.json")
    schedule = _read_schedule(scheduler_file)
    unet_config = read_json_object(folder / "unet" / "config.json")
    # diffusers' UNet2DConditionModel may save sample_size null; SD's 64 latents then
    side = int(unet_config.get("sample_size") or 64) * 2 ** (len(vae.config.block_out_channels) - 1)
    pipe = Pipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, schedule_config=schedule, name=str(folder),
        use_context_mask=False,
        defaults=call_defaults(side, sdxl=sdxl, guidance_embedded=unet.config.guidance_embedded),
        weights_files=sorted((folder / "unet").glob("*.safetensors"))[:1], upscaler=_upscaler_settings(folder, index),
    )
    if index.get("controlnet"):  # a StableDiffusionControlNet*Pipeline folder: its ControlNet(s) come along
        from latentloom.pipelines.control import check_fits, folder_controlnets

        pipe.controlnets = folder_controlnets(folder, index, dtype=dtype)
        for attached in pipe.controlnets:
            check_fits(pipe, attached)
    return pipe


def load_latentloom_folder(folder: Path, *, name: str, dtype: torch.dtype | None = None) -> Pipeline:
    """A folder written by `latentloom train` (the bundled model is one)."""
    from latentloom.unet import UNet

    index = read_model_index(folder)
    for part in ("unet", "vae", "scheduler"):
        if not (folder / part).is_dir():
            raise FileNotFoundError(f"{folder} is missing its {part}/ folder")
    unet = UNet.from_pretrained(folder / "unet", dtype=dtype)
    vae = load_vae(folder / "vae")
    text_encoder = _text_encoder_from_index(folder, index.get("text_encoder") or {})
    schedule = _read_schedule(folder / "scheduler" / "scheduler_config.json")
    call = index.get("defaults") or {}
    resolution = int(index.get("resolution", 64))
    defaults = CallDefaults(
        height=int(call.get("height", resolution)), width=int(call.get("width", resolution)),
        num_inference_steps=int(call.get("num_inference_steps", 20)),
        guidance_scale=float(call.get("guidance_scale", 5.0)), sampler=str(call.get("sampler", "dpmpp_2m")),
        clip_guidance_scale=float(call.get("clip_guidance_scale", 0.0)),
    )
    clip_model = None
    if (folder / "clip").is_dir():
        from latentloom.text_encoders.image_text import ImageTextModel

        clip_model = ImageTextModel.from_pretrained(folder / "clip", text_encoder=text_encoder)
    pipe = Pipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, schedule_config=schedule, name=name,
        use_context_mask=bool(index.get("use_context_mask", True)), defaults=defaults,
        weights_files=sorted((folder / "unet").glob("*.safetensors")), clip_model=clip_model,
        upscaler=_upscaler_settings(folder, index),
    )
    return pipe


def _upscaler_settings(folder: Path, index: dict[str, Any]) -> UpscalerSettings | None:
    """An SD-x4-style upscaler folder (diffusers' or ours) has a low_res_scheduler/: what
    pipe.upscale needs to noise-augment the low-resolution image. None for other models."""
    if not (folder / "low_res_scheduler").is_dir():
        return None
    from latentloom.pipelines.upscale_residual import check_residual
    from latentloom.samplers.schedules import DiscreteSchedule

    low_res = read_json_object(folder / "low_res_scheduler" / "scheduler_config.json")
    with warnings.catch_warnings():  # only its betas are used (add_noise), so its step settings do not matter
        warnings.simplefilter("ignore", UserWarning)
        # diffusers reads it into a DDPMScheduler, so keys it leaves out take DDPM's defaults
        low_res_config = ScheduleConfig.from_diffusers_config(low_res).for_sampler("ddpm")
    return UpscalerSettings(
        low_res_schedule=DiscreteSchedule.from_config(low_res_config),
        max_noise_level=int(index.get("max_noise_level", 350)),
        residual=check_residual(index.get("residual"), folder / INDEX_NAME),
    )


def _text_encoder_from_index(folder: Path, spec: dict[str, Any]):
    from latentloom import text_encoders

    kind = spec.get("kind", "minilm")
    if kind == "minilm":
        return text_encoders.MiniLMEncoder()
    if kind == "clip":
        return text_encoders.CLIPEncoder.from_pretrained(folder, text_encoder_subfolder=spec.get("path", "text_encoder"))
    if kind == "sdxl":  # a fine-tuned SDXL: the CLIP pair, force_zeros_for_empty_prompt in model_index.json
        from latentloom.text_encoders.sdxl import SDXLTextEncoders

        return SDXLTextEncoders.from_pretrained(folder)
    raise ValueError(f"{folder}/model_index.json: text_encoder kind {kind!r} is not one of 'minilm', 'clip', 'sdxl'")


def _read_schedule(path: Path) -> ScheduleConfig:
    """scheduler_config.json -> ScheduleConfig, checked by building the schedule once."""
    from latentloom.samplers.schedules import DiscreteSchedule

    try:
        config = ScheduleConfig.from_diffusers_config(read_json_object(path))
        DiscreteSchedule.from_config(config)
    except (TypeError, ValueError, RuntimeError) as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: {err}") from err
    return config


def _download(repo_id: str) -> Path:
    """Fetch a hub model's safetensors and configs (the only place latentloom uses the network)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"],
                                      ignore_patterns=["*.fp16.safetensors", "*non_ema*", "*.ckpt"]))
    except Exception as err:  # offline mode, no network, unknown repo: all end here
        raise FileNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Hub ids need the network; offline, pass a local folder or file"
        ) from err
