"""Training task for the denoiser: the text-to-image UNet, and the upscaler stage.

The UNet learns the discrete DDPM objective on VAE latents (or on pixels when no VAE is
given) with the frozen text encoder's tokens as cross-attention context. The upscaler is
the same UNet with the low-resolution image concatenated onto its input channels and the
noise level of that image's augmentation as ``class_labels`` (SD x4 upscaler, Imagen's
noise conditioning augmentation, Ho et al. 2021 "Cascaded diffusion models" sec. 4.1).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentloom.vae.pixel_shuffle import is_pixel_shuffle
from latentloom.pipelines.upscale_residual import RESIDUAL_BASES, residual_base
from latentloom.training.config import TrainConfig
from latentloom.file_io import write_json_atomic
from latentloom.model_folder import copy_component, scheduler_config, update_model_index, write_component
from latentloom.training.objective import diffusion_loss
from latentloom.samplers.forward import add_noise_at_timestep
from latentloom.text_encoders.embedding import TextEmbedding

# The upscaler's low-resolution image is noised with its own fixed schedule (the SD x4
# upscaler's "low_res_scheduler": linear betas 1e-4 .. 0.02 over 1000 steps).
LOW_RES_NOISE = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000}


def drop_captions(captions: list[str], *, p: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by "" with probability p (for classifier-free guidance)."""
    if p <= 0:
        return list(captions)
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def low_res_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(LOW_RES_NOISE["beta_start"], LOW_RES_NOISE["beta_end"], LOW_RES_NOISE["num_train_timesteps"],
                           dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0)


def degrade(hi: torch.Tensor, *, low_resolution: int) -> torch.Tensor:
    """(B, 3, R, R) -> (B, 3, r, r): the low-resolution view the upscaler is given."""
    return F.interpolate(hi, size=(low_resolution, low_resolution), mode="area")


def upscaler_condition(
    low: torch.Tensor, *, noise_level: torch.Tensor, size: tuple[int, int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Noise the low-res image at ``noise_level`` (B,) of the low-res schedule (as `pipelines.upscale`
    does at sampling time) and resize it to the UNet's input size."""
    eps = torch.randn(low.shape, device=low.device, dtype=low.dtype, generator=generator)
    noisy = add_noise_at_timestep(low, eps, low_res_alphas_cumprod(), noise_level)
    return F.interpolate(noisy, size=size, mode="bilinear", align_corners=False)


def vector_conditioning(unet, emb: TextEmbedding, micro: torch.Tensor | None,
                        size: tuple[int, int]) -> torch.Tensor | None:
    """SDXL's y for `unet`: the pooled text and each image's real original size and crop, with the training
    size as target size, as SDXL was trained (None for UNets without vector conditioning)."""
    if getattr(unet.config, "adm_in_channels", None) is None:
        return None
    if emb.pooled is None or micro is None:
        raise ValueError("this UNet reads SDXL's vector conditioning: it needs the text encoder's pooled "
                         "vector and each image's size and crop")
    target = micro.new_tensor(size).expand(micro.shape[0], 2)
    numbers = torch.cat([micro, target], dim=1).to(device=emb.pooled.device, dtype=torch.float32)  # (B, 6)
    return unet.vector_conditioning(emb.pooled, numbers)


class UNetTask:
    """Batches of {"pixel_values": (B, 3, R, R) in [-1, 1], "caption": list[str]} -> loss."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        unet: nn.Module,
        text_encoder: Any,
        dataset: Any,
        alphas_cumprod: torch.Tensor,
        vae: nn.Module | None = None,
        vae_source: str | Path | None = None,
        copy_from: str | Path | None = None,
        upscaler: bool = False,
        latent_channels: int | None = None,
        use_context_mask: bool = True,
        writers: dict[str, Any] | None = None,
        index: dict[str, Any] | None = None,
    ) -> None:
        """latent_channels: what x0 has when neither a VAE nor pixels say (precomputed latents).
        use_context_mask: pass the text padding mask to cross-attention (latentloom models do;
        Stable Diffusion was trained without it). writers: extra export components,
        name -> write(tmp_folder) (a fine-tuned SD model's VAE and text encoder). index: extra
        model_index.json keys (an SDXL model's force_zeros_for_empty_prompt)."""
        self.use_context_mask, self.writers, self.index = use_context_mask, dict(writers or {}), dict(index or {})
        self.cfg, self.model, self.text_encoder, self.dataset = cfg, unet, text_encoder, dataset
        self.vae, self.vae_source, self.copy_from, self.upscaler = vae, vae_source, copy_from, upscaler
        self.alphas_cumprod = alphas_cumprod
        in_channels = unet.config.in_channels
        image_channels = vae.config.latent_channels if vae is not None else (latent_channels or 3)
        expected = image_channels + (3 if upscaler else 0)
        if in_channels != expected:
            raise ValueError(
                f"the UNet config has in_channels={in_channels}, but this task feeds {expected} "
                f"({image_channels} {'latent' if vae is not None else 'pixel'} channels"
                f"{' + 3 low-resolution image channels' if upscaler else ''})"
            )
        if upscaler and getattr(unet.config, "num_class_embeds", None) is None:
            raise ValueError("the upscaler UNet needs num_class_embeds (the noise-level embedding) in its config")
        if upscaler and unet.config.num_class_embeds < cfg.max_noise_level + 1:
            raise ValueError(
                f"num_class_embeds={unet.config.num_class_embeds} cannot embed noise levels up to "
                f"max_noise_level={cfg.max_noise_level}"
            )

    # ------------------------------------------------------------------ per batch
    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        """Images ({"pixel_values", "caption"}) or cached latents ({"latents", "caption", ...})."""
        key = "latents" if "latents" in items[0] else "pixel_values"
        batch = {key: torch.stack([it[key] for it in items]), "caption": [it["caption"] for it in items]}
        if all("micro" in it for it in items):
            batch["micro"] = torch.stack([it["micro"] for it in items])  # (B, 4): original size, crop top-left
        return batch

    @torch.no_grad()
    def targets(self, pixels: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """x0 the UNet learns to make: scaled VAE latents, or the pixels themselves."""
        if self.vae is None:
            return pixels
        from latentloom.vae.codec import encode_images

        return encode_images(self.vae, pixels, generator=generator).to(pixels.dtype)

    @torch.no_grad()
    def context(self, captions: list[str], *, device: torch.device):
        """The captions' TextEmbedding on `device` (hidden and pooled in float32)."""
        # A LatentCache holds the captions' embeddings (and encodes "" once for dropout).
        encode = self.dataset.text if hasattr(self.dataset, "text") else self.text_encoder.encode
        emb = encode(list(captions))
        pooled = None if emb.pooled is None else emb.pooled.to(device=device, dtype=torch.float32)
        return TextEmbedding(emb.hidden.to(device=device, dtype=torch.float32), emb.mask.to(device), pooled)

    def vector_conditioning(self, emb: TextEmbedding, micro: torch.Tensor | None,
                            size: tuple[int, int]) -> torch.Tensor | None:
        return vector_conditioning(self.model, emb, micro, size)

    def loss(self, model: nn.Module, batch: dict[str, Any], *, generators: dict[str, torch.Generator]) -> torch.Tensor:
        cfg = self.cfg
        device = generators["noise"].device
        captions = drop_captions(batch["caption"], p=cfg.caption_dropout, generator=generators["host"])
        emb = self.context(captions, device=device)
        hidden, mask = emb.hidden, emb.mask  # (B, L, D), (B, L)
        if "latents" in batch:
            pixels = None
            x0 = batch["latents"].to(device=device, dtype=torch.float32)  # (B, C, h, w)
        else:
            pixels = batch["pixel_values"].to(device=device, dtype=torch.float32)  # (B, 3, R, R)
            target = pixels
            if self.upscaler and cfg.residual:  # learn what bicubic enlargement of the low-res view gets wrong
                low = degrade(pixels, low_resolution=cfg.low_resolution)
                target = pixels - residual_base(low, tuple(pixels.shape[-2:]))
            x0 = self.targets(target, generator=generators["noise"])  # (B, C, h, w)
        extra: dict[str, Any] = {}
        cond = None
        if self.upscaler:
            low = degrade(pixels, low_resolution=cfg.low_resolution)
            noise_level = torch.randint(0, cfg.max_noise_level + 1, (x0.shape[0],), device=device,
                                        generator=generators["noise"])
            cond = upscaler_condition(low, noise_level=noise_level, size=tuple(x0.shape[-2:]),
                                      generator=generators["noise"])
            extra["class_labels"] = noise_level

        y = self.vector_conditioning(emb, batch.get("micro"), size=(cfg.resolution, cfg.resolution))
        if y is not None:
            extra["y"] = y

        def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = x_t if cond is None else torch.cat([x_t, cond], dim=1)
            return model(x_in, t, hidden, context_mask=mask if self.use_context_mask else None, **extra)

        return diffusion_loss(
            predict, x0, alphas_cumprod=self.alphas_cumprod, prediction_type=cfg.prediction_type,
            generator=generators["noise"], min_snr_gamma=cfg.min_snr_gamma, noise_offset=cfg.noise_offset,
            x0_weighting=cfg.x0_weighting,
        )

    # ------------------------------------------------------------------ export
    def schedule(self) -> dict[str, Any]:
        cfg = self.cfg
        return scheduler_config(
            num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule, beta_start=cfg.beta_start,
            beta_end=cfg.beta_end, prediction_type=cfg.prediction_type,
            rescale_zero_terminal_snr=cfg.rescale_zero_terminal_snr,
        )

    def export(self, model: nn.Module, output: Path) -> None:
        cfg = self.cfg
        if self.upscaler:
            self._export_upscaler(model, output)
            return
        if cfg.lora_rank:  # the adapters alone; load them onto the base model with a scale
            from latentloom.training.lora import save_lora

            output.mkdir(parents=True, exist_ok=True)
            save_lora(model, output / "lora.safetensors")
            return
        write_component(output, "unet", lambda tmp: model.save_pretrained(tmp))
        write_component(output, "scheduler", lambda tmp: write_json_atomic(tmp / "scheduler_config.json", self.schedule()))
        if self.vae_source is not None:
            copy_component(self.vae_source, output, "vae")
        for name, writer in self.writers.items():
            write_component(output, name, writer)
        if self.copy_from is not None:  # fine-tuning: keep the other stages of the source model
            for name in ("clip", "upscaler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
                if (Path(self.copy_from) / name).is_dir() and not (Path(output) / name).exists():
                    copy_component(Path(self.copy_from) / name, output, name)
        update_model_index(
            output,
            text_encoder={"kind": cfg.text_encoder},
            resolution=cfg.resolution,
            space="latent" if self.vae is not None else "pixel",
            use_context_mask=self.use_context_mask,
            **self.index,
        )

    def _export_upscaler(self, model: nn.Module, output: Path) -> None:
        """OUT/upscaler/: unet/, vae/, scheduler/, low_res_scheduler/ and model_index.json,
        the layout pipelines.upscale reads (as a diffusers SD x4 upscaler folder has)."""
        import shutil

        cfg = self.cfg

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp / "unet")
            write_json_atomic(tmp / "scheduler" / "scheduler_config.json", self.schedule())
            low_res = {"_class_name": "DDPMScheduler", **LOW_RES_NOISE, "prediction_type": "epsilon",
                       "clip_sample": False}
            write_json_atomic(tmp / "low_res_scheduler" / "scheduler_config.json", low_res)
            if self.vae_source is not None:
                shutil.copytree(self.vae_source, tmp / "vae")
            elif self.vae is not None:  # a PixelShuffleVAE: written from its config, it has no weights
                self.vae.save_pretrained(tmp / "vae")
            update_model_index(
                tmp, kind="upscaler", text_encoder={"kind": cfg.text_encoder}, resolution=cfg.resolution,
                low_resolution=cfg.low_resolution, max_noise_level=cfg.max_noise_level,
                space="latent" if self.vae is not None and not is_pixel_shuffle(self.vae) else "pixel",
                **({"residual": RESIDUAL_BASES[0]} if cfg.residual else {}),
            )

        write_component(output, "upscaler", write)
