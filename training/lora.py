"""LoRA training: peft adapters on the UNet's attention projections, saved alone.

The saved file is read (and merged into any model) by `latentloom.unet.lora.load_lora`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from latentloom.file_io import write_atomic

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_FORMAT = "latentloom-lora"


def add_lora(unet: nn.Module, *, rank: int, alpha: float | None = None,
             targets: tuple[str, ...] = ATTENTION_TARGETS) -> nn.Module:
    """Inject peft LoRA layers into the attention projections and freeze everything else."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:  # peft is the optional extra "lora"
        raise ImportError("LoRA training needs peft: pip install 'latentloom[lora]'") from e
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(targets),
                        lora_dropout=0.0, init_lora_weights=True)
    unet.requires_grad_(False)
    inject_adapter_in_model(config, unet)
    for name, p in unet.named_parameters():
        p.requires_grad_(".lora_" in name)
    unet._latentloom_lora = {"rank": rank, "alpha": float(alpha if alpha is not None else rank)}
    return unet


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone, under diffusers/peft names: ``unet.<module>.lora_A.weight`` (r, in), ``lora_B`` (out, r)."""
    out = {}
    for name, value in unet.state_dict().items():
        m = re.match(r"^(.*)\.lora_([AB])\.default\.weight$", name)
        if m:
            out[f"unet.{m.group(1)}.lora_{m.group(2)}.weight"] = value.detach().float().contiguous().cpu()
    if not out:
        raise ValueError("this UNet has no LoRA layers (add_lora was not called)")
    return out


def save_lora(unet: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapters alone to one .safetensors file (temp name + rename)."""
    from safetensors.torch import save_file

    info = getattr(unet, "_latentloom_lora", None)
    if info is None:
        raise ValueError("this UNet has no LoRA layers (add_lora was not called)")
    metadata = {"format": LORA_FORMAT, "rank": str(info["rank"]), "alpha": str(info["alpha"])}
    state = lora_state_dict(unet)
    return write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


