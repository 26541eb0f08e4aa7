"""Per-model defaults for a pipeline call, and the choice of device and dtype."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CallDefaults:
    """What a call uses when the caller leaves an argument out."""

    height: int = 512
    width: int = 512
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    sampler: str = "dpmpp_2m"


def default_device() -> torch.device:
    """CUDA when present, else CPU. Chosen once at load time, never hard-coded in the math."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """`None` -> float16 on CUDA, float32 elsewhere; strings like "bf16" accepted."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        allowed = (torch.float32, torch.float16, torch.bfloat16)
        if dtype not in allowed:
            raise ValueError(f"dtype {dtype} is not supported; use one of {allowed}")
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(names)}")
    return names[dtype]
