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
    clip_guidance_scale: float = 0.0  # models that bring an image-text model may turn it on


# diffusers' StableDiffusionXLPipeline calls with guidance 5 (SDXL over-saturates at SD's 7.5)
SDXL_GUIDANCE_SCALE = 5.0


# diffusers' LatentConsistencyModelPipeline: 4 consistency steps, w = 8.5 into the guidance embedding
LCM_DISTILLED_DEFAULTS = dict(num_inference_steps=4, guidance_scale=8.5, sampler="lcm")


def call_defaults(side: int, *, sdxl: bool = False, guidance_embedded: bool = False) -> CallDefaults:
    """A Stable Diffusion model's defaults at its native `side`; SDXL guides at diffusers' 5.0; an
    LCM-distilled UNet (one with a guidance embedding) samples as diffusers' LCM pipeline does."""
    extra = dict(LCM_DISTILLED_DEFAULTS) if guidance_embedded else {}
    if sdxl and not guidance_embedded:
        extra["guidance_scale"] = SDXL_GUIDANCE_SCALE
    return CallDefaults(height=side, width=side, **extra)


def default_device() -> torch.device:
    """CUDA when present, else CPU. Chosen once at load time, never hard-coded in the math."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """`None` -> `default_device()`; a name or device that this machine can use, else ValueError
    (torch raises RuntimeError for unknown names and AssertionError for CUDA without CUDA)."""
    if device is None:
        return default_device()
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        device = torch.device(device)
        torch.empty(0, device=device)  # the cheapest real use: is the backend there?
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"device {str(device)!r} cannot be used on this machine: {err}") from None
    return device


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """`None` -> the fast default of the device (`runtime.fast_dtype`: fp16 on CUDA, bf16 on CPUs
    with native bf16, else fp32); strings like "bf16" accepted."""
    if dtype is None:
        from latentloom.pipelines.runtime import fast_dtype

        return fast_dtype(device)
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
