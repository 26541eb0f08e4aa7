"""Attention backends agree with each other and with a hand-written softmax reference."""
import importlib.util

import pytest
import torch

from latentloom.unet import UNet, UNetConfig
from latentloom.unet.attention import BACKENDS, attention, check_backend, mask_to_bias

CPU_BACKENDS = ["sdpa", "chunked", "math"]


def reference(q, k, v, heads, keep=None):
    """Per-head loop, float64: independent of every backend."""
    B, N, C = q.shape
    d = C // heads
    out = torch.empty(B, N, C, dtype=torch.float64)
    for b in range(B):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            s = q[b, :, sl].double() @ k[b, :, sl].double().T / d**0.5
            if keep is not None:
                s = s.masked_fill(~keep[b][None, :], -10000.0)
            out[b, :, sl] = s.softmax(-1) @ v[b, :, sl].double()
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_backends_match_reference(backend, masked):
    g = torch.Generator().manual_seed(0)
    B, N, L, heads, C = 2, 37, 9, 3, 24
    q, k, v = (torch.randn(B, n, C, generator=g) for n in (N, L, L))
    keep = torch.rand(B, L, generator=g) > 0.4
    keep[:, 0] = True
    bias = mask_to_bias(keep, dtype=q.dtype) if masked else None
    # query_chunk=8 makes the chunked backend actually split 37 queries (5 chunks).
    out = attention(q, k, v, heads=heads, bias=bias, backend=backend, query_chunk=8)
    assert out.shape == (B, N, C) and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), reference(q, k, v, heads, keep if masked else None),
                               atol=2e-6, rtol=1e-5)


def test_fully_masked_row_averages_instead_of_nan():
    q, k, v = torch.randn(1, 4, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    bias = mask_to_bias(torch.zeros(1, 3, dtype=torch.bool), dtype=q.dtype)
    for backend in CPU_BACKENDS:
        out = attention(q, k, v, heads=2, bias=bias, backend=backend)
        assert torch.isfinite(out).all(), backend


def test_upcast_computes_in_float32_and_returns_input_dtype():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 16, 32, generator=g).bfloat16() for _ in range(3))
    out = attention(q, k, v, heads=2, upcast=True, backend="sdpa")
    assert out.dtype == torch.bfloat16
    exact = reference(q.float(), k.float(), v.float(), 2)
    torch.testing.assert_close(out.double(), exact, atol=1e-2, rtol=1e-2)


def test_whole_unet_backends_agree():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    x, c = torch.randn(2, 4, 16, 16), torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    outs = {}
    for name in CPU_BACKENDS:
        unet.set_attention_backend(name, query_chunk=50)
        assert unet.attention_backend == name
        with torch.no_grad():
            outs[name] = unet(x, 10, c, context_mask=mask)
    for name in CPU_BACKENDS[1:]:
        torch.testing.assert_close(outs[name], outs["sdpa"], atol=1e-5, rtol=1e-5)


def test_bad_backend_names_are_listed():
    unet = UNet(UNetConfig.tiny())
    with pytest.raises(ValueError, match="accepted: sdpa, xformers, chunked, math"):
        unet.set_attention_backend("flash")
    with pytest.raises(ValueError, match="query_chunk must be an int >= 1"):
        unet.set_attention_backend("chunked", query_chunk=0)
    assert BACKENDS == ("sdpa", "xformers", "chunked", "math")


def test_xformers_is_refused_on_cpu_or_when_missing():
    unet = UNet(UNetConfig.tiny())
    installed = importlib.util.find_spec("xformers") is not None
    match = "runs on CUDA only" if installed else "needs the xformers package"
    with pytest.raises(ValueError, match=match):
        unet.set_attention_backend("xformers")
    assert unet.attention_backend == "sdpa"  # unchanged after the refusal
    with pytest.raises(ValueError, match=match):
        check_backend("xformers", device=torch.device("cpu"))


def test_mask_shape_error():
    with pytest.raises(ValueError, match=r"context_mask must have shape \(B, L\)"):
        mask_to_bias(torch.ones(2, 3, 4), dtype=torch.float32)
