"""Recipes record the scheduler settings a call resolved, so `generate --from` replays them exactly,
on a folder whose scheduler_config.json is a release's (keys left out); older recipes, which
recorded none, replay with the fill-ins latentloom used when they were made."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import latentloom
from builders import DATA, save_sd_folder, tiny_sd_pipeline
from latentloom.cli import main as cli_main
from latentloom.pipelines.metadata import read_metadata, save_png

SD15 = DATA / "release_configs" / "sd15-scheduler_config.json"
ARGS = ["--steps", "4", "--height", "16", "--width", "16", "--guidance", "5", "--dtype", "fp32", "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = save_sd_folder(tiny_sd_pipeline(), tmp_path_factory.mktemp("sd15"))
    shutil.copyfile(SD15, folder / "scheduler" / "scheduler_config.json")
    return folder


@pytest.fixture(scope="module")
def pipe(folder):
    return latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def first(folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("made") / "first.png"
    assert cli_main(["generate", "a red circle", "--model", str(folder), "--sampler", "euler_a", "--seed", "5",
                     *ARGS, "-o", str(path)]) == 0
    return path


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_recipe_records_the_resolved_settings(first, pipe):
    recorded = read_metadata(first)["scheduler_config"]
    assert recorded["timestep_spacing"] == "linspace"  # Euler a's default: SD 1.5's config states none
    assert recorded == pipe.schedule_config.for_sampler("euler_a").settings()
    ddim = pipe("a circle", sampler="ddim", seed=0, num_inference_steps=2, height=16, width=16, progress=False)
    assert ddim.recipes[0]["scheduler_config"]["timestep_spacing"] == "leading"
    assert ddim.recipes[0]["scheduler_config"]["steps_offset"] == 1


def test_generate_from_recreates_the_png_byte_for_byte(first, tmp_path):
    second = tmp_path / "second.png"
    assert cli_main(["generate", "--from", str(first), "--no-progress", "-o", str(second)]) == 0
    assert second.read_bytes() == first.read_bytes()


def test_an_older_recipe_replays_with_the_old_fill_ins(first, pipe, tmp_path):
    """Before this rule a left-out timestep_spacing was latentloom's "leading" (steps_offset 1) for
    every sampler; a recipe written then carries no scheduler_config and must replay that way."""
    recipe = read_metadata(first)
    old = {k: v for k, v in recipe.items() if k != "scheduler_config"}
    with Image.open(first) as image:
        old_png = save_png(image.copy(), tmp_path / "old.png", old)
    replayed = tmp_path / "replayed.png"
    assert cli_main(["generate", "--from", str(old_png), "--no-progress", "-o", str(replayed)]) == 0
    legacy = pipe("a red circle", sampler="euler_a", seed=5, num_inference_steps=4, height=16, width=16,
                  guidance_scale=5.0, progress=False, scheduler_config={"timestep_spacing": "leading"}).images[0]
    assert np.array_equal(pixels(replayed), np.asarray(legacy))
    assert not np.array_equal(pixels(replayed), pixels(first))
    assert read_metadata(replayed)["scheduler_config"]["timestep_spacing"] == "leading"


def test_from_with_another_sampler_resolves_that_samplers_settings(first, pipe, tmp_path):
    out = tmp_path / "ddim.png"
    assert cli_main(["generate", "--from", str(first), "--sampler", "ddim", "--no-progress", "-o", str(out)]) == 0
    expected = pipe("a red circle", sampler="ddim", seed=5, num_inference_steps=4, height=16, width=16,
                    guidance_scale=5.0, progress=False).images[0]
    assert np.array_equal(pixels(out), np.asarray(expected))
    assert read_metadata(out)["scheduler_config"]["timestep_spacing"] == "leading"


def test_scheduler_config_argument_is_checked(pipe):
    call = dict(num_inference_steps=2, height=16, width=16, progress=False)
    with pytest.raises(ValueError, match=r"unknown scheduler settings \['spacing'\]"):
        pipe("a circle", scheduler_config={"spacing": "linspace"}, **call)
    with pytest.raises(TypeError, match="scheduler_config must be a dict"):
        pipe("a circle", scheduler_config="linspace", **call)
    with pytest.raises(ValueError, match="num_train_timesteps 500 does not match this model's 1000"):
        pipe("a circle", scheduler_config={"num_train_timesteps": 500}, **call)


def test_clip_sample_left_out_clamps_ddim_as_diffusers(folder, tmp_path):
    """A config without clip_sample: DDIM and DDPM clamp x0 to [-1, 1] (their class default)."""
    import diffusers

    data = json.loads(SD15.read_text())
    del data["clip_sample"]
    (folder_no_clip := tmp_path / "noclip").mkdir()
    shutil.copytree(folder, folder_no_clip, dirs_exist_ok=True)
    (folder_no_clip / "scheduler" / "scheduler_config.json").write_text(json.dumps(data))
    ours = latentloom.load_pipeline(folder_no_clip, device="cpu", dtype=torch.float32)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder_no_clip, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    args = dict(prompt="a red circle", num_inference_steps=4, guidance_scale=5.0, height=16, width=16)
    for sampler, cls in (("ddim", diffusers.DDIMScheduler), ("ddpm", diffusers.DDPMScheduler),
                         ("heun", diffusers.HeunDiscreteScheduler)):
        reference.scheduler = cls.from_config(reference.scheduler.config)
        expected = reference(generator=torch.Generator().manual_seed(1), output_type="np", **args).images
        got = ours(**args, sampler=sampler, generator=torch.Generator().manual_seed(1), output_type="np",
                   progress=False).images
        assert np.abs(got - expected).max() <= 1e-4, sampler
        if sampler != "heun":  # the clamp matters on these weights, so the check above can fail
            unclipped = ours(**args, sampler=sampler, generator=torch.Generator().manual_seed(1), output_type="np",
                             progress=False, scheduler_config={"clip_sample": False}).images
            assert np.abs(unclipped - expected).max() > 1e-3, sampler
    assert ours.schedule_config.for_sampler("ddim").clip_sample
    assert not ours.schedule_config.for_sampler("heun").clip_sample
