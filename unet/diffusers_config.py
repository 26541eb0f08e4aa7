"""Translate between diffusers' ``UNet2DConditionModel`` config.json and ``UNetConfig``.

diffusers' ``attention_head_dim`` is, for historical reasons, the number of heads
(diffusers issue 2011); we store it as ``num_heads``.
"""
from __future__ import annotations

import warnings
from typing import Any

from latentloom.unet.config import UNetConfig

_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"

# Keys whose only supported value is diffusers' default (or an equivalent one). A
# different value means an architecture we do not build (Kandinsky, ...).
_MUST_BE: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1, 1.0),
    "act_fn": ("silu",),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None, "text_time"),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
# Keys that do not change the network's weights or function.
_IGNORED = {"sample_size", "addition_embed_type_num_heads"}
_USED = {
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
    "up_block_types", "attention_head_dim", "transformer_layers_per_block", "cross_attention_dim",
    "use_linear_projection", "upcast_attention", "only_cross_attention", "norm_num_groups",
    "norm_eps", "num_class_embeds", "flip_sin_to_cos", "freq_shift", "dropout",
    "addition_time_embed_dim", "projection_class_embeddings_input_dim", "time_cond_proj_dim",
}


def config_from_diffusers(d: dict[str, Any]) -> UNetConfig:
    if not isinstance(d, dict):
        raise TypeError(f"expected a diffusers config dict, got {type(d).__name__}")
    cls_name = d.get("_class_name", "UNet2DConditionModel")
    if cls_name != "UNet2DConditionModel":
        raise ValueError(f"_class_name {cls_name!r} is not supported; expected 'UNet2DConditionModel'")
    bad = {k: d[k] for k, ok in _MUST_BE.items() if k in d and not _same(d[k], ok)}
    if bad:
        raise ValueError(
            f"diffusers UNet features latentloom does not support: {bad} "
            f"(supported values: { {k: _MUST_BE[k] for k in bad} })"
        )
    unknown = sorted(k for k in d if not k.startswith("_") and k not in _MUST_BE
                     and k not in _IGNORED and k not in _USED)
    if unknown:
        warnings.warn(f"ignoring diffusers UNet config keys latentloom does not know: {unknown}",
                      stacklevel=3)

    channels = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(channels)
    down = list(d.get("down_block_types", [_CROSS_DOWN] * 3 + [_PLAIN_DOWN]))
    up = list(d.get("up_block_types", [_PLAIN_UP] + [_CROSS_UP] * 3))
    for kind in down:
        if kind not in (_CROSS_DOWN, _PLAIN_DOWN):
            raise ValueError(f"down block type {kind!r} is not supported; accepted: {_CROSS_DOWN}, {_PLAIN_DOWN}")
    for kind in up:
        if kind not in (_CROSS_UP, _PLAIN_UP):
            raise ValueError(f"up block type {kind!r} is not supported; accepted: {_CROSS_UP}, {_PLAIN_UP}")
    attention = [kind == _CROSS_DOWN for kind in down]
    mirrored = [kind == _CROSS_UP for kind in reversed(up)]
    if len(down) != levels or mirrored != attention:
        raise ValueError(
            f"down_block_types {down} and up_block_types {up} must mirror each other, one per "
            f"block_out_channels entry ({levels})"
        )
    context_dim = d.get("cross_attention_dim", 1280)
    if not isinstance(context_dim, int):
        raise ValueError(f"per-block cross_attention_dim {context_dim!r} is not supported; give one int")
    depth = d.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in depth):
        raise ValueError(f"nested transformer_layers_per_block {depth!r} is not supported")
    norm_groups = d.get("norm_num_groups", 32)
    if norm_groups is None:
        raise ValueError("norm_num_groups=None (no group norm) is not supported")
    adm, time_dim = _vector_conditioning(d)
    heads = d.get("attention_head_dim", 8)
    only_cross = d.get("only_cross_attention", False)
    if isinstance(only_cross, (list, tuple)) and len(only_cross) == levels:
        # The flag means nothing on levels without attention; keep it False there.
        only_cross = [bool(o) and a for o, a in zip(only_cross, attention)]
    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        channels=channels,
        layers_per_level=_listify(d.get("layers_per_block", 2)),
        attention_levels=attention,
        num_heads=_listify(heads),
        head_dim=None,
        transformer_depth=_listify(depth),
        context_dim=context_dim,
        use_linear_projection=bool(d.get("use_linear_projection", False)),
        upcast_attention=bool(d.get("upcast_attention", False)),
        only_cross_attention=_listify(only_cross),
        norm_groups=norm_groups,
        norm_eps=float(d.get("norm_eps", 1e-5)),
        num_class_embeds=d.get("num_class_embeds"),
        flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
        freq_shift=int(d.get("freq_shift", 0)),
        dropout=float(d.get("dropout", 0.0)),
        adm_in_channels=adm,
        addition_time_embed_dim=time_dim,
        time_cond_proj_dim=d.get("time_cond_proj_dim"),
    )


def _vector_conditioning(d: dict[str, Any]) -> tuple[int | None, int | None]:
    """SDXL's added conditioning (addition_embed_type "text_time"): (y's width, each number's width)."""
    adm, time_dim = d.get("projection_class_embeddings_input_dim"), d.get("addition_time_embed_dim")
    if d.get("addition_embed_type") != "text_time":
        if adm is not None or time_dim is not None:
            raise ValueError(f"projection_class_embeddings_input_dim={adm!r} / addition_time_embed_dim={time_dim!r} "
                             "are supported with addition_embed_type 'text_time' only")
        return None, None
    if not isinstance(adm, int) or not isinstance(time_dim, int):
        raise ValueError(f"addition_embed_type 'text_time' needs int projection_class_embeddings_input_dim and "
                         f"addition_time_embed_dim, got {adm!r} and {time_dim!r}")
    return adm, time_dim


def config_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    down = [_CROSS_DOWN if a else _PLAIN_DOWN for a in cfg.attention_levels]
    up = [_CROSS_UP if a else _PLAIN_UP for a in reversed(cfg.attention_levels)]
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": list(cfg.channels),
        "layers_per_block": list(cfg.layers_per_level),
        "down_block_types": down,
        "up_block_types": up,
        "attention_head_dim": [cfg.heads_at(i) for i in range(cfg.num_levels)],
        "transformer_layers_per_block": list(cfg.transformer_depth),
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_projection,
        "upcast_attention": cfg.upcast_attention,
        "only_cross_attention": list(cfg.only_cross_attention),
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        "num_class_embeds": cfg.num_class_embeds,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": cfg.freq_shift,
        "dropout": cfg.dropout,
        "addition_embed_type": "text_time" if cfg.adm_in_channels is not None else None,
        "addition_time_embed_dim": cfg.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": cfg.adm_in_channels,
        "time_cond_proj_dim": cfg.time_cond_proj_dim,
    }


def _listify(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _same(value: Any, accepted: tuple[Any, ...]) -> bool:
    return any(value == a and type(value) is type(a) or (value is None and a is None) for a in accepted)
