"""Super-resolution: parity with diffusers' StableDiffusionUpscalePipeline (noise augmentation of the
low-res image, noise level as class label), loading the upscaler folder, batches, the CLI, errors."""
import numpy as np
import pytest
import torch
from PIL import Image

import latentloom
from builders import save_sd_folder, tiny_sd_pipeline, tiny_upscale_pipeline, use_scheduler
from latentloom.cli import main as cli_main
from latentloom.pipelines.metadata import read_metadata


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    pipe = tiny_upscale_pipeline()
    return pipe, save_sd_folder(pipe, tmp_path_factory.mktemp("up"))


def picture(h=8, w=8, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def make(pipe, prompt="a red circle", **kwargs):
    args = dict(image=picture(), num_inference_steps=3, guidance_scale=4.0, progress=False, output_type="np")
    args.update(kwargs)
    return pipe.upscale(prompt, **args)


@pytest.mark.parametrize("sampler,noise_level", [("ddim", 20), ("euler_a", 100), ("dpmpp_2m", 0), ("unipc", 350)])
def test_same_images_as_diffusers(reference, ours, sampler, noise_level):
    ref = use_scheduler(reference[0], sampler)
    args = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=5, guidance_scale=6.0,
                noise_level=noise_level, num_images_per_prompt=2)
    image = picture(12, 16, seed=1)
    expected = ref(image=image, generator=torch.Generator().manual_seed(3), output_type="np", **args).images
    got = ours.upscale(image=image, sampler=sampler, generator=torch.Generator().manual_seed(3), output_type="np",
                       progress=False, **args).images
    assert got.shape == expected.shape == (2, 24, 32, 3)  # the tiny VAE's factor is 2
    diff = float(np.abs(got - expected).max())
    print(f"upscale {sampler} noise_level {noise_level} parity vs diffusers: max abs diff {diff:.2e} (mean {float(np.abs(got - expected).mean()):.2e})")
    assert diff <= 1e-4


def test_same_images_as_diffusers_without_guidance(reference, ours):
    ref = use_scheduler(reference[0], "euler")
    args = dict(prompt=["a star", "a circle"], num_inference_steps=4, guidance_scale=1.0, noise_level=50)
    images = [picture(seed=2), picture(seed=3)]
    expected = ref(image=images, generator=torch.Generator().manual_seed(0), output_type="np", **args).images
    got = ours.upscale(image=images, sampler="euler", generator=torch.Generator().manual_seed(0),
                       output_type="np", progress=False, **args).images
    diff = float(np.abs(got - expected).max())
    print(f"upscale parity vs diffusers: max abs diff {diff:.2e} (mean {float(np.abs(got - expected).mean()):.2e})")
    assert diff <= 1e-4


def test_loading_records_the_low_res_schedule(ours, reference):
    assert ours.upscaler.max_noise_level == 350
    expected = reference[0].low_res_scheduler.alphas_cumprod
    assert torch.equal(ours.upscaler.low_res_schedule.alphas_cumprod, expected.float())


def test_image_in_a_batch_equals_image_made_alone(ours):
    images = [picture(seed=1), picture(seed=2)]
    batch = make(ours, ["a red circle", "a green star"], image=images, seed=7, num_images_per_prompt=2).images
    assert batch.shape == (4, 16, 16, 3)
    alone = make(ours, "a green star", image=images[1], seed=7 + 3).images
    np.testing.assert_allclose(batch[3], alone[0], atol=1e-5)


def test_noise_level_changes_the_result_and_is_recorded(ours):
    a, b = make(ours, seed=1, noise_level=0), make(ours, seed=1, noise_level=300)
    assert not np.allclose(a.images, b.images)
    assert a.recipes[0]["task"] == "upscale" and b.recipes[0]["noise_level"] == 300
    assert (a.recipes[0]["height"], a.recipes[0]["input_height"]) == (16, 8)


@pytest.mark.parametrize("level", [-1, 351])
def test_noise_level_outside_the_model_range_is_refused(ours, level):
    with pytest.raises(ValueError, match=r"noise_level must be in \[0, 350\]"):
        make(ours, noise_level=level)


def test_a_model_that_is_no_upscaler_is_refused(tmp_path):
    plain = latentloom.load_pipeline(save_sd_folder(tiny_sd_pipeline(), tmp_path / "sd"), device="cpu")
    with pytest.raises(ValueError, match="upscale needs a UNet with 7 input channels; this model's UNet has 4"):
        make(plain)
    # a 7-channel UNet whose folder had no low_res_scheduler/: refused by name
    pipe = latentloom.load_pipeline(save_sd_folder(tiny_upscale_pipeline(), tmp_path / "up"), device="cpu")
    pipe.upscaler = None
    with pytest.raises(ValueError, match="is not an upscaler model"):
        make(pipe)


def test_a_seven_channel_unet_without_class_embedding_is_refused(reference):
    import dataclasses

    from latentloom.unet import UNet

    pipe = latentloom.load_pipeline(reference[1], device="cpu")
    pipe.unet = UNet(dataclasses.replace(pipe.unet.config, num_class_embeds=None))
    with pytest.raises(ValueError, match="noise-level class embedding"):
        make(pipe)


def test_img2img_refuses_the_upscaler(ours):
    with pytest.raises(ValueError, match="img2img needs a UNet with 4 input channels; this model's UNet has 7"):
        ours.img2img("x", image=picture(), progress=False)


def test_cli_upscale(reference, tmp_path, capsys):
    source, out = tmp_path / "in.png", tmp_path / "out.png"
    picture().save(source)
    rc = cli_main(["upscale", "a red circle", "--image", str(source), "--noise-level", "30", "--model",
                   str(reference[1]), "--seed", "2", "--steps", "3", "--no-progress", "-o", str(out)])
    assert rc == 0
    recipe = read_metadata(out)
    assert recipe["task"] == "upscale" and recipe["noise_level"] == 30 and Image.open(out).size == (16, 16)
    assert cli_main(["upscale", "x", "--image", str(source), "--noise-level", "999", "--model", str(reference[1]),
                     "--no-progress", "-o", str(out)]) == 2
    assert "noise_level must be in [0, 350]" in capsys.readouterr().err
    assert cli_main(["upscale", "x", "--image", str(source), "--clip-guidance", "2", "--model",
                     str(reference[1])]) == 2
    assert "--clip-guidance is available for generate only" in capsys.readouterr().err
