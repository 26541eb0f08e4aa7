"""Tiny components built from configs (no hub, no network), shared by the tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data"

# diffusers scheduler class (and its extra config) behind each latentloom sampler name
DIFFUSERS_SCHEDULERS = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}

# Stable Diffusion 1.x's scheduler settings
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading",
)


def clip_tokenizer():
    """Character-level CLIP BPE (a few merges), lower case, 77-token window like SD's."""
    from transformers import CLIPTokenizer

    vocab = json.loads((DATA / "clip_vocab.json").read_text())
    lines = (DATA / "clip_merges.txt").read_text().splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#")]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def clip_text_model(seed: int = 0, hidden_size: int = 32, num_heads: int = 4):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vocab_size = len(json.loads((DATA / "clip_vocab.json").read_text()))
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=num_heads, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tiny_diffusers_unet(seed: int = 0, *, in_channels: int = 4, cross_attention_dim: int = 32, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kwargs = dict(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8,
    )
    kwargs.update(overrides)
    return UNet2DConditionModel(**kwargs).eval()


def tiny_vae(seed: int = 0):
    """A VAE with factor 2 (two levels) and 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16,
    ).eval()


def tiny_sd_pipeline(seed: int = 0, *, scheduler: str = "ddim", in_channels: int = 4, text_hidden: int = 32):
    """A diffusers StableDiffusionPipeline (or inpaint pipeline for 9 channels) from tiny parts.
    text_hidden=64 gives SD's 64-wide attention heads (one head), as single files assume."""
    import diffusers

    cls_name, extra = DIFFUSERS_SCHEDULERS[scheduler]
    sched = getattr(diffusers, cls_name)(**SD_SCHEDULER, **extra)
    pipe_cls = diffusers.StableDiffusionInpaintPipeline if in_channels == 9 else diffusers.StableDiffusionPipeline
    return pipe_cls(
        vae=tiny_vae(seed), text_encoder=clip_text_model(seed, text_hidden, text_hidden // 64 if text_hidden >= 64 else 4),
        tokenizer=clip_tokenizer(), unet=tiny_diffusers_unet(seed, in_channels=in_channels, cross_attention_dim=text_hidden),
        scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_lcm_pipeline(seed: int = 0, *, text_hidden: int = 32):
    """diffusers' LatentConsistencyModelPipeline from tiny parts: a UNet with a guidance embedding
    (time_cond_proj_dim) and LCMScheduler on SD's betas. text_hidden=64 gives the text encoder
    CLIP's 64-wide heads, which single files need (they do not state the head count)."""
    import diffusers

    scheduler = diffusers.LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", set_alpha_to_one=False)
    return diffusers.LatentConsistencyModelPipeline(
        vae=tiny_vae(seed), text_encoder=clip_text_model(seed, text_hidden, text_hidden // 64 if text_hidden >= 64 else 4),
        tokenizer=clip_tokenizer(),
        unet=tiny_diffusers_unet(seed, cross_attention_dim=text_hidden, time_cond_proj_dim=16), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_sd_folder(pipe, folder: Path) -> Path:
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def use_scheduler(pipe, sampler: str):
    """Switch a diffusers pipeline to the scheduler matching a latentloom sampler name."""
    import diffusers

    cls_name, extra = DIFFUSERS_SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    return pipe


def _vae_to_ldm(sd: dict) -> dict:
    """diffusers AutoencoderKL keys -> the original LDM `first_stage_model` keys (for test files)."""
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks."))
    out = {}
    for key, value in sd.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = new.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        if "mid_block.attentions.0" in new:
            new = new.replace("mid_block.attentions.0", "mid.attn_1").replace("group_norm", "norm")
            new = new.replace("to_q", "q").replace("to_k", "k").replace("to_v", "v").replace("to_out.0", "proj_out")
            if value.ndim == 2:
                value = value[:, :, None, None]  # LDM uses 1x1 convs for the VAE's attention
        parts = new.split(".")
        if parts[1] == "down_blocks":
            i = parts[2]
            rest = ".".join(parts[3:]).replace("resnets.", "block.").replace("downsamplers.0", "downsample")
            new = f"{parts[0]}.down.{i}.{rest}"
        elif parts[1] == "up_blocks":
            i = levels - 1 - int(parts[2])
            rest = ".".join(parts[3:]).replace("resnets.", "block.").replace("upsamplers.0", "upsample")
            new = f"{parts[0]}.up.{i}.{rest}"
        out[new] = value
    return out


def to_single_file(pipe, path: Path) -> Path:
    """Write a diffusers SD 1.x pipeline as an original single-file checkpoint (.safetensors)."""
    from safetensors.torch import save_file

    from latentloom.unet import UNetConfig
    from latentloom.unet.convert import diffusers_to_ldm

    cfg = UNetConfig.from_diffusers_config(dict(pipe.unet.config))
    state = {f"model.diffusion_model.{k}": v for k, v in diffusers_to_ldm(pipe.unet.state_dict(), cfg).items()}
    state.update({f"first_stage_model.{k}": v for k, v in _vae_to_ldm(pipe.vae.state_dict()).items()})
    # original files use transformers 4 names (text_model.*), whatever transformers builds today
    text = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    state.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def tiny_upscale_pipeline(seed: int = 0, *, scheduler: str = "ddim", prediction_type: str = "v_prediction"):
    """A diffusers StableDiffusionUpscalePipeline from tiny parts: a 7-channel UNet (4 latents + the
    3-channel low-res image) with a noise-level class embedding, the tiny VAE (factor 2, so x2),
    and the x4 upscaler's low-res DDPM schedule (linear betas 1e-4 .. 2e-2)."""
    import diffusers

    cls_name, extra = DIFFUSERS_SCHEDULERS[scheduler]
    sched = getattr(diffusers, cls_name)(**SD_SCHEDULER, prediction_type=prediction_type, **extra)
    low_res = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                      beta_schedule="linear")
    vae = tiny_vae(seed)
    vae.register_to_config(scaling_factor=0.08333)  # what the upscale pipeline insists on
    return diffusers.StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=clip_text_model(seed), tokenizer=clip_tokenizer(),
        unet=tiny_diffusers_unet(seed, in_channels=7, num_class_embeds=1000), low_res_scheduler=low_res,
        scheduler=sched, safety_checker=None, feature_extractor=None, watermarker=None, max_noise_level=350,
    )


def sd2_text_model(seed: int = 0, hidden_size: int = 64, layers: int = 2):
    """A tiny SD-2-style text encoder: OpenCLIP's gelu, SD's 64-wide heads."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vocab_size = len(json.loads((DATA / "clip_vocab.json").read_text()))
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 64), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, hidden_act="gelu",
    )
    return CLIPTextModel(config).eval()


def tiny_sd2_pipeline(seed: int = 0, *, in_channels: int = 4):
    """A diffusers SD pipeline with an SD-2-style text encoder (for single files in 2.x layout)."""
    import diffusers

    pipe_cls = diffusers.StableDiffusionInpaintPipeline if in_channels == 9 else diffusers.StableDiffusionPipeline
    return pipe_cls(
        vae=tiny_vae(seed), text_encoder=sd2_text_model(seed), tokenizer=clip_tokenizer(),
        unet=tiny_diffusers_unet(seed, in_channels=in_channels, cross_attention_dim=64),
        scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def _open_clip_state(text_model, skipped_block=None, *, prefix: str = "cond_stage_model.model.") -> dict:
    """transformers CLIP text weights -> OpenCLIP's layout (SD 2.x files: `cond_stage_model.model.*`),
    plus `skipped_block`'s weights as a last block (SD 2 reads the penultimate layer). A model with a text
    projection (SDXL's bigG) gives it transposed, as OpenCLIP stores it."""
    own = {k.removeprefix("text_model."): v for k, v in text_model.state_dict().items()}
    last = {} if skipped_block is None else {k.removeprefix("text_model."): v
                                             for k, v in skipped_block.state_dict().items()}
    layers = text_model.config.num_hidden_layers
    projection = own.pop("text_projection.weight", None)
    out = {"token_embedding.weight": own["embeddings.token_embedding.weight"],
           "positional_embedding": own["embeddings.position_embedding.weight"],
           "ln_final.weight": own["final_layer_norm.weight"], "ln_final.bias": own["final_layer_norm.bias"],
           "text_projection": (projection.T.contiguous() if projection is not None
                               else torch.randn(text_model.config.hidden_size, text_model.config.hidden_size))}
    for i in range(layers + (0 if skipped_block is None else 1)):
        src, j = (own, i) if i < layers else (last, 0)
        a, b = f"encoder.layers.{j}.", f"transformer.resblocks.{i}."
        for theirs, ours in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for p in ("weight", "bias"):
                out[f"{b}{ours}.{p}"] = src[f"{a}{theirs}.{p}"]
        for p in ("weight", "bias"):
            out[f"{b}attn.in_proj_{p}"] = torch.cat([src[f"{a}self_attn.{n}_proj.{p}"] for n in "qkv"])
    return {f"{prefix}{k}": v for k, v in out.items()}


def to_sd2_single_file(pipe, path: Path) -> Path:
    """Write a pipeline from `tiny_sd2_pipeline` as an original SD 2.x single-file checkpoint."""
    from safetensors.torch import load_file, save_file

    to_single_file(pipe, path)
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("cond_stage_model.")}
    skipped = sd2_text_model(seed=99, layers=1)
    state.update(_open_clip_state(pipe.text_encoder, skipped))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def sdxl_text_encoders(seed: int = 0, hidden_size: int = 32, projection_dim: int = 32):
    """Tiny SDXL pair: a CLIPTextModel and a CLIPTextModelWithProjection, with their tokenizers (the
    second pads with "!", as OpenCLIP bigG's does). hidden_size >= 64 gives SD's 64-wide heads, as
    single files assume."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    heads = hidden_size // 64 if hidden_size >= 64 else 4
    first = clip_text_model(seed, hidden_size, heads)
    torch.manual_seed(seed + 1)
    vocab_size = len(json.loads((DATA / "clip_vocab.json").read_text()))
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=heads, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        hidden_act="gelu", projection_dim=projection_dim,
    )
    second = CLIPTextModelWithProjection(config).eval()
    tokenizer_2 = clip_tokenizer()
    tokenizer_2.pad_token = "!"
    return first, clip_tokenizer(), second, tokenizer_2


def tiny_sdxl_pipeline(seed: int = 0, *, scheduler: str = "ddim", force_zeros: bool = True, text_hidden: int = 32):
    """A diffusers StableDiffusionXLPipeline from tiny parts: the SDXL text encoder pair (32 + 32 wide,
    pooled 32), a UNet with SDXL's vector conditioning (pooled + 6 numbers x 8) and the tiny VAE."""
    import diffusers

    first, tok, second, tok2 = sdxl_text_encoders(seed, text_hidden, text_hidden)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2, transformer_layers_per_block=(1, 2), cross_attention_dim=2 * text_hidden,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=text_hidden + 6 * 8,
    ).eval()
    vae = tiny_vae(seed)
    vae.register_to_config(scaling_factor=0.13025)  # SDXL's VAE scaling, which single files assume
    cls_name, extra = DIFFUSERS_SCHEDULERS[scheduler]
    sched = getattr(diffusers, cls_name)(**SD_SCHEDULER, **extra)
    return diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=first, tokenizer=tok, text_encoder_2=second, tokenizer_2=tok2, unet=unet,
        scheduler=sched, force_zeros_for_empty_prompt=force_zeros, add_watermarker=False,
    )


def tiny_sdxl_refiner(seed: int = 0, *, scheduler: str = "ddim", text_hidden: int = 32):
    """A diffusers SDXL refiner (StableDiffusionXLImg2ImgPipeline, requires_aesthetics_score=True) from tiny
    parts: the second text encoder only (32 wide), a UNet reading pooled + 5 numbers (sizes, crop, score)."""
    import diffusers

    _, _, second, tok2 = sdxl_text_encoders(seed, text_hidden, text_hidden)
    torch.manual_seed(seed + 2)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2, cross_attention_dim=text_hidden, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=text_hidden + 5 * 8,
    ).eval()
    cls_name, extra = DIFFUSERS_SCHEDULERS[scheduler]
    vae = tiny_vae(seed)
    vae.register_to_config(scaling_factor=0.13025)  # SDXL's VAE scaling, which single files assume
    return diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=second, tokenizer_2=tok2, unet=unet,
        scheduler=getattr(diffusers, cls_name)(**SD_SCHEDULER, **extra), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )


def tiny_sdxl_inpaint_pipeline(seed: int = 0, *, in_channels: int = 9, text_hidden: int = 32):
    """diffusers' StableDiffusionXLInpaintPipeline on the tiny SDXL parts, its UNet with `in_channels`
    (9: latents + mask + masked-image latents; 4: any SDXL UNet)."""
    import diffusers

    base = tiny_sdxl_pipeline(seed, text_hidden=text_hidden)
    torch.manual_seed(seed + 3)
    unet = diffusers.UNet2DConditionModel(**{**dict(base.unet.config), "in_channels": in_channels}).eval()
    return diffusers.StableDiffusionXLInpaintPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=base.scheduler, requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def to_sdxl_single_file(pipe, path: Path) -> Path:
    """Write a diffusers SDXL pipeline (base, refiner or inpainting) as an original single-file
    checkpoint (sgm's conditioner keys)."""
    from safetensors.torch import save_file

    from latentloom.unet import UNetConfig
    from latentloom.unet.convert import diffusers_to_ldm

    cfg = UNetConfig.from_diffusers_config(dict(pipe.unet.config))
    state = {f"model.diffusion_model.{k}": v for k, v in diffusers_to_ldm(pipe.unet.state_dict(), cfg).items()}
    state.update({f"first_stage_model.{k}": v for k, v in _vae_to_ldm(pipe.vae.state_dict()).items()})
    bigg = "conditioner.embedders.1.model."
    if pipe.text_encoder is None:  # the refiner: bigG alone, as the first embedder
        bigg = "conditioner.embedders.0.model."
    else:
        text = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
        state.update({f"conditioner.embedders.0.transformer.text_model.{k}": v for k, v in text.items()})
    state.update(_open_clip_state(pipe.text_encoder_2, prefix=bigg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
