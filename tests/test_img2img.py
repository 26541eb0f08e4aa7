"""img2img: parity with diffusers' StableDiffusionImg2ImgPipeline, input forms, determinism, recipes,
the CLI, and every documented error."""
import numpy as np
import pytest
import torch
from PIL import Image

import latentloom
from builders import save_sd_folder, tiny_sd_pipeline, use_scheduler
from latentloom.cli import main as cli_main
from latentloom.pipelines.metadata import read_metadata


def picture(h=32, w=32, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def make(pipe, prompt="a red circle", **kwargs):
    args = dict(image=picture(16, 16), strength=0.75, num_inference_steps=4, guidance_scale=4.0, progress=False,
                output_type="np")
    args.update(kwargs)
    return pipe.img2img(prompt, **args)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "heun", "dpmpp_2m", "unipc"])
def test_same_images_as_diffusers(reference, ours, sampler):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = use_scheduler(StableDiffusionImg2ImgPipeline(**reference[0].components), sampler)
    args = dict(prompt=["a red circle", "blue"], negative_prompt=["", "blurry"], num_inference_steps=5,
                guidance_scale=5.0, strength=0.6)
    expected = ref(image=picture(), generator=torch.Generator().manual_seed(3), output_type="np", **args).images
    got = ours.img2img(image=picture(), sampler=sampler, generator=torch.Generator().manual_seed(3),
                       output_type="np", progress=False, **args).images
    assert got.shape == expected.shape == (2, 32, 32, 3)
    diff = float(np.abs(got - expected).max())
    print(f"img2img {sampler} parity vs diffusers: max abs diff {diff:.2e} (mean {float(np.abs(got - expected).mean()):.2e})")
    assert diff <= 1e-4


def test_same_images_as_diffusers_with_generator_list_and_images_per_prompt(reference, ours):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = use_scheduler(StableDiffusionImg2ImgPipeline(**reference[0].components), "dpmpp_2m")
    args = dict(prompt="a star", num_inference_steps=5, guidance_scale=1.0, strength=0.9, num_images_per_prompt=2)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (4, 5)]  # noqa: E731
    expected = ref(image=picture(24, 16), generator=gens(), output_type="np", **args).images
    got = ours.img2img(image=picture(24, 16), sampler="dpmpp_2m", generator=gens(), output_type="np",
                       progress=False, **args).images
    diff = float(np.abs(got - expected).max())
    print(f"img2img parity vs diffusers: max abs diff {diff:.2e} (mean {float(np.abs(got - expected).mean()):.2e})")
    assert diff <= 1e-4


def test_pil_numpy_and_tensor_images_give_the_same_result(ours):
    pil = picture(16, 16, seed=2)
    u8 = np.asarray(pil)
    forms = [pil, u8, u8.astype(np.float32) / 255, torch.from_numpy(u8).permute(2, 0, 1).float() / 255,
             torch.from_numpy(u8).permute(2, 0, 1)[None], [pil]]
    results = [make(ours, image=form, seed=1, num_inference_steps=2, guidance_scale=1.0).images for form in forms]
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], atol=1e-6)


def test_image_in_a_batch_equals_image_made_alone(ours):
    images = [picture(16, 16, seed=1), picture(16, 16, seed=2)]
    batch = make(ours, ["a red circle", "a green star"], image=images, seed=7, num_images_per_prompt=2).images
    assert batch.shape == (4, 16, 16, 3)
    alone = make(ours, "a green star", image=images[1], seed=7 + 3).images
    np.testing.assert_allclose(batch[3], alone[0], atol=1e-5)


def test_strength_moves_the_result_away_from_the_image(ours):
    image = picture(16, 16, seed=3)
    original = np.asarray(image, dtype=np.float32) / 255
    far = [np.abs(make(ours, image=image, strength=s, seed=0, num_inference_steps=5).images[0] - original).mean()
           for s in (0.2, 1.0)]
    assert far[0] < far[1]


def test_recipe_records_the_task_strength_and_input(ours):
    a = make(ours, seed=2, image=picture(16, 16, seed=1)).recipes[0]
    b = make(ours, seed=2, image=picture(16, 16, seed=2)).recipes[0]
    assert a["task"] == "img2img" and a["strength"] == 0.75 and a["seed"] == 2
    assert (a["height"], a["width"]) == (16, 16)
    assert len(a["image_hash"]) == 10 and a["image_hash"] != b["image_hash"]


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan")])
def test_strength_outside_0_1_is_refused(ours, strength):
    with pytest.raises(ValueError, match="strength"):
        make(ours, strength=strength)


def test_strength_that_leaves_no_step_is_refused(ours):
    with pytest.raises(ValueError, match="no denoising step"):
        make(ours, strength=0.2, num_inference_steps=4)


def test_image_size_must_suit_the_vae(ours):
    with pytest.raises(ValueError, match="image is 15x16.*multiple of 2"):
        make(ours, image=picture(16, 15))


def test_bad_images_are_refused(ours):
    with pytest.raises(ValueError, match="2 images in image for 3 prompts"):
        make(ours, ["a", "b", "c"], image=[picture(16, 16), picture(16, 16)])
    with pytest.raises(ValueError, match="different sizes"):
        make(ours, image=[picture(16, 16), picture(8, 8)])
    with pytest.raises(ValueError, match=r"float pixels must be in \[0, 1\]"):
        make(ours, image=np.full((16, 16, 3), -0.5, np.float32))
    with pytest.raises(TypeError, match="PIL image, a numpy array"):
        make(ours, image="picture.png")
    with pytest.raises(ValueError, match=r"\(3, H, W\) or \(B, 3, H, W\)"):
        make(ours, image=torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="integer pixels must be in 0-255"):
        make(ours, image=np.full((16, 16, 3), 300, np.int32))
    with pytest.raises(ValueError, match=r"\(H, W\), \(H, W, 3\|4\) or \(B, H, W, 3\|4\)"):
        make(ours, image=np.zeros((16, 16, 2), np.uint8))
    with pytest.raises(ValueError, match="image is an empty list"):
        make(ours, image=[])


def test_a_unet_with_other_input_channels_is_refused(tmp_path):
    inpainting = latentloom.load_pipeline(save_sd_folder(tiny_sd_pipeline(in_channels=9), tmp_path), device="cpu")
    with pytest.raises(ValueError, match="img2img needs a UNet with 4 input channels; this model's UNet has 9"):
        make(inpainting)


def test_cli_img2img_writes_pngs_with_the_recipe(reference, tmp_path):
    source = tmp_path / "in.png"
    picture(16, 16).save(source)
    out = tmp_path / "out.png"
    rc = cli_main(["img2img", "a red circle", "--image", str(source), "--strength", "0.5", "--model",
                   str(reference[1]), "--seed", "3", "--steps", "4", "--no-progress", "-o", str(out)])
    assert rc == 0
    recipe = read_metadata(out)
    assert recipe["task"] == "img2img" and recipe["strength"] == 0.5 and recipe["seed"] == 3
    again = make(latentloom.load_pipeline(reference[1], device="cpu"), image=Image.open(source), strength=0.5,
                 seed=3, guidance_scale=recipe["guidance_scale"], sampler=recipe["sampler"], output_type="pil")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(again.images[0]))


def test_cli_img2img_errors_exit_2(reference, tmp_path, capsys):
    assert cli_main(["img2img", "x", "--image", str(tmp_path / "missing.png"), "--model", str(reference[1])]) == 2
    assert "no such image" in capsys.readouterr().err
    source = tmp_path / "in.png"
    picture(16, 16).save(source)
    assert cli_main(["img2img", "x", "--image", str(source), "--strength", "2", "--model", str(reference[1]),
                     "--no-progress", "-o", str(tmp_path / "o.png")]) == 2
    assert "strength must be" in capsys.readouterr().err
