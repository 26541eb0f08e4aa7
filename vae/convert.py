"""VAE state dicts in other layouts -> diffusers' (= latentloom's) names.

Original single-file checkpoints keep the VAE under `first_stage_model.` in the LDM (CompVis)
layout: `encoder.down.{i}.block.{j}`, `mid.block_1` / `mid.attn_1` / `mid.block_2`, decoder levels
numbered from the lowest resolution (`decoder.up.{i}` is diffusers' `up_blocks.{levels - 1 - i}`),
`nin_shortcut`, `norm_out`, and the attention's q / k / v / proj_out as 1x1 convs. Folders saved by
diffusers before 0.14 name the attention `query` / `key` / `value` / `proj_attn`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from latentloom.vae.config import VAEConfig

LDM_VAE_PREFIX = "first_stage_model."
_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_MID = {"block_1": "resnets.0", "block_2": "resnets.1"}
_LEVEL = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)$")


def ldm_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare LDM VAE keys (no `first_stage_model.` prefix) -> diffusers names; unknown keys raise."""
    levels = 1 + max((int(m.group(3)) for m in map(_LEVEL.match, sd) if m and m.group(1) == "decoder"), default=-1)
    out, unknown = {}, []
    for key, value in sd.items():
        new, value = _rename(key, value, levels)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"VAE keys with no place in an AutoencoderKL ({len(unknown)}): {sorted(unknown)[:12]}")
    return out


def _rename(key: str, value: torch.Tensor, levels: int) -> tuple[str | None, torch.Tensor]:
    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return key, value
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return None, value
    m = _LEVEL.match(key)
    if m:
        side, _, level, what, block, tail = m.groups()
        index = int(level) if side == "encoder" else levels - 1 - int(level)
        blocks = "down_blocks" if side == "encoder" else "up_blocks"
        if block is not None:
            return f"{side}.{blocks}.{index}.resnets.{block}.{_resnet(tail)}", value
        sampler = "downsamplers" if what == "downsample" else "upsamplers"
        return f"{side}.{blocks}.{index}.{sampler}.0.{tail}", value
    if rest.startswith("mid.attn_1."):
        name, _, param = rest[len("mid.attn_1."):].rpartition(".")
        if name not in _LDM_ATTENTION:
            return None, value
        if value.ndim == 4 and name != "norm":  # 1x1 conv -> linear, same numbers
            value = value[:, :, 0, 0]
        return f"{part}.mid_block.attentions.0.{_LDM_ATTENTION[name]}.{param}", value
    if rest.startswith("mid."):
        block, _, tail = rest[len("mid."):].partition(".")
        if block not in _LDM_MID:
            return None, value
        return f"{part}.mid_block.{_LDM_MID[block]}.{_resnet(tail)}", value
    for old, new in (("norm_out.", "conv_norm_out."), ("conv_in.", "conv_in."), ("conv_out.", "conv_out.")):
        if rest.startswith(old):
            return f"{part}.{new}{rest[len(old):]}", value
    return None, value


def _resnet(tail: str) -> str:
    return tail.replace("nin_shortcut", "conv_shortcut", 1)


def rename_old_attention(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers folder from before 0.14 (`mid_block.attentions.0.query` etc.) -> today's names."""
    out = {}
    for key, value in sd.items():
        head, sep, tail = key.partition(".mid_block.attentions.0.")
        if sep:
            name, _, param = tail.rpartition(".")
            if name in _OLD_ATTENTION:
                key = f"{head}{sep}{_OLD_ATTENTION[name]}.{param}"
        out[key] = value
    return out


def infer_config_from_ldm(sd: Mapping[str, torch.Tensor], *, scaling_factor: float) -> VAEConfig:
    """The architecture of a bare LDM VAE state dict, read off its tensor shapes. Widths divisible
    by 32 get SD's 32 norm groups; narrower test models the largest of 16/8/4/2/1 that divides."""
    levels = sum(1 for k in sd if _matches(k, r"encoder\.down\.\d+\.block\.0\.conv1\.weight"))
    if levels == 0 or "encoder.conv_in.weight" not in sd or "decoder.conv_out.weight" not in sd:
        raise ValueError("not an LDM VAE state dict (expected keys like 'encoder.down.0.block.0.conv1.weight', "
                         "'encoder.conv_in.weight', 'decoder.conv_out.weight')")
    widths = [int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)]
    blocks = sum(1 for k in sd if _matches(k, r"encoder\.down\.0\.block\.\d+\.conv1\.weight"))
    groups = max(g for g in (32, 16, 8, 4, 2, 1) if widths[0] % g == 0)
    return VAEConfig(
        in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
        out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
        block_out_channels=tuple(widths), layers_per_block=blocks, norm_num_groups=groups,
        latent_channels=int(sd["decoder.conv_in.weight"].shape[1]), scaling_factor=scaling_factor,
        use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in sd,
    )


def _matches(key: str, pattern: str) -> bool:
    return re.fullmatch(pattern, key) is not None
