"""Few-step sampling, equal to diffusers: LCM-distilled UNets (LatentConsistencyModelPipeline, guidance
through the UNet's embedding), LCMScheduler and TCDScheduler on an ordinary UNet (as with an LCM- or
TCD-LoRA), and Turbo-style Euler ancestral with trailing spacing and no guidance."""
import numpy as np
import pytest
import torch

import latentloom
from builders import save_sd_folder, tiny_lcm_pipeline, tiny_sd_pipeline


def swap(monkeypatch, reference, cls_name, **kwargs):
    """Give a shared diffusers pipeline another scheduler for one test (restored after it)."""
    import diffusers

    monkeypatch.setattr(reference, "scheduler", getattr(diffusers, cls_name).from_config(reference.scheduler.config,
                                                                                         **kwargs))


def close(got, expected, label):
    diff = np.abs(got - expected)
    print(f"{label}: mean abs diff {diff.mean():.1e}, max {diff.max():.1e}")
    assert got.shape == expected.shape and diff.mean() <= 1e-3 and diff.max() <= 1e-4


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    reference = tiny_lcm_pipeline()
    reference.set_progress_bar_config(disable=True)
    return reference, latentloom.load_pipeline(save_sd_folder(reference, tmp_path_factory.mktemp("lcm")),
                                               device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    reference = tiny_sd_pipeline()
    reference.set_progress_bar_config(disable=True)
    return reference, latentloom.load_pipeline(save_sd_folder(reference, tmp_path_factory.mktemp("sd")),
                                               device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_model_matches_latent_consistency_model_pipeline(lcm, steps):
    reference, ours = lcm
    args = dict(prompt=["a red circle", "two blue stars"], num_inference_steps=steps, guidance_scale=8.5,
                height=16, width=24)
    expected = reference(generator=torch.Generator().manual_seed(2), output_type="np", **args).images
    result = ours(**args, sampler="lcm", generator=torch.Generator().manual_seed(2), output_type="np",
                  progress=False)
    close(result.images, expected, f"lcm {steps} steps")
    assert result.recipes[0]["guidance_mode"] == "embedded"


def test_lcm_guidance_goes_into_the_embedding_in_one_call_per_step(lcm):
    _, ours = lcm
    calls = []
    original = ours.unet.forward

    def spy(x, t, context, **kw):
        calls.append((x.shape[0], kw.get("guidance")))
        return original(x, t, context, **kw)

    ours.unet.forward = spy
    try:
        ours("a red circle", num_inference_steps=3, guidance_scale=6.0, height=16, width=16, sampler="lcm", seed=0,
             progress=False)
    finally:
        del ours.unet.forward
    assert len(calls) == 3 and all(batch == 1 for batch, _ in calls)  # no CFG batch of 2
    assert all(float(g[0]) == 5.0 for _, g in calls)  # w = guidance_scale - 1


@pytest.mark.parametrize("sampler, scheduler, kwargs", [
    ("lcm", "LCMScheduler", {}),
    ("tcd", "TCDScheduler", {"eta": 0.3}),
    ("tcd", "TCDScheduler", {"eta": 0.0}),
])
def test_consistency_schedulers_on_an_ordinary_unet_match_diffusers(sd, sampler, scheduler, kwargs, monkeypatch):
    """As with an LCM- or TCD-LoRA merged into an SD model: guidance 1 (one call per step) or CFG."""
    reference, ours = sd
    swap(monkeypatch, reference, scheduler)
    for scale in (1.0, 1.5):
        args = dict(prompt="a red circle", num_inference_steps=4, guidance_scale=scale, height=16, width=16)
        expected = reference(generator=torch.Generator().manual_seed(5), output_type="np", **args, **kwargs).images
        result = ours(**args, **kwargs, sampler=sampler, generator=torch.Generator().manual_seed(5), output_type="np",
                      progress=False)
        close(result.images, expected, f"{sampler} {kwargs} guidance {scale}")
        assert result.recipes[0]["guidance_mode"] == ("none" if scale == 1.0 else "cfg")
        if sampler == "tcd":
            assert result.recipes[0]["eta"] == kwargs["eta"]


def test_lcm_timesteps_follow_the_teacher_grid():
    from latentloom.samplers.schedules import lcm_timesteps

    assert lcm_timesteps(1000, 4, 50).tolist() == [999, 759, 499, 259]
    assert lcm_timesteps(1000, 1, 50).tolist() == [999]
    with pytest.raises(ValueError, match="51 cannot exceed the 50 points of the teacher's grid"):
        lcm_timesteps(1000, 51, 50)
    assert lcm_timesteps(1000, 2, 50, strength=0.5).tolist() == [499, 259]  # the grid below 0.5 x T


def test_eta_belongs_to_tcd(sd):
    _, ours = sd
    with pytest.raises(ValueError, match="eta .* applies to sampler 'tcd', not 'euler'"):
        ours("a", sampler="euler", eta=0.3, num_inference_steps=2, height=16, width=16, progress=False)
    with pytest.raises(ValueError, match="eta"):
        ours("a", sampler="tcd", eta=1.5, num_inference_steps=2, height=16, width=16, progress=False)


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_style_euler_ancestral_with_trailing_spacing_and_no_guidance(sd, steps, monkeypatch):
    """SD-Turbo's recipe: EulerAncestralDiscreteScheduler with timestep_spacing="trailing", guidance 0 (one
    call per step); the spacing is this call's, over what the model folder says ("leading" here)."""
    reference, ours = sd
    swap(monkeypatch, reference, "EulerAncestralDiscreteScheduler", timestep_spacing="trailing")
    args = dict(prompt="a red circle", num_inference_steps=steps, guidance_scale=0.0, height=16, width=16)
    expected = reference(generator=torch.Generator().manual_seed(7), output_type="np", **args).images
    result = ours(**args, sampler="euler_a", timestep_spacing="trailing", generator=torch.Generator().manual_seed(7),
                  output_type="np", progress=False)
    close(result.images, expected, f"turbo {steps} steps")
    recipe = result.recipes[0]
    assert recipe["scheduler_config"]["timestep_spacing"] == "trailing" and recipe["guidance_mode"] == "none"
    leading = ours(**args, sampler="euler_a", generator=torch.Generator().manual_seed(7), output_type="np",
                   progress=False).images
    assert np.abs(leading - result.images).max() > 1e-3  # the spacing changed the schedule


@pytest.mark.parametrize("sampler", ["euler", "ddpm", "heun", "dpmpp_2m", "lcm", "tcd"])
def test_custom_timesteps_equal_diffusers_timesteps_argument(sd, sampler, monkeypatch):
    """Every diffusers scheduler that takes `timesteps=` gives the same image with ours."""
    from builders import DIFFUSERS_SCHEDULERS

    reference, ours = sd
    cls_name, extra = DIFFUSERS_SCHEDULERS[sampler]
    swap(monkeypatch, reference, cls_name, **extra)
    timesteps = [999, 759, 499, 259]
    # diffusers' pipeline passes its eta (default 0) to TCD's step
    args = dict(prompt="a red circle", guidance_scale=1.0, height=16, width=16, **({"eta": 0.3} if sampler == "tcd" else {}))
    expected = reference(timesteps=timesteps, generator=torch.Generator().manual_seed(3), output_type="np",
                         **args).images
    result = ours(**args, timesteps=timesteps, sampler=sampler, generator=torch.Generator().manual_seed(3),
                  output_type="np", progress=False)
    close(result.images, expected, f"{sampler} timesteps={timesteps}")
    assert result.recipes[0]["timesteps"] == timesteps and result.recipes[0]["num_inference_steps"] == 4


@pytest.mark.parametrize("sampler", ["euler", "euler-ending-above-0"])
def test_custom_sigmas_equal_diffusers_sigmas_argument(sd, sampler, monkeypatch):
    """diffusers' Euler `sigmas=`: the whole ladder, ending where sampling ends (0, or above it)."""
    reference, ours = sd
    swap(monkeypatch, reference, "EulerDiscreteScheduler")
    sigmas = [14.6, 6.0, 2.0, 0.5, 0.0] if sampler == "euler" else [14.6, 6.0, 2.0, 0.5]
    args = dict(prompt="a red circle", guidance_scale=1.0, height=16, width=16)
    expected = reference(sigmas=sigmas, generator=torch.Generator().manual_seed(3), output_type="np", **args).images
    got = ours(**args, sigmas=sigmas, sampler="euler", generator=torch.Generator().manual_seed(3), output_type="np",
               progress=False).images
    close(got, expected, f"{sampler} sigmas")


def test_custom_schedule_errors(sd):
    _, ours = sd
    args = dict(height=16, width=16, progress=False)
    for kwargs, match in (
        (dict(timesteps=[259, 999]), "strictly descending"),
        (dict(timesteps=[1200, 10]), r"timesteps must lie in \[0, 999\]"),
        (dict(timesteps=[999.5, 10]), "whole numbers"),
        (dict(timesteps=[999], sigmas=[1.0]), "not both"),
        (dict(timesteps=[999, 499], num_inference_steps=3), "num_inference_steps=3 but the timesteps give 2 steps"),
        (dict(sigmas=[14.0]), "at least 2 entries"),
        (dict(timesteps=[999, 499], karras_sigmas=True), "karras_sigmas and a custom"),
        (dict(timestep_spacing="middle"), "timestep_spacing must be one of"),
    ):
        with pytest.raises(ValueError, match=match):
            ours("a", **kwargs, **args)


def test_cli_few_step_flags_and_replay(sd, tmp_path):
    from PIL import Image

    from latentloom.cli import main as cli_main
    from latentloom.pipelines.metadata import read_metadata

    _, ours = sd
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    argv = ["generate", "a red circle", "--model", ours.name, "--sampler", "tcd", "--eta", "0.2", "--timesteps",
            "999,759,499,259", "--guidance", "1", "--height", "16", "--width", "16", "--seed", "1", "--dtype",
            "fp32", "--no-progress", "-o", str(first)]
    assert cli_main(argv) == 0
    recipe = read_metadata(first)
    assert recipe["sampler"] == "tcd" and recipe["eta"] == 0.2 and recipe["timesteps"] == [999, 759, 499, 259]
    direct = ours("a red circle", sampler="tcd", eta=0.2, timesteps=[999, 759, 499, 259], guidance_scale=1.0,
                  height=16, width=16, seed=1, progress=False).images[0]
    with Image.open(first) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(direct))
    assert cli_main(["generate", "--from", str(first), "--no-progress", "-o", str(second)]) == 0
    assert second.read_bytes() == first.read_bytes()
    assert cli_main(["generate", "a", "--model", ours.name, "--timestep-spacing", "trailing", "--sampler", "euler_a",
                     "--steps", "2", "--guidance", "0", "--height", "16", "--width", "16", "--dtype", "fp32",
                     "--no-progress", "-o", str(tmp_path / "c.png")]) == 0
    assert read_metadata(tmp_path / "c.png")["scheduler_config"]["timestep_spacing"] == "trailing"


LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "time_emb_proj", "conv_shortcut"]


def assert_lcm_lora_matches(reference, tmp_path, extra: dict, label: str):
    """An LCM-LoRA-shaped adapter (peft keys), saved by diffusers and fused there with LCMScheduler, merged
    here and sampled with lcm: the same image. Returns the merge report."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder = save_sd_folder(reference, tmp_path / "model")
    torch.manual_seed(11)
    reference.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=LCM_LORA_TARGETS, init_lora_weights=False))
    pipe_cls = type(reference)
    pipe_cls.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(reference.unet))
    fused = pipe_cls.from_pretrained(folder, **extra)
    fused.set_progress_bar_config(disable=True)
    fused.scheduler = diffusers.LCMScheduler.from_config(fused.scheduler.config)
    fused.load_lora_weights(tmp_path / "lora")
    fused.fuse_lora()
    args = dict(prompt="a red circle", num_inference_steps=4, guidance_scale=1.0, height=16, width=16)
    expected = fused(generator=torch.Generator().manual_seed(9), output_type="np", **args).images
    ours = latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)
    report = ours.load_lora(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert report.applied_keys == report.total_keys and not report.unmatched
    got = ours(**args, sampler="lcm", generator=torch.Generator().manual_seed(9), output_type="np",
               progress=False).images
    close(got, expected, label)
    return report


def test_lcm_lora_with_conv_and_feed_forward_layers_matches_diffusers(tmp_path):
    """SD 1.x: attention, proj_in / proj_out, feed-forward, ResBlock convs and time embedding projections."""
    report = assert_lcm_lora_matches(tiny_sd_pipeline(), tmp_path, {"safety_checker": None}, "lcm-lora")
    kinds = {m.rsplit(".", 1)[-1] for m in report.modules}
    assert {"proj_in", "proj_out", "conv1", "conv2", "time_emb_proj"} <= kinds


def test_sdxl_lcm_lora_matches_diffusers(tmp_path):
    from builders import tiny_sdxl_pipeline

    assert_lcm_lora_matches(tiny_sdxl_pipeline(), tmp_path, {"add_watermarker": False}, "sdxl lcm-lora")


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_turbo_style_sampling_matches_diffusers(tmp_path, steps):
    """SDXL-Turbo's recipe on an SDXL model: Euler ancestral, trailing spacing, guidance 0."""
    import diffusers

    from builders import tiny_sdxl_pipeline

    reference = tiny_sdxl_pipeline()
    reference.set_progress_bar_config(disable=True)
    ours = latentloom.load_pipeline(save_sd_folder(reference, tmp_path / "sdxl"), device="cpu", dtype=torch.float32)
    reference.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(reference.scheduler.config,
                                                                               timestep_spacing="trailing")
    args = dict(prompt="a red circle", num_inference_steps=steps, guidance_scale=0.0, height=16, width=16)
    expected = reference(generator=torch.Generator().manual_seed(4), output_type="np", **args).images
    got = ours(**args, sampler="euler_a", timestep_spacing="trailing", generator=torch.Generator().manual_seed(4),
               output_type="np", progress=False).images
    close(got, expected, f"sdxl turbo {steps} steps")


def test_lcm_img2img_matches_diffusers_img2img_pipeline_with_lcm_scheduler(sd, monkeypatch):
    """An LCM-LoRA in StableDiffusionImg2ImgPipeline: the strength keeps the tail of the lcm grid, as ours does.
    (diffusers' LatentConsistencyModelImg2ImgPipeline shrinks the grid instead; not matched.)"""
    import diffusers
    from PIL import Image

    reference, ours = sd
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**reference.components)
    img2img.set_progress_bar_config(disable=True)
    swap(monkeypatch, img2img, "LCMScheduler")
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    args = dict(prompt="a red circle", num_inference_steps=4, guidance_scale=1.0, strength=0.5)
    expected = img2img(image=image, generator=torch.Generator().manual_seed(2), output_type="np", **args).images
    got = ours.img2img(image=image, sampler="lcm", generator=torch.Generator().manual_seed(2), output_type="np",
                       progress=False, **args).images
    close(got, expected, "lcm img2img")


def test_lcm_model_img2img_matches_latent_consistency_img2img_pipeline(lcm):
    """An LCM-distilled model's img2img takes all its steps on the part of the teacher's grid below
    strength x T, as diffusers' LatentConsistencyModelImg2ImgPipeline does."""
    import diffusers
    from PIL import Image

    reference, ours = lcm
    img2img = diffusers.LatentConsistencyModelImg2ImgPipeline(**reference.components)
    img2img.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    args = dict(prompt="a red circle", num_inference_steps=4, guidance_scale=8.5, strength=0.6)
    expected = img2img(image=image, generator=torch.Generator().manual_seed(2), output_type="np", **args).images
    result = ours.img2img(image=image, sampler="lcm", generator=torch.Generator().manual_seed(2), output_type="np",
                          progress=False, **args)
    close(result.images, expected, "lcm model img2img")
    assert result.recipes[0]["num_inference_steps"] == 4


def test_kohya_lcm_lora_with_conv_layers_merges_like_the_peft_file(tmp_path):
    """The same LCM-LoRA in Kohya form (lora_unet_*, lora_down / lora_up, alpha; 3x3 conv adapters shaped
    (r, in, 3, 3) / (out, r, 1, 1)) merges to the same weights as in diffusers / peft form."""
    from safetensors.torch import load_file, save_file

    reference = tiny_sd_pipeline()
    assert_lcm_lora_matches(reference, tmp_path, {"safety_checker": None}, "lcm-lora")
    peft_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    kohya = {}
    for key, value in load_file(str(peft_file)).items():
        module, part = key.removeprefix("unet.").rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        # the peft file carries no alpha, so diffusers and latentloom both scale it by alpha = rank
        kohya[f"{name}.alpha"] = torch.tensor(float(value.shape[0] if part.startswith("A") else value.shape[1]))
    assert any(v.ndim == 4 and v.shape[-1] == 3 for v in kohya.values())  # conv adapters are there
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    folder = tmp_path / "model"
    a = latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)
    b = latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)
    report = a.load_lora(peft_file)
    kohya_report = b.load_lora(tmp_path / "kohya.safetensors")
    assert kohya_report.applied_keys == kohya_report.total_keys and sorted(kohya_report.modules) == sorted(report.modules)
    theirs = b.unet.state_dict()
    for key, value in a.unet.state_dict().items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("ldm_name", ["time_embedding.cond_proj.weight", "time_embed.cond_proj.weight"])
def test_lcm_single_file_matches_latent_consistency_model_pipeline(tmp_path, ldm_name):
    """An LCM-distilled model as a single file: its guidance embedding under the name diffusers'
    convert_diffusers_to_original_stable_diffusion.py leaves it (or the time_embed spelling of other
    converters) loads, and the file's defaults are the LCM pipeline's (lcm, 4 steps, w = 8.5)."""
    from safetensors.torch import load_file, save_file

    from builders import to_single_file
    from latentloom.unet import UNetConfig

    reference = tiny_lcm_pipeline(text_hidden=64)
    reference.set_progress_bar_config(disable=True)
    folder = save_sd_folder(reference, tmp_path / "folder")  # for its tokenizer
    path = to_single_file(reference, tmp_path / "lcm.safetensors")
    state = load_file(path)
    state["model.diffusion_model." + ldm_name] = state.pop("model.diffusion_model.time_embedding.cond_proj.weight")
    save_file(state, str(path))
    ours = latentloom.load_pipeline(path, device="cpu", dtype=torch.float32, tokenizer=folder,
                                    unet_config=UNetConfig.from_diffusers_config(dict(reference.unet.config)))
    assert (ours.defaults.sampler, ours.defaults.num_inference_steps, ours.defaults.guidance_scale) == ("lcm", 4, 8.5)
    args = dict(prompt=["a red circle", "two blue stars"], height=16, width=16)
    expected = reference(generator=torch.Generator().manual_seed(4), output_type="np", **args).images
    result = ours(**args, generator=torch.Generator().manual_seed(4), output_type="np", progress=False)
    close(result.images, expected, f"lcm single file ({ldm_name})")
    assert result.recipes[0]["guidance_mode"] == "embedded"


def test_ldm_config_inference_reads_the_guidance_embedding_width():
    from latentloom.unet import UNet, UNetConfig
    from latentloom.unet.convert import diffusers_to_ldm, infer_config_from_ldm_state_dict

    unet = UNet(UNetConfig.tiny(channels=(32, 64), norm_groups=32, time_cond_proj_dim=24))
    state = diffusers_to_ldm(unet.to_diffusers_state_dict(), unet.config)
    assert "time_embedding.cond_proj.weight" in state
    assert infer_config_from_ldm_state_dict(state).time_cond_proj_dim == 24
    del state["time_embedding.cond_proj.weight"]
    assert infer_config_from_ldm_state_dict(state).time_cond_proj_dim is None


def test_lcm_single_file_with_both_spellings_is_an_error():
    from latentloom.unet.convert import ldm_to_diffusers
    from latentloom.unet import UNetConfig

    weight = torch.zeros(32, 16)
    state = {"time_embedding.cond_proj.weight": weight, "time_embed.cond_proj.weight": weight}
    with pytest.raises(ValueError, match="names 'time_embedding.cond_proj.weight' twice"):
        ldm_to_diffusers(state, UNetConfig.tiny(time_cond_proj_dim=16))


def test_lcm_folder_defaults_to_the_lcm_pipeline_call(lcm):
    _, ours = lcm
    assert (ours.defaults.sampler, ours.defaults.num_inference_steps, ours.defaults.guidance_scale) == ("lcm", 4, 8.5)
