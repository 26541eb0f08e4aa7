"""Cascade: a base stage then the upscaler in one call, carrying the prompt, the seed and the mask."""
import numpy as np
import pytest
import torch
from PIL import Image

import latentloom
from builders import save_sd_folder, tiny_sd_pipeline, tiny_upscale_pipeline
from latentloom.pipelines.cascade import Cascade


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = save_sd_folder(tiny_sd_pipeline(), tmp_path_factory.mktemp("sd"))
    return latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def base9(tmp_path_factory):
    folder = save_sd_folder(tiny_sd_pipeline(in_channels=9), tmp_path_factory.mktemp("sd9"))
    return latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    folder = save_sd_folder(tiny_upscale_pipeline(), tmp_path_factory.mktemp("up"))
    return latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)


STAGE = dict(num_inference_steps=3, guidance_scale=4.0)


def picture(h=16, w=16, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_text_to_image_cascade_equals_the_two_stages_run_by_hand(base, upscaler):
    cascade = Cascade(base, upscaler)
    out = cascade(["a red circle", "a star"], seed=4, height=16, width=16, num_images_per_prompt=2,
                  negative_prompt="blurry", noise_level=30, base_kwargs=STAGE, upscale_kwargs=STAGE,
                  output_type="np", progress=False)
    assert out.images.shape == (4, 16, 16, 3)
    low = base(["a red circle", "a star"], seed=4, height=8, width=8, num_images_per_prompt=2,
               negative_prompt="blurry", output_type="np", progress=False, **STAGE)
    high = upscaler.upscale(["a red circle", "a red circle", "a star", "a star"], image=low.images, seed=4,
                            negative_prompt="blurry", noise_level=30, output_type="np", progress=False, **STAGE)
    np.testing.assert_allclose(out.images, high.images, atol=1e-6)
    recipe = out.recipes[3]
    assert recipe["task"] == "cascade" and recipe["prompt"] == "a star" and recipe["seed"] == 7
    assert recipe["base"]["task"] == "txt2img" and recipe["base"]["seed"] == 7 and recipe["noise_level"] == 30


@pytest.mark.parametrize("which", ["base", "base9"])
def test_inpaint_cascade_keeps_the_unmasked_pixels_at_full_resolution(which, upscaler, request):
    cascade = Cascade(request.getfixturevalue(which), upscaler)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 2:10] = 255
    image = picture(seed=1)
    out = cascade("a red circle", image=image, mask_image=Image.fromarray(mask), seed=0, base_kwargs=STAGE,
                  upscale_kwargs=STAGE, progress=False)
    got, original, keep = np.asarray(out.images[0]), np.asarray(image), mask == 0
    assert got.shape == (16, 16, 3)
    assert np.array_equal(got[keep], original[keep])
    assert not np.array_equal(got[~keep], original[~keep])
    assert out.recipes[0]["base"]["task"] == "inpaint" and out.recipes[0]["paste_back"] is True


def test_img2img_cascade_uses_the_downscaled_image(base, upscaler):
    out = Cascade(base, upscaler)("a star", image=picture(seed=2), strength=0.5, seed=1, base_kwargs=STAGE,
                                  upscale_kwargs=STAGE, output_type="np", progress=False)
    assert out.images.shape == (1, 16, 16, 3)
    assert out.recipes[0]["base"]["task"] == "img2img" and out.recipes[0]["base"]["strength"] == 0.5
    assert (out.recipes[0]["base"]["height"], out.recipes[0]["height"]) == (8, 16)


def test_cascade_errors(base, upscaler):
    with pytest.raises(ValueError, match="is not an upscaler model"):
        Cascade(base, base)
    cascade = Cascade(base, upscaler)
    with pytest.raises(ValueError, match="mask_image needs the image"):
        cascade("x", mask_image=np.zeros((16, 16)))
    with pytest.raises(ValueError, match="leave height and width out"):
        cascade("x", image=picture(), height=16)
    with pytest.raises(ValueError, match="height must be a multiple of 2"):
        cascade("x", height=15, width=16)
    with pytest.raises(ValueError, match="height 18 must be a multiple of 4 .the upscale factor 2 times"):
        cascade("x", height=18, width=16)
    with pytest.raises(ValueError, match=r"base_kwargs must not set \['seed'\]"):
        cascade("x", base_kwargs={"seed": 3})
    with pytest.raises(ValueError, match="upscale_kwargs must not set"):
        cascade("x", upscale_kwargs={"image": picture()})
    with pytest.raises(ValueError, match="use output_type 'pil' or 'np'"):
        cascade("x", output_type="latent")

