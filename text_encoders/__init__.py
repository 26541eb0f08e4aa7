"""Frozen text encoders (CLIP, T5, MiniLM), tokenization, long and weighted prompts.

Names resolve on first use (PEP 562), so importing this package does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "TextEmbedding": "latentloom.text_encoders.embedding",
    "pad_to_length": "latentloom.text_encoders.embedding",
    "pad_to_same_length": "latentloom.text_encoders.embedding",
    "parse_prompt_weights": "latentloom.text_encoders.weighting",
    "FrozenTextEncoder": "latentloom.text_encoders.base",
    "CLIPEncoder": "latentloom.text_encoders.clip",
    "T5Encoder": "latentloom.text_encoders.t5",
    "MiniLMEncoder": "latentloom.text_encoders.minilm",
    "minilm_model_dir": "latentloom.text_encoders.minilm",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'latentloom.text_encoders' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
