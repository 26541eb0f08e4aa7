"""The one contract between text encoders and everything downstream."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep `import latentloom.text_encoders` free of torch until used
    import torch


@dataclass
class TextEmbedding:
    """Token embeddings of a batch of prompts.

    hidden: (B, L, D) token embeddings the UNet cross-attends to.
    mask:   (B, L) 1 for a real token, 0 for padding.
    pooled: (B, D') one vector per prompt, or None where the encoder has none.
    """

    hidden: "torch.Tensor"
    mask: "torch.Tensor"
    pooled: "torch.Tensor | None" = None

    def __post_init__(self) -> None:
        if self.hidden.ndim != 3:
            raise ValueError(f"hidden must be (B, L, D), got shape {tuple(self.hidden.shape)}")
        if tuple(self.mask.shape) != tuple(self.hidden.shape[:2]):
            raise ValueError(
                f"mask must be (B, L) = {tuple(self.hidden.shape[:2])}, got {tuple(self.mask.shape)}"
            )

    def to(self, device=None, dtype=None) -> "TextEmbedding":
        """Move to a device and/or cast the float tensors; the mask keeps its dtype."""
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return TextEmbedding(self.hidden.to(device=device, dtype=dtype), self.mask.to(device=device), pooled)

    def __len__(self) -> int:
        return self.hidden.shape[0]
