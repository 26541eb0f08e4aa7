"""A BERT encoder (Devlin et al. 2019) for the bundled MiniLM, reading transformers' BertModel
folders (config.json + model.safetensors) under transformers' parameter names.

Why not transformers' BertModel: importing transformers' modelling code costs seconds, more than
torch itself, on every `latentloom generate` with the bundled model; this is the few lines of it
the bundled text encoder needs. Its outputs equal BertModel's (tests/test_text_encoders_minilm.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        # what this module computes: post-norm BERT with exact GELU and absolute positions
        for key, wanted in (("hidden_act", "gelu"), ("position_embedding_type", "absolute"), ("model_type", "bert")):
            if raw.get(key, wanted) != wanted:
                raise ValueError(f"{path}: {key} {raw[key]!r} is not supported here (only {wanted!r})")
        if raw["hidden_size"] % raw["num_attention_heads"]:
            raise ValueError(f"{path}: hidden_size {raw['hidden_size']} is not divisible by "
                             f"num_attention_heads {raw['num_attention_heads']}")
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


class _Layer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.heads = cfg.num_attention_heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, nn.Linear(d, d))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(d, d)
        self.attention.output.LayerNorm = nn.LayerNorm(d, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, cfg.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(cfg.intermediate_size, d)
        self.output.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        attn = self.attention

        def split(proj: nn.Linear) -> torch.Tensor:  # (B, T, D) -> (B, heads, T, D / heads)
            return proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(attn.self.query), split(attn.self.key), split(attn.self.value)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, t, d)
        x = attn.output.LayerNorm(attn.output.dense(context) + x)
        return self.output.LayerNorm(self.output.dense(F.gelu(self.intermediate.dense(x))) + x)


class BertEncoderModel(nn.Module):
    """`model(input_ids=..., attention_mask=...).last_hidden_state`: (B, T, hidden_size)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.embeddings.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.embeddings.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.embeddings.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([_Layer(config) for _ in range(config.num_hidden_layers)])
        self.pooler = nn.Module()  # kept so the file's weights all have a place; the encoder does not use it
        self.pooler.dense = nn.Linear(d, d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        b, t = input_ids.shape
        if t > self.config.max_position_embeddings:
            raise ValueError(f"{t} tokens exceed the model's {self.config.max_position_embeddings} positions")
        emb = self.embeddings
        positions = torch.arange(t, device=input_ids.device)
        # one segment (token type 0 everywhere); summed in transformers' order
        x = emb.word_embeddings(input_ids) + emb.token_type_embeddings.weight[0]
        x = x + emb.position_embeddings(positions)[None]
        x = emb.LayerNorm(x)
        bias = None
        if attention_mask is not None:  # padded keys get the dtype's lowest value, as transformers does
            keep = attention_mask[:, None, None, :].to(torch.bool)
            bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return SimpleNamespace(last_hidden_state=x)

    @classmethod
    def from_folder(cls, folder: str | Path) -> BertEncoderModel:
        """config.json + model.safetensors; every weight must have its place (position_ids, a buffer
        older files carry, is the one key allowed to go)."""
        from latentloom.weight_files import load_safetensors

        folder = Path(folder)
        model = cls(BertConfig.from_file(folder / "config.json"))
        state = load_safetensors(folder / "model.safetensors")
        state = {k.removeprefix("bert."): v for k, v in state.items() if not k.endswith("position_ids")}
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        shapes = [k for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(f"{folder / 'model.safetensors'} does not fit its config.json: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}, wrong shapes {sorted(shapes)[:8]}")
        model.load_state_dict(state, strict=True)
        return model.eval()
