"""The fast path chosen by default: dtype per device, channels_last, optional torch.compile.

bf16 pays only where the CPU does it in hardware: with AMX a 4096^2 GEMM runs ~6x its fp32 speed,
with AVX512-BF16 ~2x (an SD-1.5-sized UNet ~1.7x end to end with channels_last; `latentloom bench
unet`), while AVX2-only CPUs emulate it ~5x slower than fp32 and keep fp32 (DESIGN.md, "Facts
measured on these machines"). The bundled model's images in bf16 stay >= 35 dB PSNR from fp32
(tests/test_fast_defaults.py).
"""
from __future__ import annotations

import functools
import platform
import warnings
from typing import Any

import torch

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_supports_fast_bf16() -> bool:
    """True where the CPU does bf16 matrix math in hardware (x86 AVX512-BF16 or AMX).

    Read from /proc/cpuinfo: torch's own capability string says AVX512 on CPUs that
    would only emulate bf16, which is slower than fp32 there.
    """
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in _CPU_BF16_FLAGS)
    except OSError:
        return False
    return False


def physical_memory_bytes() -> int:
    """This machine's RAM (0 where the OS does not say)."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return 0


def fast_dtype(device: torch.device | str) -> torch.dtype:
    """The default weights dtype for `device`: fp16 on CUDA (SD's published dtype; the VAE
    is kept in fp32 where it would overflow, see `vae_dtype`), bf16 on CPUs with native bf16,
    fp32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_supports_fast_bf16():
        return torch.bfloat16
    return torch.float32


def vae_dtype(vae: Any, dtype: torch.dtype) -> torch.dtype:
    """fp16 decodes of Stable Diffusion's VAE overflow into black images; diffusers marks such
    VAEs with `force_upcast`. bf16 has fp32's range, so only fp16 is upcast."""
    if dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False)):
        return torch.float32
    return dtype


def optimize(pipe: Any, *, channels_last: bool = True, compile: bool = False) -> Any:
    """Apply latentloom's fast defaults to a pipeline that already sits on its device and dtype.

    channels_last: the UNet's and VAE's convolutions run in NHWC (faster with oneDNN on CPU and
    with cuDNN tensor cores; an SD VAE decode at 512 px in bf16 on one CPU core: 15.2 s vs 17.9 s).
    compile: `torch.compile` the UNet (see `compile_unet`).
    """
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        for attached in getattr(pipe, "controlnets", []):
            attached.model.to(memory_format=torch.channels_last)
    if compile:
        compile_unet(pipe)
    return pipe


def compile_unet(pipe: Any, *, mode: str | None = None) -> Any:
    """Compile the UNet in place with inductor (its parameters and state_dict stay as they are).

    On CPU the weights are frozen into the compiled graph (inductor's `freezing`: constant
    folding and pre-packed oneDNN weights), which is why LoRAs must be merged before this
    call: `Pipeline.load_lora` refuses afterwards. The first call compiles (minutes on a small
    CPU); later calls with the same shapes reuse it.
    """
    modes = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if mode not in modes:
        raise ValueError(f"compile mode {mode!r} is not one of {modes}")
    if getattr(pipe, "compiled", False):
        warnings.warn("the UNet is already compiled; compile_unet did nothing", RuntimeWarning, stacklevel=2)
        return pipe
    options = {"freezing": True} if pipe.device.type == "cpu" else None
    pipe.unet.compile(mode=mode, options=options) if options else pipe.unet.compile(mode=mode)
    pipe.compiled = True
    return pipe
