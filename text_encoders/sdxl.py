"""SDXL's text side: CLIP ViT-L (`CLIPTextModel`) and OpenCLIP bigG (`CLIPTextModelWithProjection`),
each read at its penultimate layer without the final layer norm (diffusers' `clip_skip` None), their
features concatenated (768 + 1280 = 2048 wide); the pooled vector is the second encoder's projected
output. The refiner has the second encoder only.

As in diffusers' `StableDiffusionXLPipeline.encode_prompt`:
- `prompts_2` go to the second encoder (default: the same prompts), likewise `negative_prompts_2`;
- the second tokenizer pads with its own pad token (CLIPEncoder uses each tokenizer's pad id);
- with `force_zeros_for_empty_prompt` (a model folder's model_index.json says it) and no negative
  prompt given at all, the negative branch is zeros, pooled vector included.
Each encoder is a CLIPEncoder, so long prompts are encoded in 77-token windows and `(word:1.3)`
weighting works on both; the pooled vector is that of the first window (as A1111 and ComfyUI do).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from latentloom.text_encoders.base import check_prompts
from latentloom.text_encoders.clip import CLIPEncoder
from latentloom.text_encoders.embedding import TextEmbedding, pad_to_same_length

# SDXL reads both encoders at the penultimate layer, un-normalized
SDXL_CLIP_SKIP, SDXL_FINAL_LAYER_NORM = 1, False


class SDXLTextEncoders:
    """encode(prompts, prompts_2) / encode_pair(...) -> TextEmbedding: hidden (B, L, D1 + D2), pooled (B, P)."""

    def __init__(self, encoder_1: CLIPEncoder | None, encoder_2: CLIPEncoder, *,
                 force_zeros_for_empty_prompt: bool = True) -> None:
        for name, encoder in (("encoder_1", encoder_1), ("encoder_2", encoder_2)):
            if encoder is not None and not isinstance(encoder, CLIPEncoder):
                raise TypeError(f"{name} must be a CLIPEncoder, got {type(encoder).__name__}")
        if encoder_2 is None:
            raise ValueError("SDXL needs its second text encoder (OpenCLIP bigG with projection)")
        if getattr(encoder_2.model.config, "projection_dim", None) is None or not hasattr(encoder_2.model,
                                                                                          "text_projection"):
            raise ValueError("the second SDXL text encoder must be a CLIPTextModelWithProjection (its projected "
                             "output is the pooled vector)")
        self.encoders = [e for e in (encoder_1, encoder_2) if e is not None]
        self.encoder_1, self.encoder_2 = encoder_1, encoder_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    @property
    def hidden_size(self) -> int:
        return sum(e.hidden_size for e in self.encoders)

    @property
    def pooled_size(self) -> int:
        return int(self.encoder_2.model.config.projection_dim)

    def to(self, device=None, dtype=None) -> "SDXLTextEncoders":
        for encoder in self.encoders:
            encoder.to(device=device, dtype=dtype)
        return self

    def clear_cache(self) -> None:
        for encoder in self.encoders:
            encoder.clear_cache()

    def release_weights(self) -> bool:
        """Free both encoders' weights until a new prompt needs them (see FrozenTextEncoder)."""
        return all([encoder.release_weights() for encoder in self.encoders])

    @property
    def released(self) -> bool:
        return all(encoder.released for encoder in self.encoders)

    def encode(self, prompts: Sequence[str], prompts_2: Sequence[str] | None = None) -> TextEmbedding:
        prompts = check_prompts(prompts)
        prompts_2 = prompts if prompts_2 is None else _same_count(check_prompts(prompts_2), prompts, "prompts_2")
        parts = ([self.encoder_1.encode(prompts)] if self.encoder_1 is not None else []) + [
            self.encoder_2.encode(prompts_2)]
        if len(parts) == 1:
            return parts[0]
        first, second = pad_to_same_length(*parts)  # prompt_2 may need more windows than prompt
        import torch

        filler = None
        if first.filler is not None and second.filler is not None:
            filler = torch.cat([first.filler, second.filler], dim=-1)
        return TextEmbedding(torch.cat([first.hidden, second.hidden], dim=-1), torch.maximum(first.mask, second.mask),
                             second.pooled, filler)

    def encode_pair(self, prompts: Sequence[str], negative_prompts: Sequence[str] | str | None = None, *,
                    prompts_2: Sequence[str] | None = None,
                    negative_prompts_2: Sequence[str] | str | None = None) -> tuple[TextEmbedding, TextEmbedding]:
        """(cond, uncond), padded to the same length; uncond is zeros where the model forces zeros for an
        empty prompt and no negative prompt was given (diffusers ignores negative_prompts_2 for that)."""
        prompts = check_prompts(prompts)
        cond = self.encode(prompts, prompts_2)
        if negative_prompts is None and self.force_zeros_for_empty_prompt:  # diffusers looks at the first only
            import torch

            uncond = TextEmbedding(torch.zeros_like(cond.hidden), cond.mask.clone(),
                                   None if cond.pooled is None else torch.zeros_like(cond.pooled), cond.filler)
            return cond, uncond
        negatives = _negatives(negative_prompts, len(prompts))
        negatives_2 = negatives if negative_prompts_2 is None else _negatives(negative_prompts_2, len(prompts))
        uncond = self.encode(negatives, negatives_2)
        cond, uncond = pad_to_same_length(cond, uncond)
        return cond, uncond

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, weighting: bool = True, cache_size: int = 32,
                        force_zeros_for_empty_prompt: bool | None = None) -> "SDXLTextEncoders":
        """A diffusers SDXL folder: text_encoder/ + tokenizer/ (absent in the refiner) and text_encoder_2/ +
        tokenizer_2/; force_zeros_for_empty_prompt from its model_index.json (diffusers' default: True)."""
        from latentloom.file_io import read_json_object

        folder = Path(folder)
        common = dict(clip_skip=SDXL_CLIP_SKIP, final_layer_norm=SDXL_FINAL_LAYER_NORM, weighting=weighting,
                      cache_size=cache_size)
        first = None
        if (folder / "text_encoder").is_dir():
            first = CLIPEncoder.from_pretrained(folder, **common)
        if not (folder / "text_encoder_2").is_dir():
            raise FileNotFoundError(f"{folder} has no text_encoder_2/ (SDXL's OpenCLIP bigG encoder)")
        second = CLIPEncoder.from_pretrained(folder, text_encoder_subfolder="text_encoder_2",
                                             tokenizer_subfolder="tokenizer_2", **common)
        if force_zeros_for_empty_prompt is None:
            index = folder / "model_index.json"
            force_zeros_for_empty_prompt = bool(read_json_object(index).get("force_zeros_for_empty_prompt", True)
                                                if index.is_file() else True)
        return cls(first, second, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)


def _same_count(items: list[str], prompts: list[str], name: str) -> list[str]:
    if len(items) != len(prompts):
        raise ValueError(f"got {len(items)} {name} for {len(prompts)} prompts; pass one per prompt")
    return items


def _negatives(negative: Sequence[str] | str | None, count: int) -> list[str]:
    if negative is None:
        return [""] * count
    if isinstance(negative, str):
        return [negative] * count
    return _same_count(check_prompts(negative), [""] * count, "negative prompts")
