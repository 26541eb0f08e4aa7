"""Training task for the small image-text model (contrastive; frozen text encoder).

CLIP guidance scores the sampler's x0 estimates, which are blurry early in sampling, so half
of the training images are degraded the same way (downsampled by 2 or 4 and back up, plus a
little noise): the model then still ranks prompts sensibly on such estimates.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from latentloom.training.config import TrainConfig
from latentloom.model_folder import write_component
from latentloom.text_encoders.image_text import ImageTextModel


def degrade_like_x0(pixels: torch.Tensor, *, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Blur (down by 2 or 4, bilinear up) and add noise (std up to 0.1) to a random share p of images."""
    b, _, h, w = pixels.shape
    device = pixels.device
    pick = torch.rand(b, device=device, generator=generator) < p  # (B,)
    factor = 2 ** int(torch.randint(1, 3, (), device=device, generator=generator))
    blurred = F.interpolate(F.avg_pool2d(pixels, factor), size=(h, w), mode="bilinear", align_corners=False)
    std = 0.1 * torch.rand(b, 1, 1, 1, device=device, generator=generator)
    blurred = blurred + std * torch.randn(pixels.shape, device=device, generator=generator)
    return torch.where(pick.view(b, 1, 1, 1), blurred, pixels)


class ClipTask:
    """Batches of {"pixel_values", "caption"} -> symmetric contrastive loss."""

    def __init__(self, cfg: TrainConfig, *, model: ImageTextModel, text_encoder: Any, dataset: Any) -> None:
        self.cfg, self.model, self.text_encoder, self.dataset = cfg, model, text_encoder, dataset

    @torch.no_grad()
    def sentence_vectors(self, captions: list[str], *, device: torch.device) -> torch.Tensor:
        emb = self.text_encoder.encode(list(captions))
        if emb.pooled is not None:
            return emb.pooled.to(device=device, dtype=torch.float32)  # (B, D)
        mask = emb.mask.to(emb.hidden.dtype)[..., None]
        return ((emb.hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).to(device=device, dtype=torch.float32)

    def loss(self, model: nn.Module, batch: dict[str, Any], *, generators: dict[str, torch.Generator]) -> torch.Tensor:
        device = generators["noise"].device
        pixels = batch["pixel_values"].to(device=device, dtype=torch.float32)
        pixels = degrade_like_x0(pixels, generator=generators["noise"])
        captions = list(batch["caption"])
        text = self.sentence_vectors(captions, device=device)
        same = torch.tensor([[a == b for b in captions] for a in captions], device=device)  # (B, B)
        return model(pixels, text, same)

    def export(self, model: nn.Module, output: Path) -> None:
        write_component(output, "clip", lambda tmp: model.save_pretrained(tmp))


def build_clip_task(cfg: TrainConfig, *, device: torch.device, is_main: bool, barrier: Callable[[], None]) -> "ClipTask":
    """The image-text model's task: a new model from cfg.model_config, or cfg.pretrained's clip/."""
    from latentloom.file_io import read_json_object
    from latentloom.text_encoders.image_text import ImageTextConfig
    from latentloom.training.tasks import load_dataset, load_text_encoder

    text_encoder = load_text_encoder(cfg.text_encoder, device=device, folder=cfg.pretrained)
    if cfg.pretrained is not None:
        model = ImageTextModel.from_pretrained(Path(cfg.pretrained) / "clip").train()
    else:
        values = read_json_object(cfg.model_config) if cfg.model_config else {}
        values.setdefault("text_dim", text_encoder.hidden_size)
        values.setdefault("resolution", cfg.resolution)
        model = ImageTextModel(ImageTextConfig.from_dict(values))
    return ClipTask(cfg, model=model, text_encoder=text_encoder, dataset=load_dataset(cfg))
