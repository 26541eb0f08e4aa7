"""ControlNet in use: txt2img / img2img / inpaint give diffusers' StableDiffusionControlNet* images
(one ControlNet, several with their own scales and start / end, guess mode), from a pipeline folder, a
ControlNetModel folder or an original single file; recipes replay; bad inputs are refused by name."""
import numpy as np
import pytest
import torch
from PIL import Image

import latentloom
from builders import tiny_sd_pipeline, use_scheduler
from latentloom.cli import main as cli_main
from latentloom.pipelines.metadata import read_metadata
from latentloom.unet import ControlNet

SAMPLERS = ["ddim", "euler_a", "dpmpp_2m"]


def picture(size=32, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def controlnet(base, seed):
    """diffusers' ControlNetModel for the tiny UNet (control image 2x the latents, as the tiny VAE), its zero
    convs and the control embedding's last conv made random so the control changes the image."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The diffusers ControlNet pipelines (txt2img with one and two ControlNets), saved; the base model saved."""
    import diffusers

    root = tmp_path_factory.mktemp("controlnet")
    base = tiny_sd_pipeline()
    base.save_pretrained(root / "sd", safe_serialization=True)
    parts = dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                 scheduler=base.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    one = diffusers.StableDiffusionControlNetPipeline(controlnet=controlnet(base, 1), **parts)
    two = diffusers.StableDiffusionControlNetPipeline(controlnet=[controlnet(base, 1), controlnet(base, 2)], **parts)
    one.save_pretrained(root / "one", safe_serialization=True)
    two.save_pretrained(root / "two", safe_serialization=True)
    return {"one": one, "two": two, "root": root}


def load(path, **kwargs):
    return latentloom.load_pipeline(path, device="cpu", dtype=torch.float32, **kwargs)


@pytest.fixture(scope="module")
def ours_one(models):
    return load(models["root"] / "one")


def close(got, expected, what):
    diff = float(np.abs(got - expected).mean())
    print(f"{what}: mean abs diff {diff:.2e} (max {float(np.abs(got - expected).max()):.2e})")
    assert got.shape == expected.shape
    assert diff <= 1e-3


ARGS = dict(prompt=["a red circle", "blue"], negative_prompt=["", "blurry"], num_inference_steps=3,
            guidance_scale=5.0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_txt2img_same_images_as_diffusers(models, ours_one, sampler):
    ref = use_scheduler(models["one"], sampler)
    control = picture()
    args = dict(ARGS, controlnet_conditioning_scale=0.7, control_guidance_end=0.7)
    expected = ref(image=control, generator=torch.Generator().manual_seed(3), output_type="np", **args).images
    got = ours_one(control_image=control, sampler=sampler, generator=torch.Generator().manual_seed(3),
                   output_type="np", progress=False, **args).images
    close(got, expected, f"controlnet txt2img {sampler}")
    off = ours_one(control_image=control, sampler=sampler, generator=torch.Generator().manual_seed(3),
                   output_type="np", progress=False, **dict(args, controlnet_conditioning_scale=0.0)).images
    assert np.abs(off - expected).mean() > 1e-2  # the control matters


@pytest.mark.parametrize("window", [(0.0, 0.5), (0.3, 1.0)])
def test_heun_windows_count_unet_calls_as_diffusers(models, ours_one, window):
    """diffusers' start / end are fractions of its timesteps, which for Heun are UNet calls (2N - 1)."""
    ref = use_scheduler(models["one"], "heun")
    args = dict(ARGS, control_guidance_start=window[0], control_guidance_end=window[1], num_inference_steps=4)
    expected = ref(image=picture(seed=3), generator=torch.Generator().manual_seed(0), output_type="np", **args).images
    got = ours_one(control_image=picture(seed=3), sampler="heun", generator=torch.Generator().manual_seed(0),
                   output_type="np", progress=False, **args).images
    close(got, expected, f"controlnet heun window {window}")


@pytest.mark.parametrize("guess_mode", [False, True])
def test_several_controlnets_with_own_scales_and_windows(models, guess_mode):
    ref = use_scheduler(models["two"], "dpmpp_2m")
    ours = load(models["root"] / "two")
    assert [a.name.rsplit("/", 1)[1] for a in ours.controlnets] == ["controlnet", "controlnet_1"]
    images = [picture(seed=1), picture(seed=2)]
    args = dict(ARGS, num_inference_steps=4, controlnet_conditioning_scale=[0.8, 0.5],
                control_guidance_start=[0.0, 0.25], control_guidance_end=[0.75, 1.0], guess_mode=guess_mode)
    expected = ref(image=images, generator=torch.Generator().manual_seed(5), output_type="np", **args).images
    got = ours(control_image=images, sampler="dpmpp_2m", generator=torch.Generator().manual_seed(5),
               output_type="np", progress=False, **args).images
    close(got, expected, f"multi-controlnet guess_mode={guess_mode}")


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_same_images_as_diffusers(models, ours_one, sampler):
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    ref = use_scheduler(StableDiffusionControlNetImg2ImgPipeline(**models["one"].components), sampler)
    args = dict(ARGS, prompt="a red circle", negative_prompt="blurry", strength=0.75,
                controlnet_conditioning_scale=0.9, control_guidance_start=0.3, num_inference_steps=5)
    expected = ref(image=picture(seed=4), control_image=picture(seed=5), generator=torch.Generator().manual_seed(2),
                   output_type="np", **args).images
    got = ours_one.img2img(image=picture(seed=4), control_image=picture(seed=5), sampler=sampler,
                           generator=torch.Generator().manual_seed(2), output_type="np", progress=False, **args).images
    close(got, expected, f"controlnet img2img {sampler}")


def test_img2img_default_scale_is_diffusers(models, ours_one):
    """No controlnet_conditioning_scale: both take their img2img default (0.8), which differs from 1.0."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    ref = use_scheduler(StableDiffusionControlNetImg2ImgPipeline(**models["one"].components), "ddim")
    args = dict(ARGS, prompt="a red circle", negative_prompt="blurry", strength=0.75, num_inference_steps=4)
    call = dict(image=picture(seed=4), control_image=picture(seed=5), output_type="np")
    expected = ref(generator=torch.Generator().manual_seed(3), **call, **args).images
    got = ours_one.img2img(sampler="ddim", generator=torch.Generator().manual_seed(3), progress=False, **call,
                           **args).images
    close(got, expected, "controlnet img2img default scale")
    at_one = ours_one.img2img(sampler="ddim", generator=torch.Generator().manual_seed(3), progress=False,
                              controlnet_conditioning_scale=1.0, **call, **args).images
    assert np.abs(at_one - got).mean() > 1e-3


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpaint_same_images_as_diffusers(models, ours_one, sampler):
    from diffusers import StableDiffusionControlNetInpaintPipeline

    ref = use_scheduler(StableDiffusionControlNetInpaintPipeline(**models["one"].components), sampler)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 4:20] = 255
    mask = Image.fromarray(mask)
    # no scale given: the default (0.5 for inpainting, as diffusers') must agree too
    args = dict(ARGS, prompt="a red circle", negative_prompt="blurry", strength=1.0, guess_mode=True)
    expected = ref(image=picture(seed=6), mask_image=mask, control_image=picture(seed=7),
                   generator=torch.Generator().manual_seed(1), output_type="np", **args).images
    got = ours_one.inpaint(image=picture(seed=6), mask_image=mask, control_image=picture(seed=7), paste_back=False,
                           sampler=sampler, generator=torch.Generator().manual_seed(1), output_type="np",
                           progress=False, **args).images
    close(got, expected, f"controlnet inpaint {sampler}")


def test_original_single_file_and_controlnet_folder_give_the_same_images(models, ours_one, tmp_path):
    net = ControlNet.from_diffusers(models["root"] / "one" / "controlnet")
    net.save_single_file(tmp_path / "control_tiny.safetensors")
    # shape inference assumes SD's 32 norm groups, which the tiny model lacks: give the config
    single = ControlNet.from_single_file(tmp_path / "control_tiny.safetensors", config=net.config)
    from_file = load(models["root"] / "sd", controlnet=single)
    from_folder = load(models["root"] / "sd", controlnet=str(models["root"] / "one" / "controlnet"))
    args = dict(prompt="a star", control_image=picture(seed=8), num_inference_steps=3, guidance_scale=4.0, seed=4,
                output_type="np", progress=False)
    expected = ours_one(**args).images
    np.testing.assert_allclose(from_file(**args).images, expected, atol=1e-5)
    np.testing.assert_allclose(from_folder(**args).images, expected, atol=1e-5)


def test_recipe_and_generate_from_replay(models, tmp_path, capsys):
    picture(seed=9).save(tmp_path / "edges.png")
    sd, net = str(models["root"] / "sd"), str(models["root"] / "one" / "controlnet")
    first = tmp_path / "first.png"
    rc = cli_main(["generate", "a house", "--model", sd, "--controlnet", net, "--control-image",
                   str(tmp_path / "edges.png"), "--control-scale", "0.6", "--control-end", "0.5", "--guess-mode",
                   "--steps", "3", "--seed", "11", "--dtype", "fp32", "--no-progress", "-o", str(first)])
    assert rc == 0, capsys.readouterr().err
    recipe = read_metadata(first)
    (entry,) = recipe["controlnets"]
    assert entry["model"] == net and len(entry["model_hash"]) == 10
    assert entry["image"] == str((tmp_path / "edges.png").resolve()) and len(entry["image_sha256"]) == 64
    assert (entry["scale"], entry["start"], entry["end"], recipe["guess_mode"]) == (0.6, 0.0, 0.5, True)
    again = tmp_path / "again.png"
    assert cli_main(["generate", "--from", str(first), "--no-progress", "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    (tmp_path / "edges.png").unlink()
    assert cli_main(["generate", "--from", str(first), "--no-progress", "-o", str(again)]) == 2
    assert str((tmp_path / "edges.png").resolve()) in capsys.readouterr().err


def test_img2img_and_inpaint_cli_take_controlnets(models, tmp_path, capsys):
    for name in ("photo", "edges", "edges2"):
        picture(seed=len(name)).save(tmp_path / f"{name}.png")
    Image.fromarray(np.full((32, 32), 255, dtype=np.uint8)).save(tmp_path / "mask.png")
    sd, net = str(models["root"] / "sd"), str(models["root"] / "one" / "controlnet")
    common = ["--model", sd, "--steps", "2", "--seed", "1", "--dtype", "fp32", "--no-progress"]
    two = ["--controlnet", net, "--control-image", str(tmp_path / "edges.png"), "--controlnet", net,
           "--control-image", str(tmp_path / "edges2.png"), "--control-scale", "0.5", "--control-scale", "1.0"]
    out = tmp_path / "i2i.png"
    assert cli_main(["img2img", "x", "--image", str(tmp_path / "photo.png"), *two, *common, "-o", str(out)]) == 0
    assert [e["scale"] for e in read_metadata(out)["controlnets"]] == [0.5, 1.0]
    out = tmp_path / "inp.png"
    assert cli_main(["inpaint", "x", "--image", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png"),
                     *two[:4], *common, "-o", str(out)]) == 0
    assert read_metadata(out)["task"] == "inpaint"
    assert cli_main(["generate", "x", *two[:8], "--control-scale", "1", "--control-scale", "2", "--control-scale",
                     "3", *common, "-o", str(out)]) == 2
    assert "3 --control-scale for 2 ControlNet" in capsys.readouterr().err


def test_bad_inputs_are_named(models, ours_one):
    call = dict(num_inference_steps=2, progress=False, output_type="np")
    with pytest.raises(ValueError, match=r"control_image is 24x24 but the output is 32x32"):
        ours_one("x", control_image=picture(24), height=32, width=32, **call)
    with pytest.raises(ValueError, match=r"control_image is 32x32 but the output is 16x16"):
        ours_one.img2img("x", image=picture(16), control_image=picture(32), **call)
    with pytest.raises(ValueError, match=r"control_guidance_start 0.6 must be below control_guidance_end 0.4"):
        ours_one("x", control_image=picture(), control_guidance_start=0.6, control_guidance_end=0.4, **call)
    with pytest.raises(ValueError, match=r"pass control_image="):
        ours_one("x", **call)
    with pytest.raises(ValueError, match=r"got 3 images in control_image for 2 prompts"):
        ours_one(["a", "b"], control_image=[picture()] * 3, **call)
    two = load(models["root"] / "two")
    with pytest.raises(ValueError, match=r"got 1 control image\(s\) for 2 ControlNets"):
        two("x", control_image=picture(), **call)
    with pytest.raises(ValueError, match=r"controlnet_conditioning_scale has 3 values \(\[1, 2, 3\]\) for 2"):
        two("x", control_image=[picture(), picture()], controlnet_conditioning_scale=[1, 2, 3], **call)
    plain = load(models["root"] / "sd")
    with pytest.raises(ValueError, match=r"no ControlNet; load one with"):
        plain("x", control_image=picture(), **call)
    with pytest.raises(FileNotFoundError, match=r"no ControlNet at 'nowhere'"):
        load(models["root"] / "sd", controlnet="nowhere")


def test_unet_control_checks_and_step_caching(ours_one):
    """The residuals must fit the skips (count and shape); on a cached step the shallow ones are added."""
    from latentloom.unet.step_cache import DeepCache

    unet, net = ours_one.unet, ours_one.controlnets[0].model
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    image = torch.rand(2, 3, 32, 32, generator=g)
    down, mid = net(x, 500, ctx, image)
    with pytest.raises(ValueError, match=r"control has 3 down residuals; this UNet has 4 skip tensors"):
        unet(x, 500, ctx, control=(down[:3], mid))
    with pytest.raises(ValueError, match=r"down residual 1 must have shape \(2, 16, 16, 16\)"):
        unet(x, 500, ctx, control=([down[0], down[2], *down[2:]], mid))
    cache = DeepCache(2)
    full = unet(x, 500, ctx, control=(down, mid), cache=cache)
    cache.step_done(0)
    cached_with = unet(x, 500, ctx, control=(down, mid), cache=cache)
    assert cache.cached_calls == 1
    assert torch.isfinite(cached_with).all() and full.shape == cached_with.shape
