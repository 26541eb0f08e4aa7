"""The text towers of original single-file checkpoints, as transformers CLIP models: CLIP ViT-L in
transformers' own layout under a prefix (SD 1.x's cond_stage_model, SDXL's first embedder), and OpenCLIP
towers (SD 2.x's ViT-H, SDXL's bigG) through diffusers' converter."""
from __future__ import annotations

from pathlib import Path

import torch

SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."


def clip_l_text_model(state: dict[str, torch.Tensor], path: Path, *, prefix: str = None,
                      token_ids: dict[str, int] | None = None):
    """CLIP ViT-L/14's text tower (transformers layout already, under `prefix`: SD 1.x's by default)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    prefix = prefix or SD1_TEXT_PREFIX
    text = {k.removeprefix(prefix).removeprefix("text_model."): v for k, v in state.items() if k.startswith(prefix)}
    if not text:
        raise ValueError(f"{path} holds no text encoder ('{prefix}*' or '{SD2_TEXT_PREFIX}*' keys)")
    tokens = text["embeddings.token_embedding.weight"]
    hidden = int(tokens.shape[1])
    layers = 1 + max(int(k.split(".")[2]) for k in text if k.startswith("encoder.layers."))
    config = CLIPTextConfig(
        vocab_size=int(tokens.shape[0]), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=int(text["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        max_position_embeddings=int(text["embeddings.position_embedding.weight"].shape[0]),
        hidden_act="quick_gelu", **(token_ids or {}),
    )
    model = CLIPTextModel(config)
    text.pop("embeddings.position_ids", None)  # a buffer some files carry
    load_exact(model, _fit_prefix(text, model), path, "text encoder")
    return model.eval()


def open_clip_text_model(state: dict[str, torch.Tensor], path: Path, *, prefix: str = None,
                         projection: bool = False, token_ids: dict[str, int] | None = None):
    """An OpenCLIP text tower (resblocks with in_proj) as a transformers CLIP model.

    SD 2.x (default): ViT-H/14 as diffusers builds it, the penultimate layer (the last of the 24
    is dropped) followed by the final layer norm. projection=True (SDXL's bigG): every layer kept and
    the text projection too, as a CLIPTextModelWithProjection. token_ids: bos / eos / pad ids of its
    tokenizer (the pooled output is read at the end token), when they are not CLIP's."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    prefix = prefix or SD2_TEXT_PREFIX
    tokens = state[prefix + "token_embedding.weight"]
    hidden = int(tokens.shape[1])
    blocks_prefix = prefix + "transformer.resblocks."
    blocks = 1 + max(int(k[len(blocks_prefix):].split(".")[0]) for k in state if k.startswith(blocks_prefix))
    layers = blocks if projection else blocks - 1
    config = CLIPTextConfig(
        vocab_size=int(tokens.shape[0]), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=int(state[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        max_position_embeddings=int(state[prefix + "positional_embedding"].shape[0]), hidden_act="gelu",
        **({"projection_dim": int(state[prefix + "text_projection"].shape[1])} if projection else {}),
        **(token_ids or {}),
    )
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    last = f"{prefix}transformer.resblocks.{blocks - 1}."
    kept = {k: v for k, v in state.items() if k.startswith(prefix)
            and (projection or (not k.startswith(last) and k != prefix + "text_projection"))}
    converted = convert_open_clip_checkpoint(model, kept, prefix=prefix)
    text = {k.removeprefix("text_model."): v for k, v in converted.items() if k.startswith("text_model.")}
    weights = _fit_prefix(text, model)
    if projection:  # (proj, width): diffusers' converter has transposed OpenCLIP's (width, proj)
        weights["text_projection.weight"] = converted["text_projection.weight"]
    load_exact(model, weights, path, "text encoder")
    return model.eval()


def _fit_prefix(state: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers 4 names CLIP's text weights `text_model.*`, transformers 5 without the prefix;
    SD files use the former. Take unprefixed keys and prefix them when the module wants it."""
    if any(k.startswith("text_model.") for k in module.state_dict()):
        return {f"text_model.{k}": v for k, v in state.items()}
    return state


def load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """load_state_dict that names every missing or unexpected key instead of ignoring them."""
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: the {what} weights do not fit: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{path}: the {what} weights do not fit the inferred config: {err}") from err
