"""A loaded model (UNet, VAE, text encoder, noise schedule) and the calls it answers."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentloom.pipelines.defaults import CallDefaults, resolve_dtype
from latentloom.vae.codec import vae_scale_factor
from latentloom.samplers.schedules import DiscreteSchedule, ScheduleConfig


@dataclass
class UpscalerSettings:
    """What an SD-x4-style upscaler brings beside its UNet: the noise schedule its low-resolution
    input is augmented with (its low_res_scheduler), the largest noise level it was trained on, and
    the enlargement its UNet's output is added to (None, or "bicubic": see `upscale_residual`)."""

    low_res_schedule: DiscreteSchedule
    max_noise_level: int
    residual: str | None = None


class Pipeline:
    """Holds the components; `pipe(prompt, ...)` makes images (see `txt2img.text_to_image`).

    unet: latentloom UNet. vae: latentloom's AutoencoderKL (or diffusers', or a PixelShuffleVAE).
    text_encoder: a latentloom text encoder (`encode(list[str]) -> TextEmbedding`).
    schedule_config: the noise schedule the UNet was trained with. use_context_mask: pass the
    padding mask to cross-attention (the bundled model was trained with it; Stable Diffusion was
    not, so diffusers passes none).
    upscaler: set for super-resolution models (`UpscalerSettings`), None otherwise.
    """

    def __init__(
        self,
        *,
        unet,
        vae,
        text_encoder,
        schedule_config: ScheduleConfig,
        name: str,
        use_context_mask: bool = False,
        defaults: CallDefaults | None = None,
        weights_files: list[Path] | None = None,
        clip_model: Any = None,
        upscaler: UpscalerSettings | None = None,
    ) -> None:
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.schedule_config = schedule_config
        self.schedule = DiscreteSchedule.from_config(schedule_config)
        self._schedules: dict[tuple, DiscreteSchedule] = {}  # by betas, see discrete_schedule
        self.name = name
        self.use_context_mask = use_context_mask
        self.defaults = defaults or CallDefaults()
        self.weights_files = list(weights_files or [])
        self.clip_model = clip_model
        self.upscaler = upscaler
        self.clip_tokenizer = None  # set with a transformers CLIPModel as clip_model
        self._model_hash: str | None = None
        self.compiled = False  # set by compile(): the UNet's weights may be frozen into its graph
        self.loras: list[tuple[Path, float]] = []  # merged LoRA files and scales, part of model_hash
        # free the text encoders' weights after each call's prompts are encoded (read back for a new
        # prompt): True, False, or None = when the model's weights take over half of this machine's RAM
        self.release_text_encoders: bool | None = None
        self.controlnets: list = []  # `control.AttachedControlNet`s, summed in order (load_pipeline(controlnet=))

    def releases_text_encoders(self) -> bool:
        """Whether a call frees the text encoders' weights once its prompts are encoded (see
        `release_text_encoders`): with SDXL in fp32 (14 GB) on a 24 GiB machine, the UNet step and the
        VAE decode then run without the encoders' 3.3 GB beside them."""
        if self.release_text_encoders is not None:
            return bool(self.release_text_encoders)
        from latentloom.pipelines.runtime import physical_memory_bytes

        modules = [self.unet, self.vae] + [getattr(e, "model", None) for e in getattr(
            self.text_encoder, "encoders", [self.text_encoder])]
        # released weights (on the meta device) still count: the rule must not depend on them being out
        total = sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())
        memory = physical_memory_bytes()
        return bool(memory) and total > memory / 2

    def discrete_schedule(self, config: ScheduleConfig) -> DiscreteSchedule:
        """The sigma table of a resolved schedule (`ScheduleConfig.for_sampler`): a key the model's
        config leaves out can give samplers different betas, so each set of betas gets its own."""
        betas = tuple(config.trained_betas) if config.trained_betas is not None else None
        key = (config.beta_schedule, config.beta_start, config.beta_end, config.num_train_timesteps,
               config.rescale_betas_zero_snr, betas)
        if key not in self._schedules:
            self._schedules[key] = DiscreteSchedule.from_config(config)
        return self._schedules[key]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None) -> "Pipeline":
        """Move the UNet and VAE (and the text encoder's device; it keeps fp32) and cast them: the
        UNet to `dtype`, the VAE too unless that would overflow it (fp16 with `force_upcast`)."""
        from latentloom.pipelines.runtime import vae_dtype

        device = torch.device(device) if device is not None else self.device
        dtype = resolve_dtype(dtype, device) if dtype is not None else self.dtype
        modules = [(self.unet, dtype), (self.vae, vae_dtype(self.vae, dtype))]
        modules += [(c.model, dtype) for c in self.controlnets]  # in the UNet's dtype, as diffusers' pipelines
        for module, wanted in modules:
            params = next(module.parameters(), None)
            if params is None:  # a PixelShuffleVAE has a buffer only
                params = next(module.buffers())
            if params.device != device or params.dtype != wanted:  # skip no-op casts
                # nn.Module.to, not diffusers' override: that one warns on every cast about
                # "modules kept in float32" even when the VAE lists none
                torch.nn.Module.to(module, device=device, dtype=wanted)
        self.text_encoder.to(device=device)
        if self.clip_model is not None:
            self.clip_model.to(device=device)
        return self

    def compile(self, *, mode: str | None = None) -> "Pipeline":
        """`torch.compile` the UNet (weights frozen into the graph on CPU; merge LoRAs first).
        The first call at a new size compiles (minutes on a small CPU)."""
        from latentloom.pipelines.runtime import compile_unet

        return compile_unet(self, mode=mode)

    def model_hash(self) -> str:
        """First 10 hex digits of the SHA-256 of the weight files (computed once, for metadata)."""
        if self._model_hash is None:
            digest = hashlib.sha256()
            for path in sorted(self.weights_files):
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 22), b""):
                        digest.update(block)
            for path, scale in self.loras:  # merged LoRAs change the weights, so they change the hash
                digest.update(Path(path).read_bytes() + repr(scale).encode())
            self._model_hash = digest.hexdigest()[:10] if self.weights_files else "unknown"
        return self._model_hash

    def load_lora(self, path: str | Path, *, scale: float = 1.0, strict: bool = True):
        """Merge a LoRA file (latentloom, diffusers/peft or Kohya format) into the UNet (and text
        encoder for its `lora_te_` keys) with `scale`; returns a report of the keys applied.
        `scale=-s` takes a LoRA merged with `s` back out (exactly in fp32; in bf16/fp16 the weights keep
        a rounding residue: reload the model for an exact original)."""

        if self.compiled:
            raise RuntimeError("this pipeline's UNet is compiled (its weights may be frozen into the graph), so a "
                               "LoRA merged now could be ignored: load LoRAs before compile()")

        report = load_lora_into_pipeline(self, path, scale=scale, strict=strict)
        self.loras.append((Path(path), float(scale)))
        self._model_hash = None
        return report

    def __call__(self, prompt: str | list[str], **kwargs: Any):
        """Text to image; see `latentloom.pipelines.txt2img.text_to_image` for the arguments."""
        from latentloom.pipelines.txt2img import text_to_image

        return text_to_image(self, prompt, **kwargs)

    def img2img(self, prompt: str | list[str], **kwargs: Any):
        """Image to image; see `latentloom.pipelines.img2img.image_to_image` for the arguments."""
        from latentloom.pipelines.img2img import image_to_image

        return image_to_image(self, prompt, **kwargs)

    def inpaint(self, prompt: str | list[str], **kwargs: Any):
        """Inpainting (9-channel or any 4-channel UNet); see `latentloom.pipelines.inpaint.inpaint`."""
        from latentloom.pipelines.inpaint import inpaint

        return inpaint(self, prompt, **kwargs)

    def upscale(self, prompt: str | list[str], **kwargs: Any):
        """Super-resolution with an x4-upscaler-style model; see `latentloom.pipelines.upscale.upscale`."""
        from latentloom.pipelines.upscale import upscale

        return upscale(self, prompt, **kwargs)

    def __repr__(self) -> str:
        return f"Pipeline(name={self.name!r}, device={self.device}, dtype={self.dtype})"


def load_lora_into_pipeline(pipe: Pipeline, source: str | Path | dict[str, torch.Tensor], *, scale: float = 1.0,
                            strict: bool = True):
    """Merge a LoRA into a pipeline's UNet (and text encoder, for ``lora_te_`` keys) with ``scale``;
    ``scale=-s`` takes a LoRA merged with ``s`` back out. Returns `latentloom.unet.lora.LoraReport`."""
    from latentloom.unet.lora import load_lora

    report = load_lora(pipe.unet, source, scale=scale, text_encoder=pipe.text_encoder, strict=strict)
    pipe._model_hash = None  # the weights changed: image metadata must not name the old hash
    return report
