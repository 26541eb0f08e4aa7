"""Training task for the small image-text model (contrastive; frozen text encoder)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentloom.training.config import TrainConfig
from latentloom.training.export import write_component
from latentloom.training.image_text import ImageTextModel


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
        captions = list(batch["caption"])
        text = self.sentence_vectors(captions, device=device)
        same = torch.tensor([[a == b for b in captions] for a in captions], device=device)  # (B, B)
        return model(pixels, text, same)

    def export(self, model: nn.Module, output: Path) -> None:
        write_component(output, "clip", lambda tmp: model.save_pretrained(tmp))
