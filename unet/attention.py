"""Scaled dot-product attention behind one function, with interchangeable backends.

``attention(q, k, v, heads=..., bias=..., backend=...)`` takes token-major projections
(B, N, heads * d) and returns the same layout, so callers never permute. Backends:

- ``"sdpa"``    PyTorch ``scaled_dot_product_attention`` (flash / memory-efficient kernels).
- ``"xformers"`` ``xformers.ops.memory_efficient_attention`` (CUDA only, when installed).
- ``"chunked"`` SDPA over query chunks: peak memory grows with the chunk, not with N.
- ``"math"``    softmax(q k^T / sqrt(d) + bias) v written out in float32: the reference.

All four agree to float rounding (tests/test_unet_attention.py).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "xformers", "chunked", "math")
DEFAULT_QUERY_CHUNK = 1024
# Added to the scores of padding tokens. Finite (as diffusers does) so that a row whose
# tokens are all padding averages them instead of producing NaN.
MASK_BIAS = -10000.0


def check_backend(name: str, *, device: torch.device | None = None) -> str:
    """Validate a backend name (and, for xformers, that it can run) before it is used."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; accepted: {', '.join(BACKENDS)}")
    if name == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ValueError("attention backend 'xformers' needs the xformers package "
                             "(pip install latentloom[xformers]); use 'sdpa' otherwise")
        if device is not None and device.type != "cuda":
            raise ValueError(f"attention backend 'xformers' runs on CUDA only, the model is on "
                             f"{device}; use 'sdpa' or 'chunked'")
    return name


def mask_to_bias(mask: torch.Tensor | None, *, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, L) padding mask, 1/True = real token -> (B, 1, 1, L) additive bias, or None."""
    if mask is None:
        return None
    if mask.ndim != 2:
        raise ValueError(f"context_mask must have shape (B, L), got {tuple(mask.shape)}")
    keep = mask.bool() if mask.dtype == torch.bool else mask != 0
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    bias.masked_fill_(~keep, MASK_BIAS)
    return bias[:, None, None, :]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    heads: int,
    bias: torch.Tensor | None = None,
    backend: str = "sdpa",
    upcast: bool = False,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
) -> torch.Tensor:
    """Multi-head attention. q (B, N, h*d), k/v (B, L, h*d), bias (B, 1, 1, L) -> (B, N, h*d)."""
    B, N, C = q.shape
    L = k.shape[1]
    d = C // heads
    out_dtype = q.dtype
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        # SD 2.x overflows in fp16 attention scores; the reference recipe upcasts them.
        q, k, v = q.float(), k.float(), v.float()
    if bias is not None:
        bias = bias.to(q.dtype)
    if backend == "xformers":
        import xformers.ops as xops

        # xformers wants (B, N, h, d) and a bias materialised to (B, h, N, L) whose
        # rows start on 8-element boundaries: allocate padded, use the first L columns.
        xb = None
        if bias is not None:
            xb = bias.new_zeros(B, heads, N, (L + 7) // 8 * 8)[..., :L]
            xb.copy_(bias.expand(B, heads, N, L))
        out = xops.memory_efficient_attention(
            q.view(B, N, heads, d), k.view(B, L, heads, d), v.view(B, L, heads, d), attn_bias=xb
        )
        return out.reshape(B, N, C).to(out_dtype)
    # (B, h, N, d) made contiguous: PyTorch's CPU flash kernel runs ~15-20% faster on
    # dense heads than on the strided views (benchmarks/unet.py), and the copies are small.
    qh = q.view(B, N, heads, d).transpose(1, 2).contiguous()
    kh = k.view(B, L, heads, d).transpose(1, 2).contiguous()  # (B, h, L, d)
    vh = v.view(B, L, heads, d).transpose(1, 2).contiguous()
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias)  # (B, h, N, d)
    elif backend == "chunked":
        out = _chunked(qh, kh, vh, bias, query_chunk)
    elif backend == "math":
        out = _math(qh, kh, vh, bias)
    else:
        check_backend(backend)
        raise AssertionError("unreachable")
    return out.transpose(1, 2).reshape(B, N, C).to(out_dtype)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, h, N, L)
    if bias is not None:
        scores = scores + bias.float()
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


def _chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
             chunk: int) -> torch.Tensor:
    if chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {chunk}")
    N = q.shape[2]
    if N <= chunk:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = q.new_empty(q.shape)  # (B, h, N, d)
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        out[:, :, start:stop] = F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=bias)
    return out
