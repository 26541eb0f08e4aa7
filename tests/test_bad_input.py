"""Bad input to the pipelines and the CLI: every documented error is raised before any work, with a
message naming the value; odd but valid input (empty, 10,000-character and any-Unicode prompts, the
smallest size, all-zero and all-one masks, RGBA) gives valid images. Complements the per-pipeline
error tests in test_pipeline_txt2img.py, test_img2img.py and test_inpaint.py."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import latentloom
from builders import save_sd_folder
from latentloom.cli import main as cli_main

CALL = dict(num_inference_steps=2, guidance_scale=4.0, height=16, width=16, progress=False, output_type="np")
EDIT = dict(num_inference_steps=2, guidance_scale=4.0, progress=False, output_type="np")


def picture(seed=0, size=16):
    return np.random.default_rng(seed).random((size, size, 3)).astype(np.float32)


def _valid(images, count=1, size=16):
    assert images.shape == (count, size, size, 3)
    assert np.isfinite(images).all() and 0 <= images.min() and images.max() <= 1


# ---------------------------------------------------------------- text to image
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prompt=b"a red circle"), TypeError, "str or a list of str"),
    (dict(prompt="bad \ud800 text"), ValueError, "prompt is not valid Unicode"),
    (dict(prompt=["fine", "bad \udfff"]), ValueError, "prompt is not valid Unicode"),
    (dict(negative_prompt="\ud83d"), ValueError, "negative_prompt is not valid Unicode"),
    (dict(prompt="(a:" + "9" * 400 + ")"), ValueError, "prompt weight inf"),
    (dict(prompt="(" * 8000 + "a" + ")" * 8000), ValueError, "prompt weight inf"),
    (dict(negative_prompt=3), TypeError, "negative_prompt must be a str"),
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), ValueError, "3 negative prompts for 2 prompts"),
    (dict(height="16"), TypeError, "height must be an int"),
    (dict(width=True), TypeError, "width must be an int"),
    (dict(height=8, width=10**9), ValueError, "larger than"),
    (dict(height=2**40, width=2**40), ValueError, "larger than"),
    (dict(width=-2), ValueError, "width must be >= 1"),
    (dict(num_inference_steps=2.0), TypeError, "num_inference_steps must be an int"),
    (dict(num_inference_steps=-1), ValueError, "num_inference_steps"),
    (dict(guidance_scale=math.inf), ValueError, "guidance_scale must be a finite number"),
    (dict(guidance_scale=-math.inf), ValueError, "guidance_scale must be a finite number"),
    (dict(guidance_scale="4"), TypeError, "guidance_scale must be a number"),
    (dict(guidance_scale=torch.tensor(4.0)), TypeError, "guidance_scale must be a number"),
    (dict(guidance_rescale=math.nan), ValueError, "guidance_rescale"),
    (dict(clip_guidance_scale=math.nan), ValueError, "clip_guidance_scale"),
    (dict(clip_guidance_scale=1.0), ValueError, "needs an image-text model"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(seed=2**64), ValueError, "seed must be in"),
    (dict(seed=True), TypeError, "seed must be an int"),
    (dict(sampler=3), ValueError, "unknown sampler"),
    (dict(sampler="DDIM "), ValueError, "unknown sampler"),
    (dict(output_type=None), ValueError, "output_type"),
    (dict(karras_sigmas="no"), TypeError, "karras_sigmas must be True or False"),
    (dict(callback=5), TypeError, "callback must be callable"),
    (dict(num_images_per_prompt=65), ValueError, "num_images_per_prompt"),
    (dict(num_images_per_prompt=2.0), TypeError, "num_images_per_prompt must be an int"),
    (dict(prompt=["a", "b"], num_images_per_prompt=2, generator=[torch.Generator()] * 2), ValueError,
     "2 generators for 4 images"),
    (dict(generator=[torch.Generator(), None]), TypeError, "torch.Generator"),
])
def test_txt2img_errors(pipe, kwargs, error, match):
    kwargs = {**CALL, "prompt": "a red circle", **kwargs}
    prompt = kwargs.pop("prompt")
    with pytest.raises(error, match=match):
        pipe(prompt, **kwargs)


def test_errors_come_before_any_model_call(pipe):
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        for bad in (dict(height=15), dict(guidance_scale=math.nan), dict(callback="x"), dict(karras_sigmas=1)):
            with pytest.raises((ValueError, TypeError)):
                pipe("a red circle", **{**CALL, **bad})
    finally:
        handle.remove()
    assert calls == []


def test_odd_but_valid_prompts_give_images(pipe, tmp_path):
    prompts = [
        "",  # empty
        "x" * 10_000,  # 10,000 characters: many windows, nothing silently cut
        "un cercle rouge \u2600 \u65e5\u672c\u8a9e \U0001f534\U0001f7e6 \u05e2\u05d1\u05e8\u05d9\u05ea",  # emoji, CJK, RTL
        "e\u0301 zero\u200bwidth \u202eright-to-left\u202c",  # combining mark, zero-width space, bidi override
        "tab\tnew\nline nul\x00 bell\x07",  # control characters
        "((((unbalanced:1.5) [brackets] \\(escaped\\) (a:nan) (b:inf) (c:-2)",  # weighting syntax gone wrong
    ]
    with pytest.warns(UserWarning, match="unbalanced brackets"):  # the last prompt: documented, not an error
        out = pipe(prompts, seed=1, **{**CALL, "guidance_scale": 1.0, "output_type": "pil"})
    arrays = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in out.images])
    _valid(arrays, count=len(prompts))
    paths = out.save(tmp_path / "odd.png")
    for path, prompt in zip(paths, prompts):
        assert latentloom.read_metadata(path)["prompt"] == prompt  # the exact text, recorded and read back


def test_smallest_size_and_one_step(pipe):
    factor = pipe.vae_scale_factor
    _valid(pipe("a red circle", seed=0, **{**CALL, "height": factor, "width": factor,
                                          "num_inference_steps": 1}).images, size=factor)


# ---------------------------------------------------------------- image to image
@pytest.mark.parametrize("image, error, match", [
    (np.full((16, 16, 3), np.nan, np.float32), ValueError, "finite"),
    (np.where(np.eye(16)[..., None] > 0, np.inf, 0.5).repeat(3, axis=-1).astype(np.float32), ValueError, "finite"),
    (np.full((16, 16, 3), 1000, np.uint16), ValueError, "integer pixels must be in 0-255"),
    (np.full((16, 16, 3), -1, np.int32), ValueError, "integer pixels must be in 0-255"),
    (Image.new("RGB", (0, 0)), ValueError, "image is 0x0"),
    (np.zeros((8192, 8192, 3), np.uint8), ValueError, "larger than"),
    (None, TypeError, "image must be a PIL image"),
    ([], ValueError, "empty list"),
    (np.zeros((16, 16, 5), np.uint8), ValueError, "numpy image must be"),
])
def test_img2img_bad_images(pipe, image, error, match):
    with pytest.raises(error, match=match):
        pipe.img2img("a red circle", image=image, **EDIT)


@pytest.mark.parametrize("strength, error", [("0.5", TypeError), (math.inf, ValueError), (None, TypeError)])
def test_img2img_bad_strength(pipe, strength, error):
    with pytest.raises(error, match="strength"):
        pipe.img2img("a red circle", image=picture(), strength=strength, **EDIT)


def test_img2img_accepts_rgba_16bit_and_small_uint16(pipe):
    rgba = Image.fromarray((picture() * 255).astype(np.uint8)).convert("RGBA")
    _valid(pipe.img2img("a red circle", image=rgba, seed=0, **EDIT).images)
    small = (picture() * 255).astype(np.uint16)  # uint16 holding 0-255 values
    _valid(pipe.img2img("a red circle", image=small, seed=0, **EDIT).images)


# ---------------------------------------------------------------- inpainting
@pytest.mark.parametrize("mask, error, match", [
    (np.full((16, 16), np.nan, np.float32), ValueError, "finite"),
    (np.full((16, 16), np.inf, np.float32), ValueError, "finite"),
    (np.full((16, 16), 300, np.uint16), ValueError, "0-1 or 0-255"),
    (np.zeros((16, 8)), ValueError, "mask_image is 8x16 but image is 16x16"),
    (None, TypeError, "mask_image must be"),
])
def test_inpaint_bad_masks(pipe, mask, error, match):
    with pytest.raises(error, match=match):
        pipe.inpaint("a red circle", image=picture(), mask_image=mask, **EDIT)


def test_inpaint_all_zero_mask_keeps_the_image_and_all_one_repaints_it(pipe):
    image = picture()
    expected = (image * 255).round() / 255  # the 8-bit pixels the pipeline works from
    kept = pipe.inpaint("a red circle", image=image, mask_image=np.zeros((16, 16), np.float32), seed=0,
                        **EDIT).images
    _valid(kept)
    np.testing.assert_allclose(kept[0], image, atol=1 / 255)
    repainted = pipe.inpaint("a red circle", image=image, mask_image=np.ones((16, 16), np.float32), seed=0,
                             **EDIT).images
    _valid(repainted)
    assert np.abs(repainted[0] - expected).mean() > 0.02
    rgba = Image.new("RGBA", (16, 16), (255, 255, 255, 255))
    _valid(pipe.inpaint("a red circle", image=image, mask_image=rgba, seed=0, **EDIT).images)


# ---------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def hostile_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "pointer.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    (root / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    torch.save({"state_dict": {}}, root / "model.ckpt")
    (root / "folder.png").mkdir()
    return root


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "num_inference_steps must be"),
    (["--height", "-8"], "height must be >= 1"),
    (["--height", "100000", "--width", "100000"], "larger than"),
    (["--guidance", "nan"], "guidance_scale must be a finite number"),
    (["--seed", "-1"], "seed must be in"),
    (["--clip-guidance", "1"], "image-text model"),
    (["--model", "{root}/pointer.safetensors"], "git-lfs pointer"),
    (["--model", "{root}/cut.safetensors"], "cut.safetensors is not a readable .safetensors"),
    (["--model", "{root}/model.ckpt"], "allow_pickle"),
    (["--model", "{root}/missing"], "no model at"),
    (["-o", "{root}/out.jpg"], "ending in .png"),
    (["-o", "{root}/folder.png"], "is a folder"),
])
def test_cli_generate_errors_exit_2(folder, hostile_models, capsys, argv, message):
    argv = [a.replace("{root}", str(hostile_models)) for a in argv]
    base = ["generate", "a red circle", "--model", str(folder), "--steps", "2", "--height", "16", "--width", "16",
            "--no-progress", "-o", str(hostile_models / "out.png")]
    assert cli_main(base + argv) == 2
    err = capsys.readouterr().err
    assert "latentloom: error:" in err and message in err, err


def test_cli_edit_errors_exit_2(folder, tmp_path, capsys):
    source, small_mask, text = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "notes.png"
    Image.fromarray((picture() * 255).astype(np.uint8)).save(source)
    Image.new("L", (8, 8), 255).save(small_mask)
    text.write_text("not an image")
    common = ["--model", str(folder), "--steps", "2", "--no-progress", "-o", str(tmp_path / "out.png")]
    cases = [
        (["img2img", "x", "--image", str(text)], "not an image"),
        (["img2img", "x", "--image", str(source), "--strength", "nan"], "strength"),
        (["inpaint", "x", "--image", str(source), "--mask", str(small_mask)], "mask_image is 8x8 but image is 16x16"),
        (["inpaint", "x", "--image", str(source), "--mask", str(tmp_path / "none.png")], "no such mask"),
        (["upscale", "x", "--image", str(source)], "upscale"),
    ]
    for argv, message in cases:
        assert cli_main(argv + common) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)


def test_unusable_devices_are_clear_errors(folder, capsys):
    missing = "cuda" if not torch.cuda.is_available() else "cuda:999"
    for device in ("tpu", missing, "cpu:x"):
        with pytest.raises(ValueError, match="cannot be used on this machine"):
            latentloom.load_pipeline(folder, device=device)
    with pytest.raises(TypeError, match="device must be"):
        latentloom.load_pipeline(folder, device=3.5)
    assert cli_main(["generate", "x", "--model", str(folder), "--device", "tpu", "--no-progress"]) == 2
    assert "device 'tpu' cannot be used" in capsys.readouterr().err


# ---------------------------------------------------------------- upscaling
@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    from builders import tiny_upscale_pipeline

    folder = save_sd_folder(tiny_upscale_pipeline(), tmp_path_factory.mktemp("x2"))
    return latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(image=np.full((8, 8, 3), np.nan, np.float32)), ValueError, "finite"),
    (dict(image=np.zeros((4096, 4096, 3), np.uint8)), ValueError, "larger than"),
    (dict(image=[picture(0, 8)] * 3, prompt=["a", "b"]), ValueError, "3 images in image for 2 prompts"),
    (dict(noise_level=20.5), TypeError, "noise_level must be an int"),
    (dict(noise_level=-1), ValueError, "noise_level must be in"),
    (dict(image=None), TypeError, "image must be"),
])
def test_upscale_errors(upscaler, kwargs, error, match):
    kwargs = {"prompt": "a red circle", "image": picture(0, 8), **kwargs}
    prompt = kwargs.pop("prompt")
    with pytest.raises(error, match=match):
        upscaler.upscale(prompt, **kwargs, **EDIT)


def test_upscale_smallest_image(upscaler):
    out = upscaler.upscale("a red circle", image=picture(0, 1), seed=0, **EDIT).images
    _valid(out, size=upscaler.vae_scale_factor)
