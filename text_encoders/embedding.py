"""The one contract between text encoders and everything downstream."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # keep `import latentloom.text_encoders` free of torch until used
    import torch


@dataclass
class TextEmbedding:
    """Token embeddings of a batch of prompts.

    hidden: (B, L, D) token embeddings the UNet cross-attends to.
    mask:   (B, L) 1 for a real token, 0 for padding (torch.long, like a tokenizer's attention_mask).
    pooled: (B, D') one vector per prompt, or None where the encoder has none.
    filler: (Lf, D) what "padding" means for the encoder that made this embedding, used by
            `pad_to`: CLIP sets it to the encoding of one empty-prompt window (what A1111 and
            ComfyUI append to make cond and uncond the same length); None pads with zeros
            (T5, MiniLM, whose padded positions are zero anyway).
    """

    hidden: "torch.Tensor"
    mask: "torch.Tensor"
    pooled: "torch.Tensor | None" = None
    filler: "torch.Tensor | None" = None

    def __post_init__(self) -> None:
        if self.hidden.ndim != 3:
            raise ValueError(f"hidden must be (B, L, D), got shape {tuple(self.hidden.shape)}")
        if tuple(self.mask.shape) != tuple(self.hidden.shape[:2]):
            raise ValueError(
                f"mask must be (B, L) = {tuple(self.hidden.shape[:2])}, got {tuple(self.mask.shape)}"
            )
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[0] != self.hidden.shape[0]):
            raise ValueError(
                f"pooled must be (B, D') with B = {self.hidden.shape[0]}, got {tuple(self.pooled.shape)}"
            )
        if self.filler is not None and (self.filler.ndim != 2 or self.filler.shape[1] != self.hidden.shape[2]):
            raise ValueError(
                f"filler must be (Lf, D) with D = {self.hidden.shape[2]}, got {tuple(self.filler.shape)}"
            )

    def to(self, device=None, dtype=None) -> "TextEmbedding":
        """Move to a device and/or cast the float tensors; the mask keeps its dtype."""
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        filler = None if self.filler is None else self.filler.to(device=device, dtype=dtype)
        return TextEmbedding(
            self.hidden.to(device=device, dtype=dtype), self.mask.to(device=device), pooled, filler
        )

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @property
    def length(self) -> int:
        """L, the number of token positions."""
        return self.hidden.shape[1]

    def pad_to(self, length: int) -> "TextEmbedding":
        """Append padding positions until L == length: hidden gets `filler` tiled (zeros when None),
        mask gets 0. A shorter `length` is an error: nothing is ever cut here."""
        import torch

        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"length must be an int, got {type(length).__name__}")
        if length < self.length:
            raise ValueError(
                f"cannot pad to length {length}: the embedding already has {self.length} positions "
                "(pad_to never truncates; pad the other embedding instead)"
            )
        missing = length - self.length
        if missing == 0:
            return self
        batch, _, dim = self.hidden.shape
        if self.filler is None:
            pad = self.hidden.new_zeros(batch, missing, dim)
        else:
            reps = -(-missing // self.filler.shape[0])  # ceil division
            tiled = self.filler.to(self.hidden).repeat(reps, 1)[:missing]  # (missing, D)
            pad = tiled.unsqueeze(0).expand(batch, missing, dim)
        hidden = torch.cat([self.hidden, pad], dim=1)  # (B, length, D)
        mask = torch.cat([self.mask, self.mask.new_zeros(batch, missing)], dim=1)  # (B, length)
        return TextEmbedding(hidden, mask, self.pooled, self.filler)

    def repeat_interleave(self, repeats: int) -> "TextEmbedding":
        """Each prompt `repeats` times in a row (num_images_per_prompt)."""
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(repeats, dim=0)
        return TextEmbedding(
            self.hidden.repeat_interleave(repeats, dim=0),
            self.mask.repeat_interleave(repeats, dim=0),
            pooled,
            self.filler,
        )

    @staticmethod
    def cat(embeddings: Sequence["TextEmbedding"]) -> "TextEmbedding":
        """Stack along the batch after padding all to the longest L (e.g. [uncond, cond] for CFG)."""
        import torch

        embeddings = list(embeddings)
        if not embeddings or not all(isinstance(e, TextEmbedding) for e in embeddings):
            raise TypeError("cat needs a non-empty sequence of TextEmbedding")
        has_pooled = {e.pooled is not None for e in embeddings}
        if len(has_pooled) != 1:
            raise ValueError("cannot cat embeddings where some have pooled and some do not")
        padded = pad_to_same_length(*embeddings)
        pooled = torch.cat([e.pooled for e in padded]) if has_pooled == {True} else None
        return TextEmbedding(
            torch.cat([e.hidden for e in padded]),
            torch.cat([e.mask for e in padded]),
            pooled,
            embeddings[0].filler,
        )


def pad_to_length(emb: TextEmbedding, length: int) -> TextEmbedding:
    """`emb.pad_to(length)`: pad with the encoder's padding encoding (see TextEmbedding.filler)."""
    return emb.pad_to(length)


def pad_to_same_length(*embeddings: TextEmbedding) -> list[TextEmbedding]:
    """Pad every embedding to the longest L among them (cond and uncond for CFG)."""
    length = max(e.length for e in embeddings)
    return [e.pad_to(length) for e in embeddings]
