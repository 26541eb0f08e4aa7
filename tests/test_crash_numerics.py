"""Low-precision overflow: a UNet or VAE that produces inf in bfloat16 / float16 is redone in float32
with a warning; the image is never silently black. A float32 overflow is an error, not an image."""
import math

import numpy as np
import pytest
import torch

import latentloom

CALL = dict(num_inference_steps=3, guidance_scale=4.0, height=16, width=16, progress=False, output_type="np")


@pytest.fixture(scope="module")
def reference(folder):
    return latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)


def _inf_when_low_precision(module, args, output):
    """Forward hook: what an fp16 overflow looks like; float32 forwards pass untouched."""
    sample = output if torch.is_tensor(output) else output[0]
    if sample.dtype in (torch.float16, torch.bfloat16):
        poisoned = torch.full_like(sample, math.inf)
        return poisoned if torch.is_tensor(output) else (poisoned, *output[1:])
    return None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unet_overflow_in_low_precision_is_redone_in_float32(folder, reference, dtype):
    pipe = latentloom.load_pipeline(folder, device="cpu", dtype=dtype)
    handle = pipe.unet.register_forward_hook(_inf_when_low_precision)
    try:
        with pytest.warns(RuntimeWarning, match="overflowed"):
            images = pipe("a red circle", seed=4, **CALL).images
    finally:
        handle.remove()
    assert np.isfinite(images).all()
    assert images.std() > 0.01  # not a flat (black) image
    assert next(pipe.unet.parameters()).dtype == dtype  # the pipeline's own UNet is left as it was
    expected = reference("a red circle", seed=4, **CALL).images
    # the same image up to the low-precision text encoder and weight rounding
    np.testing.assert_allclose(images, expected, atol=0.1)


def test_without_overflow_low_precision_gives_no_warning(folder, recwarn):
    pipe = latentloom.load_pipeline(folder, device="cpu", dtype=torch.bfloat16)
    images = pipe("a red circle", seed=4, **CALL).images
    assert np.isfinite(images).all()
    assert not [w for w in recwarn if "overflowed" in str(w.message)]


def test_vae_overflow_in_low_precision_is_redone_in_float32(folder):
    pipe = latentloom.load_pipeline(folder, device="cpu", dtype=torch.bfloat16)
    handle = pipe.vae.decoder.register_forward_hook(_inf_when_low_precision)
    try:
        with pytest.warns(RuntimeWarning, match="decoding again in float32"):
            images = pipe("a red circle", seed=4, **CALL).images
    finally:
        handle.remove()
    assert np.isfinite(images).all() and images.std() > 0.01
    assert pipe.vae.dtype == torch.bfloat16


def test_float32_overflow_is_an_error_not_a_black_image(reference):
    pipe = reference
    handle = pipe.unet.register_forward_hook(lambda m, a, out: torch.full_like(out, math.nan))
    try:
        for output_type in ("np", "latent"):
            with pytest.raises(FloatingPointError, match="non-finite"):
                pipe("a red circle", seed=4, **{**CALL, "output_type": output_type})
    finally:
        handle.remove()
