"""ControlNet training (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models";
diffusers' examples/controlnet/train_controlnet.py): a ControlNet learns to steer a frozen text-to-image
model with a control image per sample.

The data are captioned images whose metadata.jsonl also names each image's control map
(``conditioning_file_name``, as `latentloom make-shapes --control-maps` writes them). The ControlNet
starts as `ControlNet.from_unet(teacher UNet)` (the encoder copied, the zero convs at zero, so it
starts by adding nothing), and only it is trained: the loss is the frozen UNet's own denoising
objective (`objective.diffusion_loss`, the model's schedule and prediction type) with the
ControlNet's residuals added to the UNet's skips and middle block. Latents (and captions) can be
cached; the control maps are read per sample, under the same crop and flip as the image.
SDXL bases train too: the ControlNet and the UNet read the same vector conditioning (the pooled text and
each image's original size and crop, the training size as target, as SDXL fine-tuning does here).
The result is a diffusers ControlNetModel folder: `load_pipeline(MODEL, controlnet=OUT)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from latentloom.text_encoders.embedding import TextEmbedding
from latentloom.training.config import TrainConfig
from latentloom.training.objective import diffusion_loss
from latentloom.training.task_unet import drop_captions, vector_conditioning

# the control embedding's widths, diffusers' default (16, 32, 96, 256) cut to the VAE's factor:
# one width per halving plus one, so the embedding downsamples the map to the latents' size
CONTROL_WIDTHS = (16, 32, 96, 256)


def control_widths(factor: int) -> tuple[int, ...]:
    """The control embedding's widths for a VAE that downsamples by `factor` (1, 2, 4 or 8)."""
    if factor not in (1, 2, 4, 8):
        raise ValueError(f"a ControlNet's control embedding downsamples by 1, 2, 4 or 8; this VAE's factor is {factor}")
    return CONTROL_WIDTHS[: factor.bit_length()]


class ControlNetTask:
    """Batches of {"pixel_values" or "latents", "caption", "conditioning_pixel_values"} -> loss; the
    trained module (`model`) is the ControlNet alone, so checkpoints and the EMA hold only it."""

    def __init__(self, cfg: TrainConfig, *, pipe: Any, controlnet: nn.Module, dataset: Any,
                 alphas_cumprod: torch.Tensor, prediction_type: str) -> None:
        self.cfg, self.pipe, self.dataset = cfg, pipe, dataset
        self.model = controlnet
        self.unet = pipe.unet.requires_grad_(False).eval()
        self.vae = pipe.vae.requires_grad_(False).eval()
        self.alphas_cumprod, self.prediction_type = alphas_cumprod, prediction_type
        self.use_context_mask = pipe.use_context_mask

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        key = "latents" if "latents" in items[0] else "pixel_values"
        batch = {key: torch.stack([it[key] for it in items]), "caption": [it["caption"] for it in items],
                 "conditioning_pixel_values": torch.stack([it["conditioning_pixel_values"] for it in items])}
        if all("micro" in it for it in items):
            batch["micro"] = torch.stack([it["micro"] for it in items])  # (B, 4): SDXL's original size and crop
        return batch

    @torch.no_grad()
    def _context(self, captions: list[str], device: torch.device) -> TextEmbedding:
        # a LatentCache holds every caption's embedding (and ""'s for dropout)
        encode = self.dataset.text if hasattr(self.dataset, "text") else self.pipe.text_encoder.encode
        emb = encode(list(captions))
        pooled = None if emb.pooled is None else emb.pooled.to(device=device, dtype=torch.float32)
        return TextEmbedding(emb.hidden.to(device=device, dtype=torch.float32), emb.mask.to(device), pooled)

    def loss(self, model: nn.Module, batch: dict[str, Any], *, generators: dict[str, torch.Generator]) -> torch.Tensor:
        cfg = self.cfg
        gen = generators["noise"]
        device = gen.device
        captions = drop_captions(batch["caption"], p=cfg.caption_dropout, generator=generators["host"])
        emb = self._context(captions, device)
        hidden, mask = emb.hidden, emb.mask
        # SDXL: the UNet and the ControlNet read the same vector (pooled text and micro-conditioning)
        y = vector_conditioning(self.unet, emb, batch.get("micro"), size=(cfg.resolution, cfg.resolution))
        extra = {} if y is None else {"y": y}
        if "latents" in batch:
            x0 = batch["latents"].to(device=device, dtype=torch.float32)
        else:
            from latentloom.vae.codec import encode_images

            pixels = batch["pixel_values"].to(device=device, dtype=torch.float32)
            with torch.no_grad():
                x0 = encode_images(self.vae, pixels, generator=gen).float()
        control = batch["conditioning_pixel_values"].to(device=device, dtype=torch.float32)  # [0, 1]
        context_mask = mask if self.use_context_mask else None

        def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            residuals = model(x_t, t, hidden, control, context_mask=context_mask, **extra)
            return self.unet(x_t, t, hidden, context_mask=context_mask, control=residuals, **extra)

        return diffusion_loss(predict, x0, alphas_cumprod=self.alphas_cumprod, prediction_type=self.prediction_type,
                              generator=gen, min_snr_gamma=cfg.min_snr_gamma, noise_offset=cfg.noise_offset,
                              x0_weighting=cfg.x0_weighting)

    def export(self, model: nn.Module, output: Path) -> None:
        """OUT itself becomes a diffusers ControlNetModel folder (config.json + weights; checkpoints/ beside)."""
        model.save_pretrained(output)


def _refuse_unused(cfg: TrainConfig) -> None:
    defaults = TrainConfig(model="controlnet", data=cfg.data, pretrained=cfg.pretrained)
    unused = {name: getattr(cfg, name) for name in ("model_config", "vae", "lora_rank", "residual", "kl_weight",
                                                    "low_resolution", "max_noise_level", "prediction_type",
                                                    "beta_schedule", "beta_start", "beta_end", "num_train_timesteps",
                                                    "rescale_zero_terminal_snr")
              if getattr(cfg, name) != getattr(defaults, name)}
    unused.update({f.name: getattr(cfg, f.name) for f in TrainConfig.__dataclass_fields__.values()
                   if f.name.startswith("lcm_") and getattr(cfg, f.name) != getattr(defaults, f.name)})
    if unused:
        raise ValueError(f"{unused} do not apply to ControlNet training (model='controlnet'): the frozen model "
                         "brings its architecture, VAE and noise schedule, and the ControlNet trains whole")


def build_controlnet_task(cfg: TrainConfig, *, device: torch.device, is_main: bool, barrier: Callable[[], None]):
    """The ControlNetTask for `latentloom train --model controlnet --pretrained MODEL --data FOLDER`."""
    from latentloom.samplers.schedules import DiscreteSchedule
    from latentloom.training.data import CaptionedImageDataset
    from latentloom.training.tasks import load_frozen_model
    from latentloom.unet import ControlNet
    from latentloom.vae.codec import vae_scale_factor

    if cfg.pretrained is None:
        raise ValueError("ControlNet training steers a model: pass pretrained=<model folder, file, or bundled:NAME>")
    _refuse_unused(cfg)
    pipe = load_frozen_model(cfg.pretrained, device=device, purpose="ControlNet training")
    unet = pipe.unet  # frozen by the task
    factor = vae_scale_factor(pipe.vae)
    controlnet = ControlNet.from_unet(unet, conditioning_embedding_out_channels=control_widths(factor)).train()
    controlnet.set_attention_backend(getattr(unet, "attention_backend", "sdpa"))
    if cfg.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    if cfg.data is None:
        raise ValueError("model='controlnet' needs data=<folder of images, captions and control maps>")
    dataset = CaptionedImageDataset(cfg.data, resolution=cfg.resolution, crop=cfg.crop, random_flip=cfg.random_flip,
                                    seed=cfg.seed, conditioning=True)
    if cfg.cache_latents:
        from latentloom.training.task_unet_setup import build_latent_cache

        # a folder's vae/, or the single file / foreign folder the pipeline loaded it from
        dataset = build_latent_cache(cfg, dataset, vae=pipe.vae, vae_source=cfg.pretrained,
                                     text_encoder=pipe.text_encoder, device=device, is_main=is_main, barrier=barrier)
    schedule = pipe.schedule_config.for_sampler("ddpm")
    alphas_cumprod = DiscreteSchedule.from_config(schedule).alphas_cumprod.double()
    return ControlNetTask(cfg, pipe=pipe, controlnet=controlnet, dataset=dataset, alphas_cumprod=alphas_cumprod,
                          prediction_type=schedule.prediction_type)


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, ema: bool = True,
                      dtype: torch.dtype = torch.float32) -> Path:
    """A ControlNet folder from a checkpoint of a controlnet run (its EMA weights unless ema=False), to
    measure or ship a run's intermediate state; dtype=torch.float16 halves the file."""
    from latentloom.file_io import read_json_object
    from latentloom.weight_files import load_safetensors

    folder = Path(checkpoint)
    config = read_json_object(folder / "state.json").get("config") or {}
    if config.get("model") != "controlnet":
        raise ValueError(f"{folder} is a checkpoint of a model={config.get('model')!r} run, not of model='controlnet'")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    # the run's own set-up rebuilds the ControlNet's architecture from its model (no data is read)
    from latentloom.pipelines.loading import load_pipeline
    from latentloom.training.tasks import _resolve_bundled
    from latentloom.unet import ControlNet
    from latentloom.vae.codec import vae_scale_factor

    cfg = _resolve_bundled(TrainConfig.from_dict(config))
    pipe = load_pipeline(cfg.pretrained, device="cpu", dtype=torch.float32)
    widths = control_widths(vae_scale_factor(pipe.vae))
    net = ControlNet.from_unet(pipe.unet, conditioning_embedding_out_channels=widths)
    net.load_state_dict(load_safetensors(folder / "model.safetensors"))
    if ema:
        if not (folder / "ema.safetensors").is_file():
            raise ValueError(f"{folder} has no EMA weights (the run had no --ema); export with ema=False")
        from latentloom.training.ema import EMA

        shadow = EMA(net)
        shadow.load_state_dict(load_safetensors(folder / "ema.safetensors"))
        shadow.copy_to(net)
    net.to(dtype).save_pretrained(output)
    return Path(output)


def main(argv: list[str] | None = None) -> int:
    """python -m latentloom.training.task_controlnet CHECKPOINT OUT [--raw] [--fp16]"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m latentloom.training.task_controlnet",
                                     description="export a ControlNet folder from a controlnet run's checkpoint")
    parser.add_argument("checkpoint", help="OUT/checkpoints/controlnet/checkpoint-STEP")
    parser.add_argument("output", help="the ControlNet folder to write")
    parser.add_argument("--raw", action="store_true", help="the trained weights, not their EMA")
    parser.add_argument("--fp16", action="store_true", help="write float16 weights")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.output, ema=not args.raw,
                            dtype=torch.float16 if args.fp16 else torch.float32)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
