"""Same images as diffusers on the scheduler configs real releases publish, like a user's download.

Each folder holds tiny weights and a release's scheduler_config.json exactly as published (what it
leaves out stays out). diffusers loads the folder and swaps its sampler the documented way,
`Cls.from_config(pipe.scheduler.config)` (plus `algorithm_type` for DPM++); latentloom is asked
for the same sampler with the same generator. Measured figures: `-s` prints them.
"""
import json
import shutil
import warnings

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import latentloom
from builders import DATA, DIFFUSERS_SCHEDULERS, save_sd_folder, tiny_sd_pipeline, tiny_upscale_pipeline

RELEASES = DATA / "release_configs"
SCHEDULER_FILES = sorted(p for p in RELEASES.glob("*scheduler_config.json") if "low_res" not in p.name)
SAMPLERS = ["ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]
KARRAS = ["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]  # where the diffusers class offers it
CASES = [(s, False) for s in SAMPLERS] + [(s, True) for s in KARRAS]
MAX_DIFF = 1e-4  # in [0, 1]; the bar is a mean of 1e-3, fp32 gives ~1e-7
STEPS = 4  # divides 1000, so DDIM with trailing spacing (SDXL-Turbo's config) steps as diffusers does


def release_name(path):
    return path.name.removesuffix("-scheduler_config.json")


def with_release_scheduler(folder, scheduler_file, *, subfolder="scheduler"):
    """Put a release's scheduler config into a saved folder verbatim, and name its class in model_index.json."""
    shutil.copyfile(scheduler_file, folder / subfolder / "scheduler_config.json")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index[subfolder] = ["diffusers", json.loads(scheduler_file.read_text())["_class_name"]]
    index_path.write_text(json.dumps(index, indent=2))
    return folder


def swapped(pipe, original, sampler, karras):
    cls_name, extra = DIFFUSERS_SCHEDULERS[sampler]
    if karras:
        extra = {**extra, "use_karras_sigmas": True}
    pipe.scheduler = getattr(diffusers, cls_name).from_config(original.config, **extra)
    return pipe


def load_diffusers(cls, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_ours(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a release's neutral extras (interpolation_type)
        return latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)


def compare(label, got, expected):
    assert got.shape == expected.shape
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    print(f"{label}: mean abs diff {diff.mean():.1e}, max {diff.max():.1e}")
    assert diff.mean() <= 1e-3 and diff.max() <= MAX_DIFF, label


def both(reference, original, ours_call, sampler, *, seed, **args):
    """(latentloom's images, diffusers' images) for one call with `sampler` and the same generator."""
    expected = swapped(reference, original, sampler, False)(
        generator=torch.Generator().manual_seed(seed), output_type="np", **args).images
    got = ours_call(sampler=sampler, generator=torch.Generator().manual_seed(seed), output_type="np", progress=False,
                    **args).images
    return got, expected


def picture(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------- text to image, every release config
@pytest.fixture(scope="module")
def txt2img_weights(tmp_path_factory):
    return save_sd_folder(tiny_sd_pipeline(), tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module", params=SCHEDULER_FILES, ids=release_name)
def release_pair(request, txt2img_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp(release_name(request.param))
    shutil.copytree(txt2img_weights, folder, dirs_exist_ok=True)
    with_release_scheduler(folder, request.param)
    reference = load_diffusers(diffusers.StableDiffusionPipeline, folder)
    return reference, reference.scheduler, load_ours(folder), release_name(request.param)


@pytest.mark.parametrize("sampler,karras", CASES, ids=[s + ("-karras" if k else "") for s, k in CASES])
def test_txt2img_matches_diffusers_on_release_config(release_pair, sampler, karras):
    reference, original, ours, name = release_pair
    args = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=5.0,
                height=16, width=16)
    expected = swapped(reference, original, sampler, karras)(
        generator=torch.Generator().manual_seed(3), output_type="np", **args).images
    got = ours(**args, sampler=sampler, karras_sigmas=karras, generator=torch.Generator().manual_seed(3),
               output_type="np", progress=False).images
    spacing = ours.schedule_config.for_sampler(sampler).timestep_spacing
    compare(f"txt2img {name} {sampler}{' karras' if karras else ''} (spacing {spacing})", got, expected)


# ---------------------------------------------------------------- img2img and inpaint on SD 1.5's config
SD15 = RELEASES / "sd15-scheduler_config.json"


@pytest.fixture(scope="module")
def sd15_pair(txt2img_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15-img2img")
    shutil.copytree(txt2img_weights, folder, dirs_exist_ok=True)
    with_release_scheduler(folder, SD15)
    reference = load_diffusers(diffusers.StableDiffusionImg2ImgPipeline, folder)
    return reference, reference.scheduler, load_ours(folder)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_matches_diffusers_on_sd15_config(sd15_pair, sampler):
    reference, original, ours = sd15_pair
    args = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=5.0, strength=0.75)
    got, expected = both(reference, original, ours.img2img, sampler, seed=5, image=picture(16, 24, seed=1), **args)
    compare(f"img2img sd15 {sampler}", got, expected)


@pytest.fixture(scope="module")
def sd15_inpaint_pair(tmp_path_factory):
    folder = save_sd_folder(tiny_sd_pipeline(in_channels=9), tmp_path_factory.mktemp("sd15-inpaint"))
    with_release_scheduler(folder, SD15)
    reference = load_diffusers(diffusers.StableDiffusionInpaintPipeline, folder)
    return reference, reference.scheduler, load_ours(folder)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_matches_diffusers_on_sd15_config(sd15_inpaint_pair, sampler, strength):
    reference, original, ours = sd15_inpaint_pair
    mask = np.zeros((16, 24), np.uint8)
    mask[4:12, 6:20] = 255
    args = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=5.0, strength=strength)
    image, mask = picture(16, 24, seed=2), Image.fromarray(mask)
    expected = swapped(reference, original, sampler, False)(
        image=image, mask_image=mask, height=16, width=24, generator=torch.Generator().manual_seed(7),
        output_type="np", **args).images
    got = ours.inpaint(image=image, mask_image=mask, paste_back=False, sampler=sampler, output_type="np",
                       generator=torch.Generator().manual_seed(7), progress=False, **args).images
    compare(f"inpaint sd15 {sampler} strength {strength}", got, expected)


# ---------------------------------------------------------------- upscale on x4-upscaler-style configs
# (the release's own files were not found: see tests/data/release_configs/README.md)
X4 = RELEASES / "x4-style-scheduler_config.json"
X4_LOW_RES = RELEASES / "x4-style-low_res_scheduler_config.json"


@pytest.fixture(scope="module")
def x4_pair(tmp_path_factory):
    folder = save_sd_folder(tiny_upscale_pipeline(), tmp_path_factory.mktemp("x4"))
    with_release_scheduler(folder, X4)
    with_release_scheduler(folder, X4_LOW_RES, subfolder="low_res_scheduler")
    reference = load_diffusers(diffusers.StableDiffusionUpscalePipeline, folder)
    return reference, reference.scheduler, load_ours(folder)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_upscale_matches_diffusers_on_x4_configs(x4_pair, sampler):
    reference, original, ours = x4_pair
    args = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=5.0,
                noise_level=40)
    got, expected = both(reference, original, ours.upscale, sampler, seed=9, image=picture(8, 12, seed=3), **args)
    compare(f"upscale x4 {sampler}", got, expected)


def test_x4_low_res_schedule_is_diffusers_ddpm(x4_pair):
    """Its config leaves beta_schedule out: DDPM's default, "linear", not SD's "scaled_linear"."""
    reference, _, ours = x4_pair
    assert torch.equal(ours.upscaler.low_res_schedule.alphas_cumprod, reference.low_res_scheduler.alphas_cumprod.float())
