"""A tokenizer.json read with the `tokenizers` library alone, answering the part of transformers'
tokenizer interface the frozen encoders use (`tok(text, add_special_tokens=False)["input_ids"]`,
`decode`, `convert_ids_to_tokens`, the special-token ids, `model_max_length`).

Why: transformers' tokenizer classes import much of transformers, seconds of every bundled-model
cold start; the ids are the same, since transformers' fast tokenizers run this very file through
this library (tests/test_text_encoders_minilm.py compares them).
"""
from __future__ import annotations

import json
from pathlib import Path


class Encoding(dict):
    """{"input_ids": ...}, also readable as `.input_ids`, like transformers' BatchEncoding."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class FastTokenizer:
    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # the file may carry padding / truncation settings (MiniLM's: 128); transformers turns them off
        # and so do we: windows and padding are the encoder's business, and nothing is cut silently
        self._tok.no_padding()
        self._tok.no_truncation()
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.model_max_length = int(config.get("model_max_length", 512))
        self.cls_token_id = self._special(config.get("cls_token", "[CLS]"))
        self.sep_token_id = self._special(config.get("sep_token", "[SEP]"))
        self.pad_token_id = self._special(config.get("pad_token", "[PAD]"))

    def _special(self, token) -> int | None:
        if isinstance(token, dict):  # {"content": "[CLS]", ...} in newer files
            token = token.get("content")
        return None if token is None else self._tok.token_to_id(token)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str | list[str], *, add_special_tokens: bool = True, verbose: bool = True) -> Encoding:
        if isinstance(text, str):
            return Encoding(input_ids=self._tok.encode(text, add_special_tokens=add_special_tokens).ids)
        encoded = self._tok.encode_batch(list(text), add_special_tokens=add_special_tokens)
        return Encoding(input_ids=[e.ids for e in encoded])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._tok.id_to_token(i) for i in ids]
