"""The fast defaults (dtype per device, channels_last, compile switch) and what they cost in quality.

The quality check runs the bundled model's full default call (64 px, 20 steps, CFG) in fp32 and on
the fast path and requires every image to stay >= 35 dB PSNR from fp32, so a speed change can never
silently cost quality. On CPUs without native bf16 the fast path is fp32 (checked separately), and
the bf16 comparison is forced so that it runs on every machine.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from latentloom.pipelines import runtime
from latentloom.pipelines.defaults import resolve_dtype
from latentloom.pipelines.loading import load_pipeline

PROMPTS = [
    "a red circle on the left",
    "a small blue square at the top of a white background",
    "a large yellow star in the center",
    "green triangle, right side, on black",
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two images in [0, 1], in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pipe = load_pipeline(device="cpu", dtype="fp32", channels_last=False)
    return pipe(PROMPTS, seed=0, progress=False, output_type="np").images


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_fast_path_stays_within_35_db_of_fp32(reference, dtype):
    pipe = load_pipeline(device="cpu", dtype=dtype)  # None: this machine's default
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    images = pipe(PROMPTS, seed=0, progress=False, output_type="np").images
    scores = [psnr(r, x) for r, x in zip(reference, images)]
    assert min(scores) >= 35.0, f"{pipe.dtype} + channels_last vs fp32, PSNR per image: {scores}"


def test_fast_dtype_follows_the_device(monkeypatch):
    assert runtime.fast_dtype("cuda") == torch.float16
    monkeypatch.setattr(runtime, "cpu_supports_fast_bf16", lambda: True)
    assert runtime.fast_dtype("cpu") == torch.bfloat16
    assert resolve_dtype(None, torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_supports_fast_bf16", lambda: False)
    assert runtime.fast_dtype("cpu") == torch.float32  # emulated bf16 is slower than fp32
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # an explicit choice always wins


def test_cpu_bf16_detection_reads_the_cpu_flags():
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    assert runtime.cpu_supports_fast_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_fp16_keeps_an_upcast_vae_in_fp32():
    pipe = load_pipeline(device="cpu", dtype="fp16", channels_last=False)
    assert next(pipe.unet.parameters()).dtype == torch.float16
    force = bool(getattr(pipe.vae.config, "force_upcast", False))
    assert next(pipe.vae.parameters()).dtype == (torch.float32 if force else torch.float16)
    pipe.vae.config.force_upcast = False
    pipe.to(dtype="fp16")
    assert next(pipe.vae.parameters()).dtype == torch.float16


def test_channels_last_can_be_turned_off():
    pipe = load_pipeline(device="cpu", dtype="fp32", channels_last=False)
    assert pipe.unet.conv_in.weight.is_contiguous()
    assert not pipe.compiled


def test_compile_switch_and_its_guards(monkeypatch):
    pipe = load_pipeline(device="cpu", dtype="fp32", channels_last=False)
    calls = []
    # nn.Module.compile only records the wrapper; the real compilation happens at the first call,
    # which takes minutes on CPU: check the switch's arguments here, the speed in `latentloom bench`
    monkeypatch.setattr(type(pipe.unet), "compile", lambda self, **kw: calls.append(kw), raising=False)
    with pytest.raises(ValueError, match="compile mode 'fastest' is not one of"):
        pipe.compile(mode="fastest")
    pipe.compile()
    assert calls == [{"mode": None, "options": {"freezing": True}}] and pipe.compiled
    with pytest.warns(RuntimeWarning, match="already compiled"):
        pipe.compile()
    with pytest.raises(RuntimeError, match="load LoRAs before compile"):
        pipe.load_lora("any.safetensors")
