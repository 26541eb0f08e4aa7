"""Merging LoRA files (latentloom's own, diffusers/peft, Kohya) into a model with a scale.

A LoRA replaces W by W + scale * (alpha / r) * B A with A (r, in), B (out, r)
(Hu et al. 2021, eq. 3). Loading merges that delta into the weights: no runtime cost, and
``load_lora(..., scale=-s)`` takes it back out (up to rounding). Training adapters is
`latentloom.training.lora`.

Key formats read (weights ``down`` = A, ``up`` = B):
- diffusers / peft:  ``[unet.]<module>.lora_A.weight`` / ``.lora_B.weight`` (latentloom saves this,
  with rank and alpha in the file's metadata), and the older ``<module>.lora.down.weight`` /
  ``.lora.up.weight`` and ``...processor.to_q_lora.down.weight`` forms;
- Kohya (sd-scripts, A1111, ComfyUI): ``lora_unet_<module with _ for .>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha``, with module names in diffusers or original LDM numbering
  (``lora_unet_input_blocks_1_1_proj_in``); ``lora_te_`` keys go to the text encoder.
Every key is either applied or reported: unmatched keys raise (``strict=True``) or are
listed in the report and warned about.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class LoraReport:
    """What a LoRA file did to a model."""

    total_keys: int
    applied_keys: int
    modules: list[str] = field(default_factory=list)  # modules whose weights changed
    unmatched: dict[str, str] = field(default_factory=dict)  # key -> why it was not applied

    def __str__(self) -> str:
        return (f"LoRA: applied {self.applied_keys} of {self.total_keys} keys to {len(self.modules)} modules"
                + (f"; not applied: {len(self.unmatched)}" if self.unmatched else ""))


def _module_index(model: nn.Module, *, ldm_names: dict[str, str] | None = None,
                  prefix: str = "") -> dict[str, str]:
    """Every spelling a LoRA file may use for a Linear/Conv2d of ``model`` -> its real name.

    prefix: a level the file's names have and the model lacks (transformers 5 dropped
    CLIPTextModel's ``text_model.``, which Kohya files still spell).
    """
    index = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            spellings = [name]
            if prefix and not name.startswith(prefix):
                spellings.append(prefix + name)
            if ldm_names and name in ldm_names:
                spellings.append(ldm_names[name])
            for spelling in spellings:
                index[spelling] = name
                index[spelling.replace(".", "_")] = name
    return index


def _ldm_module_names(unet: nn.Module) -> dict[str, str]:
    """Our (= diffusers) module names -> original LDM names, for Kohya files in LDM numbering."""
    config = getattr(unet, "config", None)
    if config is None or not hasattr(config, "num_levels"):
        return {}
    from latentloom.unet.convert import _ldm_prefix_table, _LDM_RESNET

    names = {}
    inverse_resnet = {v: k for k, v in _LDM_RESNET.items()}
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        for old, new, is_resnet in _ldm_prefix_table(config):
            if (name + ".").startswith(new):
                rest = name[len(new):]
                if is_resnet:
                    head, _, tail = rest.partition(".")
                    if head not in inverse_resnet:
                        break
                    rest = inverse_resnet[head] + ("." + tail if tail else "")
                names[name] = (old + rest).rstrip(".")
                break
    return names


_PAIR = re.compile(
    r"^(?P<module>.+?)(?:\.lora_(?P<ab>[AB])\.weight|\.lora_(?P<du>down|up)\.weight|\.lora\.(?P<du2>down|up)\.weight"
    r"|_lora\.(?P<du3>down|up)\.weight|\.(?P<alpha>alpha))$"
)


def _parse(key: str) -> tuple[str, str] | None:
    """Key -> (module spelling, one of "down" / "up" / "alpha"), or None."""
    m = _PAIR.match(key)
    if not m:
        return None
    if m.group("alpha"):
        return m.group("module"), "alpha"
    part = {"A": "down", "B": "up"}.get(m.group("ab") or "") or m.group("du") or m.group("du2") or m.group("du3")
    module = m.group("module")
    if m.group("du3"):  # diffusers' old attention-processor form: ...processor.to_q_lora.down
        module = re.sub(r"\.processor\.to_(q|k|v|out)$", lambda x: ".to_out.0" if x.group(1) == "out" else f".to_{x.group(1)}",
                        module)
    return module, part


def _target(module_key: str) -> tuple[str, str]:
    """Split off the model prefix: ("unet" | "text_encoder" | "text_encoder_2", rest); SDXL files name its
    two text encoders te1 / te2 (Kohya) or text_encoder / text_encoder_2 (diffusers)."""
    for prefix, target in (("lora_unet_", "unet"), ("unet.", "unet"), ("lora_te1_", "text_encoder"),
                           ("lora_te2_", "text_encoder_2"), ("lora_te_", "text_encoder"),
                           ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder")):
        if module_key.startswith(prefix):
            return target, module_key[len(prefix):]
    return "unet", module_key  # bare diffusers names are UNet names


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are read from .safetensors only, got {path.name!r}")
    from latentloom.weight_files import check_safetensors

    check_safetensors(path)  # a broken or git-lfs pointer file: ValueError naming it
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


@torch.no_grad()
def load_lora(
    unet: nn.Module,
    source: str | os.PathLike | dict[str, torch.Tensor],
    *,
    scale: float = 1.0,
    text_encoder: nn.Module | None = None,
    strict: bool = True,
) -> LoraReport:
    """Merge a LoRA (file or state dict) into ``unet`` (and ``text_encoder``) with ``scale``.

    strict: raise ValueError naming the keys that match no module (or the text encoder's
    keys when no text_encoder is given); with strict=False they are warned about and listed
    in the report's ``unmatched``.
    """
    if isinstance(source, dict):
        tensors, metadata = dict(source), {}
    else:
        tensors, metadata = read_lora_file(source)
    default_alpha = float(metadata["alpha"]) if "alpha" in metadata else None
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    unmatched: dict[str, str] = {}
    for key, value in tensors.items():
        parsed = _parse(key)
        if parsed is None:
            unmatched[key] = "not a LoRA key (expected lora_A/lora_B, lora_down/lora_up or alpha)"
            continue
        module_key, part = parsed
        target, name = _target(module_key)
        groups.setdefault((target, name), {"keys": []})[part] = value
        groups[(target, name)]["keys"].append(key)

    models: dict[str, nn.Module] = {"unet": unet}
    indexes = {"unet": _module_index(unet, ldm_names=_ldm_module_names(unet))}
    # an SDXL pair (encoder_1 may be None: the refiner) or one encoder; a wrapper holds the HF model as .model
    if hasattr(text_encoder, "encoder_2"):
        encoders = {"text_encoder": text_encoder.encoder_1, "text_encoder_2": text_encoder.encoder_2}
    else:
        encoders = {"text_encoder": text_encoder}
    for target, encoder in encoders.items():
        if encoder is not None:
            if hasattr(encoder, "restore_weights"):
                encoder.restore_weights()  # released weights are read back before anything merges into them
            inner = getattr(encoder, "model", encoder)
            indexes[target] = _module_index(inner, prefix="text_model.")  # Kohya spells text_model...
            models[target] = inner
    applied, modules = 0, []
    for (target, name), group in groups.items():
        keys = group["keys"]
        if target not in indexes:
            for k in keys:
                unmatched[k] = ("a text-encoder LoRA key, but no text_encoder was given" if target == "text_encoder"
                                else f"a {target} LoRA key, but this model has no {target}")
            continue
        real = indexes[target].get(name)
        if real is None:
            for k in keys:
                unmatched[k] = f"no {target} module named {name!r}"
            continue
        if "down" not in group or "up" not in group:
            for k in keys:
                unmatched[k] = f"{real}: needs both down (A) and up (B) weights"
            continue
        layer = dict(models[target].named_modules())[real]
        weight = layer.base_layer.weight if hasattr(layer, "base_layer") else layer.weight
        down, up = group["down"].float(), group["up"].float()
        rank = down.shape[0]
        alpha = float(group["alpha"]) if "alpha" in group else (default_alpha if default_alpha is not None else rank)
        delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)  # (out, in * k * k)
        if delta.numel() != weight.numel():
            for k in keys:
                unmatched[k] = f"{real}: LoRA gives {tuple(delta.shape)}, weight is {tuple(weight.shape)}"
            continue
        weight.add_((scale * alpha / rank * delta).reshape(weight.shape).to(weight.dtype))
        applied += len(keys)
        modules.append(f"{target}.{real}")
    report = LoraReport(total_keys=len(tensors), applied_keys=applied, modules=modules, unmatched=unmatched)
    if unmatched:
        sample = "; ".join(f"{k}: {why}" for k, why in list(unmatched.items())[:5])
        message = f"{len(unmatched)} of {len(tensors)} LoRA keys were not applied ({sample})"
        if strict:
            raise ValueError(message + "; pass strict=False to apply the rest")
        warnings.warn(message, stacklevel=2)
    if hasattr(text_encoder, "clear_cache"):
        text_encoder.clear_cache()  # cached prompt encodings predate the new weights
    for target, encoder in encoders.items():
        if any(m.startswith(f"{target}.") for m in modules) and hasattr(encoder, "weights_changed"):
            encoder.weights_changed()  # its files no longer hold its weights: never released and re-read
    return report


def lora_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """rank / alpha / format of a latentloom LoRA file (empty for other files)."""
    _, metadata = read_lora_file(path)
    return {k: json.loads(v) if k in ("rank", "alpha") else v for k, v in metadata.items()}
