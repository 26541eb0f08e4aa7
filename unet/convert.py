"""State-dict conversion: diffusers <-> latentloom, original LDM (CompVis) -> diffusers names.

latentloom's parameter names are diffusers' names; the one difference is that SD 1.x's
1x1-conv ``proj_in`` / ``proj_out`` are stored here as Linear weights (C, C). The LDM
layout numbers its blocks (``input_blocks.4.1``); we translate those to diffusers names
and infer the architecture from the tensor shapes when no config is given.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from latentloom.unet.config import UNetConfig

LDM_PREFIX = "model.diffusion_model."
_PROJ = re.compile(r"\.proj_(in|out)\.weight$")

# The guidance embedding of LCM-distilled UNets has no name in the LDM layout. diffusers' script
# convert_diffusers_to_original_stable_diffusion.py (how LCM single files are made) keeps its
# diffusers name under the LDM prefix; some converters write it as part of time_embed. Both load;
# export writes the first.
_LDM_COND_PROJ = ("time_embedding.cond_proj.", "time_embed.cond_proj.")

_LDM_RESNET = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}


# ---------------------------------------------------------------------- diffusers <-> ours
def diffusers_to_ours(sd: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` state dict -> latentloom's (views, no copies)."""
    out = {}
    for key, value in sd.items():
        if _PROJ.search(key) and value.ndim == 4:
            if cfg.use_linear_projection:
                raise ValueError(f"{key} is a 1x1 conv {tuple(value.shape)} but the config says "
                                 "use_linear_projection=True")
            value = value[:, :, 0, 0]  # (C, C, 1, 1) conv -> (C, C) linear, same numbers
        out[key] = value
    return out


def ours_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if _PROJ.search(key) and not cfg.use_linear_projection:
            value = value[:, :, None, None]
        out[key] = value
    return out


def check_state_dict(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *,
                     source: str) -> None:
    """Raise listing every missing / unexpected / wrongly-shaped key (never skip silently)."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(f"{k}: {tuple(sd[k].shape)} != {tuple(expected[k].shape)}"
                    for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        parts = [f"{source} does not match the UNet config:"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes}")
        raise ValueError("\n".join(parts))


# ---------------------------------------------------------------------- LDM -> diffusers
def strip_ldm_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the UNet's keys of a full LDM checkpoint (drops the VAE / text encoder's)."""
    if any(k.startswith(LDM_PREFIX) for k in sd):
        return {k[len(LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(LDM_PREFIX)}
    return dict(sd)


def ldm_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Rename bare LDM UNet keys (no prefix) to diffusers names; unknown keys raise."""
    table = _ldm_prefix_table(cfg)
    out, unexpected = {}, []
    for key, value in sd.items():
        new = _rename_ldm_key(key, table)
        if new is None:
            unexpected.append(key)
        elif new in out:
            raise ValueError(f"LDM state dict names {new!r} twice (as {key!r} and under another name)")
        else:
            out[new] = value
    if unexpected:
        raise ValueError(f"LDM state dict has keys that no part of the UNet config explains "
                         f"({len(unexpected)}): {sorted(unexpected)}")
    return out


def _rename_ldm_key(key: str, table: list[tuple[str, str, bool]]) -> str | None:
    for old, new, is_resnet in table:
        if key.startswith(old):
            rest = key[len(old):]
            if is_resnet:
                for ldm_name, name in _LDM_RESNET.items():
                    if rest.startswith(ldm_name + "."):
                        return new + name + rest[len(ldm_name):]
                return None
            return new + rest
    return None


def _ldm_prefix_table(cfg: UNetConfig) -> list[tuple[str, str, bool]]:
    """(LDM prefix, diffusers prefix, is ResBlock) for every module of ``cfg``."""
    t = [(old, "time_embedding.cond_proj.", False) for old in _LDM_COND_PROJ if cfg.time_cond_proj_dim is not None]
    t += [("time_embed.0.", "time_embedding.linear_1.", False),
         ("time_embed.2.", "time_embedding.linear_2.", False),
         # SDXL's vector conditioning MLP (sgm: label_emb = Sequential(Sequential(Linear, SiLU, Linear)))
         ("label_emb.0.0.", "add_embedding.linear_1.", False),
         ("label_emb.0.2.", "add_embedding.linear_2.", False),
         ("label_emb.", "class_embedding.", False),
         ("input_blocks.0.0.", "conv_in.", False),
         ("out.0.", "conv_norm_out.", False),
         ("out.2.", "conv_out.", False),
         ("middle_block.0.", "mid_block.resnets.0.", True),
         ("middle_block.1.", "mid_block.attentions.0.", False),
         ("middle_block.2.", "mid_block.resnets.1.", True)]
    idx = 1
    for i in range(cfg.num_levels):
        for j in range(cfg.layers_per_level[i]):
            t.append((f"input_blocks.{idx}.0.", f"down_blocks.{i}.resnets.{j}.", True))
            t.append((f"input_blocks.{idx}.1.", f"down_blocks.{i}.attentions.{j}.", False))
            idx += 1
        if i < cfg.num_levels - 1:
            t.append((f"input_blocks.{idx}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.", False))
            idx += 1
    idx = 0
    for u, i in enumerate(reversed(range(cfg.num_levels))):
        n = cfg.layers_per_level[i] + 1
        for j in range(n):
            t.append((f"output_blocks.{idx}.0.", f"up_blocks.{u}.resnets.{j}.", True))
            if cfg.attention_levels[i]:
                t.append((f"output_blocks.{idx}.1.", f"up_blocks.{u}.attentions.{j}.", False))
            if j == n - 1 and i > 0:
                k = 2 if cfg.attention_levels[i] else 1
                t.append((f"output_blocks.{idx}.{k}.conv.", f"up_blocks.{u}.upsamplers.0.conv.", False))
            idx += 1
    return t


def diffusers_to_ldm(sd: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Inverse of ``ldm_to_diffusers`` (bare LDM keys), for export and round-trip tests."""
    out = {}
    inverse_resnet = {v: k for k, v in _LDM_RESNET.items()}
    table = _ldm_prefix_table(cfg)
    for key, value in sd.items():
        for old, new, is_resnet in table:
            if key.startswith(new):
                rest = key[len(new):]
                if is_resnet:
                    head, _, tail = rest.partition(".")
                    rest = inverse_resnet[head] + "." + tail
                out[old + rest] = value
                break
        else:
            raise ValueError(f"no LDM name for diffusers key {key!r}")
    return out


# ---------------------------------------------------------------------- config inference
def infer_config_from_ldm_state_dict(sd: Mapping[str, torch.Tensor]) -> UNetConfig:
    """Read the architecture off the tensor shapes of an LDM UNet state dict.

    Shapes fix channels, levels, layers, attention, depth, context width, projection kind,
    in/out channels, the class embedding, SDXL's vector conditioning and LCM's guidance
    embedding. Heads are not in the
    shapes: we follow the released models (context 768: 8 heads, SD 1.x; context 1024: head
    dim 64, SD 2.x; with a noise-level embedding: 8 heads, the x4 upscaler; with a vector
    conditioning: head dim 64 and numbers embedded 256 wide, SDXL base and refiner). Pass
    ``config=`` otherwise.
    """
    sd = strip_ldm_prefix(sd)
    if "input_blocks.0.0.weight" not in sd or "out.2.weight" not in sd:
        raise ValueError("not an LDM UNet state dict: 'input_blocks.0.0.weight' / 'out.2.weight' "
                         "missing (expected keys like 'model.diffusion_model.input_blocks.0.0.weight')")
    conv_in = sd["input_blocks.0.0.weight"]  # (ch0, in_ch, 3, 3)
    channels, layers, attention, depth = [], [], [], []
    only_cross, context_dim, linear = [], None, None
    idx, n_layers, level_attn = 1, 0, False
    while True:
        p = f"input_blocks.{idx}."
        if p + "0.op.weight" in sd or p + "0.in_layers.0.weight" not in sd:
            # a downsampler (or the end of the down path) closes the current level
            channels.append(sd[f"input_blocks.{idx - 1}.0.out_layers.3.weight"].shape[0])
            layers.append(n_layers)
            attention.append(level_attn)
            if p + "0.op.weight" not in sd:
                break
            n_layers, level_attn = 0, False
            idx += 1
            continue
        n_layers += 1
        if p + "1.proj_in.weight" in sd:
            level_attn = True
            linear = sd[p + "1.proj_in.weight"].ndim == 2
            context_dim = sd[p + "1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
            if n_layers == 1:
                depth.append(_count_blocks(sd, p + "1.transformer_blocks."))
                ch = sd[p + "1.proj_in.weight"].shape[0]
                kdim = sd[p + "1.transformer_blocks.0.attn1.to_k.weight"].shape[1]
                only_cross.append(kdim != ch)
        elif n_layers == 1:
            depth.append(None)
            only_cross.append(False)
        idx += 1
    if context_dim is None:
        if "middle_block.1.transformer_blocks.0.attn2.to_k.weight" not in sd:
            raise ValueError("LDM UNet without any cross-attention is not supported")
        context_dim = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
        linear = sd["middle_block.1.proj_in.weight"].ndim == 2
    mid_depth = _count_blocks(sd, "middle_block.1.transformer_blocks.")
    # a level without attention builds no transformer; the last level's depth is the middle block's
    depth = [d if d is not None else (mid_depth if i == len(depth) - 1 else 1) for i, d in enumerate(depth)]
    num_class = sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None
    adm = sd["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in sd else None
    cond_proj = [sd[name + "weight"].shape[1] for name in _LDM_COND_PROJ if name + "weight" in sd]
    if adm is None and (num_class is not None or context_dim != 1024):
        heads = dict(num_heads=8, head_dim=None)
    else:  # SD 2.x, and SDXL base / refiner: 64-wide heads
        heads = dict(num_heads=None, head_dim=64)
    return UNetConfig(
        in_channels=conv_in.shape[1], out_channels=sd["out.2.weight"].shape[0],
        channels=channels, layers_per_level=layers, attention_levels=attention, **heads,
        transformer_depth=depth, context_dim=context_dim, use_linear_projection=bool(linear),
        upcast_attention=context_dim == 1024 and num_class is None,
        only_cross_attention=only_cross, num_class_embeds=num_class,
        # SDXL's numbers are embedded 256 wide (base: 1280 + 6 x 256, refiner: 1280 + 5 x 256)
        adm_in_channels=adm, addition_time_embed_dim=256 if adm is not None else None,
        time_cond_proj_dim=cond_proj[0] if cond_proj else None,
    )


def _count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    n = 0
    while f"{prefix}{n}.norm1.weight" in sd:
        n += 1
    return n
