"""A small image-text model for CLIP guidance on the bundled domain.

Image side: a small conv net -> global average pool -> linear to the joint space.
Text side: the frozen text encoder's pooled sentence vector (or its masked mean token
when the encoder has no pooled output) -> linear to the joint space.
Trained with the symmetric contrastive loss of CLIP (Radford et al. 2021, fig. 3),
where identical captions in a batch count as positives of each other.

Folder layout (``save_pretrained`` / ``from_pretrained``): config.json + model.safetensors.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ImageTextConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])  # one stride-2 stage each
    embed_dim: int = 128
    text_dim: int = 384  # the text encoder's hidden size (MiniLM: 384)
    resolution: int = 64
    norm_groups: int = 8
    text_encoder: str = "minilm"

    def __post_init__(self) -> None:
        if not self.channels or any(c < 1 or c % self.norm_groups for c in self.channels):
            raise ValueError(f"channels must be positive multiples of norm_groups={self.norm_groups}, got {self.channels}")
        for name in ("embed_dim", "text_dim", "resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ImageTextConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ImageTextConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)


class ImageTextModel(nn.Module):
    def __init__(self, config: ImageTextConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [nn.Conv2d(3, config.channels[0], 3, padding=1)]
        prev = config.channels[0]
        for ch in config.channels:
            layers += [nn.GroupNorm(config.norm_groups, prev), nn.SiLU(), nn.Conv2d(prev, ch, 3, stride=2, padding=1)]
            prev = ch
        layers += [nn.GroupNorm(config.norm_groups, prev), nn.SiLU()]
        self.image_net = nn.Sequential(*layers)
        self.image_proj = nn.Linear(prev, config.embed_dim)
        self.text_proj = nn.Linear(config.text_dim, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, E) unit vectors. Differentiable (CLIP guidance)."""
        features = self.image_net(pixels).mean(dim=(2, 3))  # (B, C)
        return F.normalize(self.image_proj(features), dim=-1)

    def encode_text(self, emb: Any) -> torch.Tensor:
        """A TextEmbedding -> (B, E) unit vectors."""
        if emb.pooled is not None:
            sentence = emb.pooled
        else:  # masked mean over real tokens
            mask = emb.mask.to(emb.hidden.dtype)[..., None]  # (B, L, 1)
            sentence = (emb.hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        if sentence.shape[-1] != self.config.text_dim:
            raise ValueError(f"text vectors have size {sentence.shape[-1]}, this model expects text_dim={self.config.text_dim}")
        return F.normalize(self.text_proj(sentence.to(self.text_proj.weight.dtype)), dim=-1)

    def similarity(self, pixels: torch.Tensor, emb: Any) -> torch.Tensor:
        """(B,) cosine similarity of each image with its prompt."""
        return (self.encode_image(pixels) * self.encode_text(emb)).sum(-1)

    def forward(self, pixels: torch.Tensor, text: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        """Contrastive loss. text: (B, text_dim) sentence vectors; same: (B, B) bool, captions equal."""
        image_z = self.encode_image(pixels)  # (B, E)
        text_z = F.normalize(self.text_proj(text), dim=-1)  # (B, E)
        logits = self.logit_scale.clamp(max=math.log(100.0)).exp() * image_z @ text_z.T  # (B, B)
        target = same.float() / same.float().sum(1, keepdim=True)  # rows sum to 1
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T))

    # ------------------------------------------------------------------ files
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2, sort_keys=True))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, text_encoder: Any = None) -> "ImageTextModel":
        """text_encoder: the frozen encoder the text side will read, checked to fit it (not kept)."""
        from latentloom.weight_files import load_safetensors

        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise ValueError(f"{folder} is not an image-text model folder: expected config.json and model.safetensors")
        model = cls(ImageTextConfig.from_dict(json.loads((folder / "config.json").read_text())))
        weights = folder / "model.safetensors"
        try:
            model.load_state_dict(load_safetensors(weights))
        except RuntimeError as err:  # missing, unexpected or wrongly shaped tensors
            raise ValueError(f"{weights} does not fit {folder / 'config.json'}: {err}") from err
        if text_encoder is not None:
            size = getattr(text_encoder, "hidden_size", None)
            if size is not None and size != model.config.text_dim:
                raise ValueError(f"{folder} was trained on text vectors of size {model.config.text_dim}; "
                                 f"the given text encoder gives {size}")
        return model.eval()
