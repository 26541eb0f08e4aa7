"""Inpainting: 9- and 4-channel parity with diffusers' StableDiffusionInpaintPipeline, the 4-channel blend
wrapper under every sampler, exact paste-back, every accepted mask form, the CLI, and the errors."""
import numpy as np
import pytest
import torch
from PIL import Image

import latentloom
from builders import save_sd_folder, tiny_sd_pipeline, tiny_upscale_pipeline, use_scheduler
from latentloom.cli import main as cli_main
from latentloom.samplers.consistency import consistency_options
from latentloom.samplers.guidance import InpaintBlend
from latentloom.pipelines.masks import binarize, dilated_latent_mask, feathered, mask_to_tensor
from latentloom.pipelines.metadata import read_metadata
from latentloom.samplers import SAMPLERS
from latentloom.samplers.noise import initial_latents
from latentloom.samplers.schedules import DiscreteSchedule, ScheduleConfig, make_sigmas


@pytest.fixture(scope="module")
def reference9(tmp_path_factory):
    pipe = tiny_sd_pipeline(in_channels=9)
    return pipe, save_sd_folder(pipe, tmp_path_factory.mktemp("sd9"))


@pytest.fixture(scope="module")
def ours9(reference9):
    return latentloom.load_pipeline(reference9[1], device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def folder4(tmp_path_factory):
    return save_sd_folder(tiny_sd_pipeline(), tmp_path_factory.mktemp("sd4"))


@pytest.fixture(scope="module")
def ours4(folder4):
    return latentloom.load_pipeline(folder4, device="cpu", dtype=torch.float32)


def picture(h=16, w=16, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def box_mask(h=16, w=16, top=3, left=5, bottom=11, right=13):
    m = np.zeros((h, w), np.uint8)
    m[top:bottom, left:right] = 255
    return Image.fromarray(m)


def make(pipe, prompt="a red circle", **kwargs):
    args = dict(image=picture(), mask_image=box_mask(), num_inference_steps=3, guidance_scale=4.0, progress=False,
                output_type="np")
    args.update(kwargs)
    return pipe.inpaint(prompt, **args)


def assert_inpaints_like(reference, ours, sampler, strength, label):
    """diffusers' inpainting pipeline and ours.inpaint(paste_back=False) give the same two images."""
    ref = use_scheduler(reference, sampler)
    image, mask = picture(24, 32, seed=4), box_mask(24, 32, 4, 6, 20, 22)
    args = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0,
                strength=strength, num_images_per_prompt=2)
    expected = ref(image=image, mask_image=mask, height=24, width=32, generator=torch.Generator().manual_seed(3),
                   output_type="np", **args).images
    got = ours.inpaint(image=image, mask_image=mask, paste_back=False, sampler=sampler, output_type="np",
                       generator=torch.Generator().manual_seed(3), progress=False, **args).images
    diff = np.abs(got - expected)
    print(f"{label} inpaint {sampler} strength {strength}: mean abs diff {diff.mean():.1e}, max {diff.max():.1e}")
    assert got.shape == expected.shape == (2, 24, 32, 3) and diff.max() <= 1e-4


@pytest.mark.parametrize("sampler,strength", [("ddim", 1.0), ("euler_a", 1.0), ("dpmpp_2m", 0.7), ("heun", 0.7)])
def test_nine_channel_inpainting_matches_diffusers(reference9, ours9, sampler, strength):
    assert_inpaints_like(reference9[0], ours9, sampler, strength, "9-channel")


@pytest.mark.parametrize("sampler,strength", [("ddim", 1.0), ("euler_a", 0.7), ("dpmpp_2m", 1.0), ("unipc", 0.7)])
def test_four_channel_inpainting_matches_diffusers(folder4, ours4, sampler, strength):
    """Any SD model: diffusers re-noises the known region after each step (its masked-image encode draws
    from the generator though a 4-channel UNet never reads it); without paste-back, the same image."""
    from diffusers import StableDiffusionInpaintPipeline

    reference = StableDiffusionInpaintPipeline.from_pretrained(folder4, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    assert_inpaints_like(reference, ours4, sampler, strength, "4-channel")


@pytest.mark.parametrize("which", ["ours9", "ours4"])
def test_paste_back_keeps_every_unmasked_pixel_exactly(which, request):
    pipe = request.getfixturevalue(which)
    image, mask = picture(seed=5), box_mask()
    out = make(pipe, image=image, mask_image=mask, seed=0, output_type="pil").images[0]
    got, original = np.asarray(out), np.asarray(image)
    keep = np.asarray(mask) == 0
    assert np.array_equal(got[keep], original[keep])
    assert not np.array_equal(got[~keep], original[~keep])  # the masked part was repainted
    raw = np.asarray(make(pipe, image=image, mask_image=mask, seed=0, output_type="pil",
                          paste_back=False).images[0])
    assert not np.array_equal(raw[keep], original[keep])  # what the VAE alone gives back differs


def test_nine_channel_conditioning_covers_whole_latent_cells_with_paste_back(ours9):
    seen = []
    hook = ours9.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0][:1, 4].clone()))
    try:
        mask = box_mask(16, 16, 3, 5, 11, 13)  # rows 3..10, columns 5..12: odd edges, factor 2
        make(ours9, mask_image=mask, seed=0, num_inference_steps=1, paste_back=True)
        make(ours9, mask_image=mask, seed=0, num_inference_steps=1, paste_back=False)
    finally:
        hook.remove()
    grid, nearest = torch.zeros(8, 8), torch.zeros(8, 8)
    grid[1:6, 2:7] = 1  # every cell holding a repainted pixel
    nearest[2:6, 3:7] = 1  # diffusers: the cell's top-left pixel decides
    assert torch.equal(seen[0][0], grid) and torch.equal(seen[1][0], nearest)


def test_paste_back_blends_inside_the_mask_edge_only(ours4):
    image, mask = picture(seed=6), box_mask(16, 16, 2, 2, 14, 14)
    kwargs = dict(image=image, mask_image=mask, seed=1)
    from latentloom.vae.codec import decode_latents

    pasted = make(ours4, **kwargs, feather=3).images[0]
    latents = make(ours4, **kwargs, output_type="latent").images  # the same run before its paste-back
    raw = decode_latents(ours4.vae, latents).permute(0, 2, 3, 1)[0].clamp(-1, 1).add(1).div(2).numpy()
    np.testing.assert_allclose(pasted[6:10, 6:10], raw[6:10, 6:10], atol=1e-6)  # deep inside: generated
    edge = pasted[2, 8]  # on the mask's edge: mostly the original
    original = np.asarray(image, dtype=np.float32)[2, 8] / 255
    assert np.abs(edge - original).max() < np.abs(raw[2, 8] - original).max()


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_blend_wrapper_keeps_the_known_region_with_every_sampler(sampler):
    schedule = DiscreteSchedule.from_config(ScheduleConfig())
    sigmas = make_sigmas(schedule, 6, sampler=sampler, set_alpha_to_one=True)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    mask = torch.zeros(2, 1, 6, 6)
    mask[:, :, 1:4, 2:5] = 1
    seen = []

    def denoiser(x, sigma):  # shrinks toward 0: the repainted region must end far from x0
        seen.append((x.clone(), float(torch.as_tensor(sigma).flatten()[0])))
        return x / (1 + torch.as_tensor(sigma).reshape(-1, 1, 1, 1) ** 2)

    options = consistency_options(sampler, schedule, sigmas) if sampler in ("lcm", "tcd") else {}
    blend = InpaintBlend(denoiser, x0=x0, noise=noise, mask=mask)
    x = SAMPLERS[sampler](blend, initial_latents(noise, sigmas, sampler=sampler), sigmas,
                          generator=torch.Generator().manual_seed(1), **options)
    keep = mask.expand_as(x0) == 0
    # tcd ends at timestep 0's noise level (sigma ~0.03), not at 0: there x0 within that noise (the
    # pipeline pins the known region exactly afterwards); every other sampler ends on x0 itself
    torch.testing.assert_close(x[keep], x0[keep], atol=5 * float(sigmas[-1]) or 1e-5, rtol=0)
    assert (x[~keep] - x0[~keep]).abs().max() > 0.1
    assert torch.equal(seen[0][0], initial_latents(noise, sigmas, sampler=sampler))  # the first call: x as started
    x_in, sigma = seen[1]  # later calls: the known region re-noised to the current level
    torch.testing.assert_close(x_in[keep], (x0 + sigma * noise)[keep], atol=1e-5, rtol=1e-5)


def test_four_channel_inpainting_with_a_stochastic_and_a_multistep_sampler_keeps_the_unmasked_pixels(ours4):
    for sampler, strength in (("euler_a", 1.0), ("dpmpp_2m", 0.7)):
        out = make(ours4, sampler=sampler, strength=strength, seed=2, output_type="pil").images[0]
        keep = np.asarray(box_mask()) == 0
        assert np.array_equal(np.asarray(out)[keep], np.asarray(picture())[keep])


def test_image_in_a_batch_equals_image_made_alone(ours4):
    batch = make(ours4, ["a red circle", "a green star"], seed=7, num_images_per_prompt=2).images
    alone = make(ours4, "a green star", seed=7 + 3).images
    np.testing.assert_allclose(batch[3], alone[0], atol=1e-5)


def _mask_forms():
    m = np.zeros((16, 16), np.uint8)
    m[3:11, 5:13] = 255
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = m[..., None]
    rgba[..., 3] = 255
    return {
        "PIL L": Image.fromarray(m), "PIL 1": Image.fromarray(m).convert("1"),
        "PIL RGB": Image.fromarray(m).convert("RGB"), "PIL RGBA": Image.fromarray(rgba),
        "PIL RGBA white on transparent": Image.fromarray(np.dstack([np.full_like(m, 255)] * 3 + [m])),
        "PIL LA": Image.fromarray(m).convert("LA"), "PIL P": Image.fromarray(m).convert("P"),
        "numpy uint8": m, "numpy bool": m > 0, "numpy float 0-1": m / 255.0,
        "numpy float 0-255": m.astype(np.float32), "numpy HxWx1": m[..., None], "numpy RGB": np.dstack([m] * 3),
        "numpy RGBA": rgba, "tensor HxW 0-1": torch.from_numpy(m / 255.0),
        "tensor 1xHxW uint8": torch.from_numpy(m)[None], "tensor Bx1xHxW 0-255": torch.from_numpy(m).float()[None, None],
        "tensor bool": torch.from_numpy(m > 0), "list of one": [Image.fromarray(m)],
    }


def test_every_accepted_mask_form_gives_the_same_mask():
    forms = _mask_forms()
    expected = binarize(mask_to_tensor(forms["PIL L"]))
    assert expected.shape == (1, 1, 16, 16) and expected.sum() == 64
    for name, form in forms.items():
        assert torch.equal(binarize(mask_to_tensor(form)), expected), name


def test_transparent_pixels_of_an_rgba_mask_are_kept():
    rgba = np.full((8, 8, 4), 255, np.uint8)
    rgba[:, :4, 3] = 0  # white but transparent on the left half
    mask = binarize(mask_to_tensor(Image.fromarray(rgba)))
    assert mask[..., :4].sum() == 0 and mask[..., 4:].sum() == 32


def test_mask_forms_give_the_same_image(ours9):
    forms = _mask_forms()
    a = make(ours9, mask_image=forms["PIL RGB"], seed=3).images
    b = make(ours9, mask_image=forms["tensor HxW 0-1"], seed=3).images
    np.testing.assert_array_equal(a, b)


def test_feathered_mask_is_zero_outside_one_deep_inside():
    mask = torch.zeros(1, 1, 20, 20)
    mask[..., 4:16, 4:16] = 1
    soft = feathered(mask, 3)
    assert torch.equal(soft[mask == 0], torch.zeros(int((mask == 0).sum())))
    assert torch.equal(soft[..., 8:12, 8:12], torch.ones(1, 1, 4, 4))
    assert 0 < float(soft[0, 0, 4, 10]) < float(soft[0, 0, 5, 10]) < float(soft[0, 0, 7, 10]) <= 1
    assert torch.equal(feathered(mask, 0), mask)


def test_latent_mask_covers_every_repainted_pixel_and_its_neighbours():
    mask = torch.zeros(1, 1, 16, 16)
    mask[0, 0, 9, 6] = 1  # one pixel, in latent cell (4, 3) for factor 2
    latent = dilated_latent_mask(mask, 2)
    assert latent.shape == (1, 1, 8, 8)
    assert latent[0, 0, 3:6, 2:5].sum() == 9 and latent.sum() == 9
    assert dilated_latent_mask(mask, 2, grow=0).sum() == 1


def test_recipe_records_the_inpainting(ours9):
    recipe = make(ours9, seed=4, strength=0.9, feather=2).recipes[0]
    assert recipe["task"] == "inpaint" and recipe["strength"] == 0.9 and recipe["paste_back"] is True
    assert recipe["feather"] == 2 and recipe["inpaint_mode"] == "concat"
    assert len(recipe["image_hash"]) == len(recipe["mask_hash"]) == 10


def test_mask_of_another_size_is_refused(ours4):
    with pytest.raises(ValueError, match="mask_image is 8x8 but image is 16x16"):
        make(ours4, mask_image=box_mask(8, 8, 1, 1, 4, 4))


@pytest.mark.parametrize("mask,error,match", [
    (Image.new("CMYK", (16, 16)), ValueError, "PIL mode 'CMYK' is not accepted"),
    (np.zeros((16, 16, 2)), ValueError, r"\(H, W\) or \(H, W, 1\|3\|4\)"),
    (torch.zeros(3, 16, 16), ValueError, r"\(H, W\), \(1, H, W\) or \(B, 1, H, W\)"),
    (np.full((16, 16), -1.0), ValueError, "0-1 or 0-255"),
    (np.full((16, 16), 300, np.int32), ValueError, "0-1 or 0-255"),
    ("mask.png", TypeError, "mask_image must be a PIL image"),
    ([], ValueError, "empty list"),
])
def test_bad_masks_are_refused(ours4, mask, error, match):
    with pytest.raises(error, match=match):
        make(ours4, mask_image=mask)


def test_strength_errors(ours9):
    with pytest.raises(ValueError, match="strength must be a finite number in"):
        make(ours9, strength=1.01)
    with pytest.raises(ValueError, match="no denoising step"):
        make(ours9, strength=0.1)


def test_other_bad_arguments(ours4):
    with pytest.raises(ValueError, match="masks in mask_image have different sizes"):
        make(ours4, mask_image=[box_mask(), box_mask(8, 8, 1, 1, 4, 4)])
    with pytest.raises(ValueError, match="must share batch and spatial size"):
        InpaintBlend(lambda x, s: x, x0=torch.zeros(1, 4, 4, 4), noise=torch.zeros(1, 4, 4, 4),
                     mask=torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="feather must be in"):
        make(ours4, feather=-1)
    with pytest.raises(ValueError, match="2 images in mask_image for 3 prompts"):
        make(ours4, ["a", "b", "c"], image=picture(), mask_image=[box_mask(), box_mask()])


def test_a_unet_with_other_input_channels_is_refused(tmp_path):
    upscaler = latentloom.load_pipeline(save_sd_folder(tiny_upscale_pipeline(), tmp_path), device="cpu")
    with pytest.raises(ValueError, match="inpaint needs a UNet with 4 or 9 input channels; this model's UNet has 7"):
        make(upscaler)


def test_cli_inpaint(reference9, tmp_path, capsys):
    source, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    picture().save(source)
    box_mask().save(mask)
    rc = cli_main(["inpaint", "a red circle", "--image", str(source), "--mask", str(mask), "--model",
                   str(reference9[1]), "--seed", "3", "--steps", "3", "--no-progress", "-o", str(out)])
    assert rc == 0
    recipe = read_metadata(out)
    assert recipe["task"] == "inpaint" and recipe["paste_back"] is True and recipe["seed"] == 3
    keep = np.asarray(box_mask()) == 0
    assert np.array_equal(np.asarray(Image.open(out))[keep], np.asarray(picture())[keep])
    rc = cli_main(["inpaint", "x", "--image", str(source), "--mask", str(mask), "--no-paste-back", "--model",
                   str(reference9[1]), "--seed", "3", "--steps", "3", "--no-progress", "-o", str(out)])
    assert rc == 0 and read_metadata(out)["paste_back"] is False
    box_mask(8, 8, 1, 1, 4, 4).save(mask)
    assert cli_main(["inpaint", "x", "--image", str(source), "--mask", str(mask), "--model", str(reference9[1]),
                     "--no-progress", "-o", str(out)]) == 2
    assert "mask_image is 8x8 but image is 16x16" in capsys.readouterr().err
