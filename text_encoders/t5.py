"""T5 text encoder (as in Imagen, DeepFloyd IF, SD3, Flux): transformers T5EncoderModel.

T5 takes the attention mask: padded positions never reach a real token, and their hidden
states are zero in the output (mask 0). No start token; the tokenizer's </s> ends the text.
One window of `max_length` tokens (end token included): T5's relative positions would run
longer, but quality beyond the length it was trained on is not something we promise, so a
longer prompt is cut there with a warning that names the cut text. `pooled` is None.
"""
from __future__ import annotations

from latentloom.text_encoders.base import FrozenTextEncoder


class T5Encoder(FrozenTextEncoder):
    """Frozen T5 encoder; hidden (B, L, d_model) with L the longest prompt in the batch."""

    max_windows = 1

    def __init__(
        self, model, tokenizer, *, max_length: int = 512, weighting: bool = True, cache_size: int = 32
    ) -> None:
        super().__init__(model, tokenizer, weighting=weighting, cache_size=cache_size)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (text plus the end token), got {max_length!r}")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("a T5 tokenizer needs an eos token (</s>), got eos_token_id=None")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_length = max_length
        self._setup(window_length=max_length, prefix=[], suffix=[eos], pad_id=pad)

    def _forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, D)
        return hidden * attention_mask[..., None].to(hidden.dtype), None

    def _pool(self, hiddens, window_pooled):
        return None
