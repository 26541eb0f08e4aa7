"""Original single-file Stable Diffusion 1.x / 2.x checkpoints (`.safetensors`).

One file holds three models under prefixes: `model.diffusion_model.` (the UNet, converted by
latentloom.unet), `first_stage_model.` (the VAE, converted by latentloom.vae) and
`cond_stage_model.` (CLIP ViT-L for 1.x, OpenCLIP ViT-H for 2.x). The text-encoder key renaming
is diffusers' own converter: those are transformers' classes, so we use its mapping rather than a
copy. The file carries no tokenizer and no scheduler settings; see `load_single_file`.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from latentloom.pipelines.defaults import call_defaults
from latentloom.pipelines.pipeline import Pipeline
from latentloom.pipelines.single_file_text import SD2_TEXT_PREFIX, clip_l_text_model, open_clip_text_model
from latentloom.samplers.schedules import ScheduleConfig

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD_VAE_SCALING = 0.18215  # SD 1.x / 2.x; SDXL's file gets its own (single_file_sdxl.SDXL_VAE_SCALING)
# The scheduler settings diffusers' `from_single_file` gives each kind of checkpoint: the
# scheduler_config.json of the release it reads its configs from (SD 1.5 for 1.x, SD 2.1 for 2.x,
# the SD 1.5 / SD 2 inpainting releases for 9-channel UNets; tests/data/release_configs). They
# state these keys alike and leave timestep_spacing out, so each sampler takes its diffusers
# class's default for it, as in diffusers; 2.x releases state their prediction type too.
SD_SCHEDULER_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                           trained_betas=None)


def read_checkpoint(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file. Pickle checkpoints are refused unless `allow_pickle`, and
    then read with `weights_only=True` (no code in the file can run)."""
    from latentloom.weight_files import load_safetensors

    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return load_safetensors(path)
    if not allow_pickle:
        raise ValueError(
            f"{path} is a pickle checkpoint, which can run code when loaded; convert it to .safetensors, "
            "or pass allow_pickle=True to load it with torch.load(weights_only=True)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError (a refused object), EOFError, RuntimeError (not a torch file)
        raise ValueError(f"{path} could not be read with torch.load(weights_only=True): {err}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} holds {type(state).__name__}, not a state dict of tensors")
    odd = sorted(str(k) for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v)))
    if odd:
        raise ValueError(f"{path}: these entries are not named tensors: {odd[:8]}{' ...' if len(odd) > 8 else ''}")
    return state


def load_single_file(
    path: Path,
    *,
    tokenizer: str | Path | None = None,
    prediction_type: str | None = None,
    allow_pickle: bool = False,
    unet_config=None,
) -> Pipeline:
    """Build a `Pipeline` from one SD checkpoint file.

    tokenizer: a folder with CLIP's tokenizer files (vocab.json + merges.txt, or a diffusers
    folder's tokenizer/); without it, the Hugging Face cache is tried offline.
    prediction_type: SD 1.x is "epsilon"; SD 2.x files exist in both kinds (512-base: epsilon,
    768-v: v_prediction) and the file does not say which, so 2.x defaults to "v_prediction"
    with a warning unless given.
    unet_config: a `UNetConfig` for UNets that are not SD-shaped (group norm of 32, SD's head
    sizes); by default it is inferred from the weights' shapes.
    """
    state = read_checkpoint(path, allow_pickle=allow_pickle)
    try:
        return _build(path, state, tokenizer=tokenizer, prediction_type=prediction_type, unet_config=unet_config)
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as err:
        if str(path) in str(err) or path.name in str(err):
            raise
        # a key the layout needs is absent, or a tensor has a shape no config fits
        raise ValueError(f"{path} is not a usable Stable Diffusion checkpoint: {type(err).__name__}: {err}") from err


def _build(path: Path, state: dict[str, torch.Tensor], *, tokenizer, prediction_type, unet_config) -> Pipeline:
    from latentloom.unet import UNet

    unet_state = {k: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    if not unet_state:
        raise ValueError(f"{path} holds no Stable Diffusion UNet (no '{UNET_PREFIX}*' keys)")
    from latentloom.pipelines.single_file_sdxl import build_sdxl, is_sdxl_checkpoint

    unet = UNet.from_ldm_state_dict(unet_state, config=unet_config)
    sdxl = is_sdxl_checkpoint(state)
    sd2 = not sdxl and any(k.startswith(SD2_TEXT_PREFIX) for k in state)
    # the VAE's tile: the image side of the release config diffusers reads for such a file
    vae = _vae_from_state(state, path, sample_size=1024 if sdxl else 768 if sd2 else 512)
    if sdxl:
        return build_sdxl(path, state, unet, vae, tokenizer=tokenizer)
    text_model = open_clip_text_model(state, path) if sd2 else clip_l_text_model(state, path)
    encoder = _encoder(text_model, _tokenizer(tokenizer, path, sd2=sd2, vocab_size=text_model.config.vocab_size))
    if prediction_type is None:
        prediction_type = "epsilon"
        if sd2:
            prediction_type = "v_prediction"
            warnings.warn(f"{path.name}: an SD 2.x checkpoint does not say its prediction type; using "
                          "'v_prediction' (768-v). Pass prediction_type='epsilon' for the 512-base model.",
                          stacklevel=4)
    stated = {**SD_SCHEDULER_CONFIG, **({"prediction_type": prediction_type} if sd2 else {})}
    schedule = ScheduleConfig.from_diffusers_config(stated)
    if schedule.prediction_type != prediction_type:  # an SD 1.x file given prediction_type= by the caller
        schedule = schedule.with_settings({"prediction_type": prediction_type})
    side = (768 if sd2 and prediction_type == "v_prediction" else 512)
    return Pipeline(unet=unet, vae=vae, text_encoder=encoder, schedule_config=schedule, name=str(path),
                    use_context_mask=False,
                    defaults=call_defaults(side, guidance_embedded=unet.config.guidance_embedded),
                    weights_files=[path])


def _vae_from_state(state: dict[str, torch.Tensor], path: Path, *, sample_size: int):
    """The file's VAE; tiles of its native image side (`sample_size`), as in its release's config."""
    from latentloom.vae.loading import vae_from_ldm

    vae_state = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    if not vae_state:
        raise ValueError(f"{path} holds no VAE ('{VAE_PREFIX}*' keys)")
    return vae_from_ldm(vae_state, scaling_factor=SD_VAE_SCALING, sample_size=sample_size, source=str(path))


def _tokenizer(tokenizer: str | Path | None, path: Path, *, sd2: bool, vocab_size: int):
    """The tokenizer must cover the text encoder's vocabulary exactly; transformers can return
    an empty stand-in offline instead of failing, which this check catches."""
    from transformers import CLIPTokenizer

    if tokenizer is not None:
        folder = Path(tokenizer)
        if (folder / "tokenizer").is_dir():
            folder = folder / "tokenizer"
        if not any((folder / name).is_file() for name in ("vocab.json", "tokenizer.json")):
            raise FileNotFoundError(f"no CLIP tokenizer in {folder} (expected vocab.json + merges.txt, or tokenizer.json)")
        found = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        if len(found) != vocab_size:
            raise ValueError(f"the tokenizer in {folder} has {len(found)} tokens but the checkpoint's text encoder "
                             f"has {vocab_size}; give the tokenizer that belongs to {path.name}")
        return found
    repo = "stabilityai/stable-diffusion-2-1" if sd2 else "openai/clip-vit-large-patch14"
    kwargs = {"subfolder": "tokenizer"} if sd2 else {}
    try:
        found = CLIPTokenizer.from_pretrained(repo, local_files_only=True, **kwargs)
    except Exception:  # not cached: the message below says what to do
        found = None
    if found is None or len(found) != vocab_size:
        raise FileNotFoundError(
            f"{path.name} does not contain its tokenizer and {repo!r} is not in the local Hugging Face cache; "
            "pass tokenizer='folder with vocab.json + merges.txt' (e.g. a diffusers SD folder's tokenizer/)"
        )
    return found


def _encoder(text_model, tokenizer):
    from latentloom.text_encoders import CLIPEncoder

    return CLIPEncoder(text_model, tokenizer)
