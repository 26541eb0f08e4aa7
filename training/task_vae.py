"""Training task for the VAE (diffusers' AutoencoderKL): reconstruction + KL.

loss = mean(|x - x_hat| + (x - x_hat)^2) + kl_weight * KL(q(z|x) || N(0, I)) / (3 H W)
Both terms are per pixel, so kl_weight means what it means in the LDM autoencoder
(Rombach et al. 2022, appendix G: KL-reg. weight ~1e-6), without the GAN and LPIPS terms.
After training, the latent scaling factor is set to 1 / std of the data's latents
(the LDM recipe, sec. 3.1 footnote) and stored in the VAE config.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from latentloom.training.config import TrainConfig
from latentloom.model_folder import write_component

# A small VAE for 64x64 images: 4x downsampling to 16x16x4 latents, 1.4 M parameters.
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 64,
    "scaling_factor": 1.0,
    "mid_block_add_attention": False,
}


def build_vae(config: dict[str, Any] | str | Path | None, *, resolution: int):
    """An AutoencoderKL from a config dict or JSON file (None: TINY_VAE_CONFIG)."""
    from diffusers import AutoencoderKL

    if config is None:
        values = dict(TINY_VAE_CONFIG)
    elif isinstance(config, dict):
        values = dict(config)
    else:
        values = json.loads(Path(config).read_text())
    values = {k: v for k, v in values.items() if not k.startswith("_")}  # diffusers' bookkeeping keys
    values["sample_size"] = resolution
    return AutoencoderKL(**values)


class VAEWithLoss(nn.Module):
    """The AutoencoderKL and its loss in one forward, so DDP sees a single module call."""

    def __init__(self, vae: nn.Module, *, kl_weight: float) -> None:
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        posterior = self.vae.encode(pixels).latent_dist
        z = posterior.sample(generator=generator)  # (B, C, h, w)
        recon = self.vae.decode(z).sample  # (B, 3, H, W)
        diff = (recon.float() - pixels.float())
        rec = (diff.abs() + diff.pow(2)).mean()
        kl = posterior.kl().float().mean() / pixels[0].numel()
        return rec + self.kl_weight * kl


@torch.no_grad()
def latent_std(vae: nn.Module, dataset: Any, *, max_images: int = 512, batch_size: int = 32, seed: int = 0) -> float:
    """Standard deviation of sampled latents over the first images of the dataset."""
    device = next(vae.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    count = min(len(dataset), max_images)
    total, total_sq, n = 0.0, 0.0, 0
    for start in range(0, count, batch_size):
        pixels = torch.stack([dataset[i]["pixel_values"] for i in range(start, min(count, start + batch_size))])
        z = vae.encode(pixels.to(device=device, dtype=torch.float32)).latent_dist.sample(generator=generator).double()
        total, total_sq, n = total + z.sum().item(), total_sq + z.pow(2).sum().item(), n + z.numel()
    mean = total / n
    return max(total_sq / n - mean * mean, 0.0) ** 0.5


class VAETask:
    """Batches of {"pixel_values": (B, 3, R, R) in [-1, 1], ...} -> reconstruction + KL loss."""

    def __init__(self, cfg: TrainConfig, *, vae: nn.Module, dataset: Any) -> None:
        self.cfg, self.dataset = cfg, dataset
        self.model = VAEWithLoss(vae, kl_weight=cfg.kl_weight)

    def loss(self, model: nn.Module, batch: dict[str, Any], *, generators: dict[str, torch.Generator]) -> torch.Tensor:
        device = generators["noise"].device
        pixels = batch["pixel_values"].to(device=device, dtype=torch.float32)
        return model(pixels, generators["noise"])

    def export(self, model: nn.Module, output: Path) -> None:
        vae = model.vae.float()
        std = latent_std(vae, self.dataset, seed=self.cfg.seed)
        if not std > 0:
            raise FloatingPointError(f"the trained VAE's latents have std {std}; cannot set a scaling factor")
        vae.register_to_config(scaling_factor=1.0 / std)
        write_component(output, "vae", lambda tmp: vae.save_pretrained(tmp, safe_serialization=True))


def build_vae_task(cfg: TrainConfig, *, device: torch.device, is_main: bool, barrier: Callable[[], None]) -> "VAETask":
    """The VAE task: a new VAE from cfg.model_config (TINY_VAE_CONFIG by default) or cfg.pretrained's."""
    from latentloom.model_folder import find_vae_folder
    from latentloom.training.tasks import load_dataset
    from latentloom.vae.loading import load_vae

    if cfg.pretrained is not None:
        # training keeps diffusers' class (its gradient checkpointing); latentloom's loader checks the folder
        vae = load_vae(find_vae_folder(cfg.pretrained)).to_diffusers()
    else:
        vae = build_vae(cfg.model_config, resolution=cfg.resolution)
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    return VAETask(cfg, vae=vae, dataset=load_dataset(cfg))
