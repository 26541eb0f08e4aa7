"""SDXL ControlNets: a folder saved by diffusers' StableDiffusionXLControlNetPipeline (tiny components,
zero convs made non-zero so the control matters) loads with its ControlNet and gives diffusers' images
in txt2img, img2img and inpainting."""
import numpy as np
import pytest
import torch

import latentloom
from builders import tiny_sdxl_pipeline, use_scheduler
from test_controlnet_pipeline import close, picture

SIZE = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import diffusers

    base = tiny_sdxl_pipeline()
    net = diffusers.ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pipe = diffusers.StableDiffusionXLControlNetPipeline(controlnet=net, **base.components)
    folder = tmp_path_factory.mktemp("sdxl-controlnet")
    pipe.save_pretrained(folder, safe_serialization=True)
    ours = latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)
    assert len(ours.controlnets) == 1
    return pipe, ours


ARGS = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0,
            controlnet_conditioning_scale=0.7, control_guidance_end=0.7)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m"])
def test_sdxl_txt2img_same_images_as_diffusers(models, sampler):
    ref, ours = models
    ref = use_scheduler(ref, sampler)
    args = dict(ARGS, height=SIZE, width=SIZE)
    expected = ref(image=picture(SIZE, seed=3), generator=torch.Generator().manual_seed(0), output_type="np",
                   **args).images
    got = ours(control_image=picture(SIZE, seed=3), sampler=sampler, generator=torch.Generator().manual_seed(0),
               output_type="np", progress=False, **args).images
    close(got, expected, f"sdxl controlnet {sampler}")
    off = ours(control_image=picture(SIZE, seed=3), sampler=sampler, generator=torch.Generator().manual_seed(0),
               output_type="np", progress=False, **dict(args, controlnet_conditioning_scale=0.0)).images
    assert np.abs(off - expected).mean() > 1e-2  # the control matters


def test_sdxl_img2img_same_images_as_diffusers(models):
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    ref_txt, ours = models
    ref = use_scheduler(StableDiffusionXLControlNetImg2ImgPipeline(**ref_txt.components), "dpmpp_2m")
    args = dict(ARGS, strength=0.75, num_inference_steps=4)
    expected = ref(image=picture(SIZE, seed=4), control_image=picture(SIZE, seed=5),
                   generator=torch.Generator().manual_seed(2), output_type="np", **args).images
    got = ours.img2img(image=picture(SIZE, seed=4), control_image=picture(SIZE, seed=5), sampler="dpmpp_2m",
                       generator=torch.Generator().manual_seed(2), output_type="np", progress=False, **args).images
    close(got, expected, "sdxl controlnet img2img")


def test_sdxl_inpaint_same_images_as_diffusers(models):
    from diffusers import StableDiffusionXLControlNetInpaintPipeline
    from PIL import Image

    ref_txt, ours = models
    ref = use_scheduler(StableDiffusionXLControlNetInpaintPipeline(**ref_txt.components), "dpmpp_2m")
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:24, 4:20] = 255
    mask = Image.fromarray(mask)
    args = dict(ARGS, strength=1.0, num_inference_steps=4)
    expected = ref(image=picture(SIZE, seed=6), mask_image=mask, control_image=picture(SIZE, seed=7),
                   generator=torch.Generator().manual_seed(1), output_type="np", **args).images
    got = ours.inpaint(image=picture(SIZE, seed=6), mask_image=mask, control_image=picture(SIZE, seed=7),
                       paste_back=False, sampler="dpmpp_2m", generator=torch.Generator().manual_seed(1),
                       output_type="np", progress=False, **args).images
    close(got, expected, "sdxl controlnet inpaint")
