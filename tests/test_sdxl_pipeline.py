"""SDXL text to image on a folder diffusers saved gives diffusers' images (StableDiffusionXLPipeline,
add_watermarker=False): samplers, negative prompts and forced zeros, prompt_2, micro-conditioning."""
import numpy as np
import pytest
import torch

import latentloom
from builders import save_sd_folder, tiny_sdxl_pipeline, tiny_sdxl_refiner, use_scheduler


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    folder = save_sd_folder(pipe, tmp_path_factory.mktemp("sdxl"))
    return pipe, latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)


def compare(reference, ours, sampler, **args):
    use_scheduler(reference, sampler)
    expected = reference(generator=torch.Generator().manual_seed(4), output_type="np", **args).images
    got = ours(**args, sampler=sampler, generator=torch.Generator().manual_seed(4), output_type="np",
               progress=False).images
    diff = np.abs(got - expected)
    print(f"sdxl {sampler}: mean abs diff {diff.mean():.1e}, max {diff.max():.1e}")
    assert got.shape == expected.shape and diff.mean() <= 1e-3 and diff.max() <= 1e-4
    return got


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_same_images_as_diffusers(sdxl, sampler):
    reference, ours = sdxl
    compare(reference, ours, sampler, prompt=["a red circle", "two blue stars"], num_inference_steps=4,
            guidance_scale=5.0, height=16, width=24)


def test_guidance_rescale_karras_sigmas_and_vae_tiling_match_diffusers(tmp_path):
    """SDXL with CFG rescale, Karras sigmas and a tiled VAE decode (2 x 2 tiles) gives diffusers' image."""
    reference = tiny_sdxl_pipeline(seed=1)
    reference.vae.register_to_config(sample_size=16)  # 16 px tiles: a 32 px image spans 2 x 2
    reference.set_progress_bar_config(disable=True)
    ours = latentloom.load_pipeline(save_sd_folder(reference, tmp_path / "sdxl"), device="cpu", dtype=torch.float32)
    use_scheduler(reference, "dpmpp_2m")
    reference.scheduler = type(reference.scheduler).from_config(reference.scheduler.config, use_karras_sigmas=True)
    reference.vae.enable_tiling()
    args = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=5, guidance_scale=6.0,
                guidance_rescale=0.7, height=32, width=32)
    expected = reference(generator=torch.Generator().manual_seed(3), output_type="np", **args).images
    got = ours(**args, sampler="dpmpp_2m", karras_sigmas=True, vae_tiling=True, output_type="np",
               generator=torch.Generator().manual_seed(3), progress=False).images
    untiled = ours(**args, sampler="dpmpp_2m", karras_sigmas=True, vae_tiling=False, output_type="np",
                   generator=torch.Generator().manual_seed(3), progress=False).images
    diff = np.abs(got - expected)
    print(f"sdxl rescale + karras + tiling: mean abs diff {diff.mean():.1e}, max {diff.max():.1e}")
    assert diff.mean() <= 1e-3 and diff.max() <= 1e-4
    assert np.abs(untiled - got).max() > 1e-3  # the tiles were really decoded apart


@pytest.mark.parametrize("negative", [None, "blurry"], ids=["forced-zeros", "negative"])
def test_negative_prompt_and_forced_zeros(sdxl, negative):
    reference, ours = sdxl
    compare(reference, ours, "euler_a", prompt="a red circle", negative_prompt=negative, num_inference_steps=4,
            guidance_scale=6.0, height=16, width=16)


def test_second_prompts_and_micro_conditioning(sdxl):
    reference, ours = sdxl
    args = dict(prompt="a red circle", prompt_2="a watercolor", negative_prompt="blurry", negative_prompt_2="dark",
                num_inference_steps=4, guidance_scale=5.0, height=16, width=16, original_size=(512, 384),
                crops_coords_top_left=(8, 16), target_size=(1024, 1024), negative_original_size=(256, 256),
                negative_crops_coords_top_left=(0, 4), negative_target_size=(512, 512))
    got = compare(reference, ours, "dpmpp_2m", **args)
    plain = ours(**{k: v for k, v in args.items() if "size" not in k and "crops" not in k}, sampler="dpmpp_2m",
                 generator=torch.Generator().manual_seed(4), output_type="np", progress=False).images
    assert np.abs(plain - got).max() > 1e-3  # the numbers reach the UNet


def test_recipe_records_the_sdxl_arguments_and_defaults(sdxl):
    _, ours = sdxl
    assert (ours.defaults.height, ours.defaults.width) == (16, 16)  # sample size 8 x the tiny VAE's factor 2
    recipe = ours("a red circle", prompt_2="a watercolor", seed=1, num_inference_steps=2, height=16, width=24,
                  crops_coords_top_left=(4, 0), progress=False).recipes[0]
    assert recipe["prompt_2"] == "a watercolor" and recipe["original_size"] == [16, 24]
    assert recipe["crops_coords_top_left"] == [4, 0] and recipe["negative_crops_coords_top_left"] == [4, 0]
    assert "aesthetic_score" not in recipe


def test_sdxl_arguments_are_refused_by_other_models(pipe):
    with pytest.raises(ValueError, match="micro-conditioning; this model"):
        pipe("a circle", original_size=(64, 64), num_inference_steps=1, height=16, width=16, progress=False)
    with pytest.raises(ValueError, match="prompt_2 / negative_prompt_2 are for SDXL"):
        pipe("a circle", prompt_2="x", num_inference_steps=1, height=16, width=16, progress=False)


def test_cli_makes_an_sdxl_image_and_generate_from_remakes_it_byte_for_byte(sdxl, tmp_path):
    from latentloom.cli import main as cli_main
    from latentloom.pipelines.metadata import read_metadata

    _, ours = sdxl
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    argv = ["generate", "a red circle", "--model", ours.name, "--prompt-2", "a watercolor", "--original-size", "64",
            "48", "--negative-target-size", "32", "32", "--steps", "2", "--height", "16", "--width", "16", "--seed",
            "3", "--dtype", "fp32", "--no-progress", "-o", str(first)]
    assert cli_main(argv) == 0
    recipe = read_metadata(first)
    assert recipe["original_size"] == [64, 48] and recipe["negative_target_size"] == [32, 32]
    assert cli_main(["generate", "--from", str(first), "--no-progress", "-o", str(second)]) == 0
    assert second.read_bytes() == first.read_bytes()


def picture(h, w, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m"])
def test_img2img_matches_diffusers(sdxl, sampler):
    import diffusers

    reference, ours = sdxl
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=reference.vae, text_encoder=reference.text_encoder, tokenizer=reference.tokenizer,
        text_encoder_2=reference.text_encoder_2, tokenizer_2=reference.tokenizer_2, unet=reference.unet,
        scheduler=reference.scheduler, requires_aesthetics_score=False, force_zeros_for_empty_prompt=True,
        add_watermarker=False)
    img2img.set_progress_bar_config(disable=True)
    use_scheduler(img2img, sampler)
    args = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=5, guidance_scale=5.0,
                strength=0.6, original_size=(64, 64), crops_coords_top_left=(0, 8))
    image = picture(16, 24, seed=1)
    expected = img2img(image=image, generator=torch.Generator().manual_seed(2), output_type="np", **args).images
    got = ours.img2img(image=image, sampler=sampler, generator=torch.Generator().manual_seed(2), output_type="np",
                       progress=False, **args).images
    diff = np.abs(got - expected)
    print(f"sdxl img2img {sampler}: mean abs diff {diff.mean():.1e}, max {diff.max():.1e}")
    assert diff.mean() <= 1e-3 and diff.max() <= 1e-4


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    pipe = tiny_sdxl_refiner()
    pipe.set_progress_bar_config(disable=True)
    folder = save_sd_folder(pipe, tmp_path_factory.mktemp("refiner"))
    return pipe, latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("scores", [{}, {"aesthetic_score": 7.5, "negative_aesthetic_score": 1.0}],
                         ids=["default-scores", "scores"])
def test_refiner_img2img_matches_diffusers(refiner, scores):
    reference, ours = refiner
    assert ours.text_encoder.encoder_1 is None
    args = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0,
                strength=0.5, **scores)
    image = picture(16, 16, seed=2)
    use_scheduler(reference, "euler")
    expected = reference(image=image, generator=torch.Generator().manual_seed(5), output_type="np", **args).images
    result = ours.img2img(image=image, sampler="euler", generator=torch.Generator().manual_seed(5),
                          output_type="np", progress=False, **args)
    diff = np.abs(result.images - expected)
    print(f"refiner img2img: mean abs diff {diff.mean():.1e}, max {diff.max():.1e}")
    assert diff.mean() <= 1e-3 and diff.max() <= 1e-4
    assert result.recipes[0]["aesthetic_score"] == scores.get("aesthetic_score", 6.0)
    assert "target_size" not in result.recipes[0]


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m", "unipc", "heun"])
def test_base_to_refiner_handoff_matches_diffusers_ensemble_of_experts(sdxl, refiner, sampler):
    """denoising_end=0.8 on the base (latents out), denoising_start=0.8 on the refiner's img2img."""
    base_ref, base = sdxl
    refiner_ref, refiner_ours = refiner
    use_scheduler(base_ref, sampler)
    use_scheduler(refiner_ref, sampler)
    common = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=10, guidance_scale=5.0)
    their_latents = base_ref(height=16, width=16, denoising_end=0.8, output_type="latent",
                             generator=torch.Generator().manual_seed(8), **common).images
    expected = refiner_ref(image=their_latents, denoising_start=0.8, output_type="np",
                           generator=torch.Generator().manual_seed(9), **common).images
    our_latents = base(height=16, width=16, denoising_end=0.8, output_type="latent", sampler=sampler,
                       generator=torch.Generator().manual_seed(8), progress=False, **common).images
    torch.testing.assert_close(our_latents, their_latents, rtol=0, atol=1e-4)
    result = refiner_ours.img2img(image=our_latents, denoising_start=0.8, sampler=sampler, output_type="np",
                                  generator=torch.Generator().manual_seed(9), progress=False, **common)
    diff = np.abs(result.images - expected)
    print(f"hand-off {sampler}: mean abs diff {diff.mean():.3e}, max {diff.max():.3e}, {result.images.mean():.6f}")
    assert diff.mean() <= 1e-3 and diff.max() <= 1e-4
    assert result.recipes[0]["denoising_start"] == 0.8 and len(result.recipes[0]["latents_hash"]) == 10


def test_handoff_arguments_are_checked(sdxl, refiner):
    _, base = sdxl
    _, refiner_ours = refiner
    with pytest.raises(ValueError, match="denoising_end must be strictly between 0 and 1, got 1.0"):
        base("a", denoising_end=1.0, num_inference_steps=2, height=16, width=16, progress=False)
    with pytest.raises(ValueError, match=r"image must be the latents a base model returned \(B, 4, h, w\)"):
        refiner_ours.img2img("a", image=picture(16, 16), denoising_start=0.8, num_inference_steps=4, progress=False)


def test_cli_refiner_handoff_and_its_replay(sdxl, refiner, tmp_path):
    from PIL import Image

    from latentloom.cli import main as cli_main
    from latentloom.pipelines.handoff import generate_with_refiner
    from latentloom.pipelines.metadata import read_metadata

    _, base = sdxl
    _, refiner_ours = refiner
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    argv = ["generate", "a red circle", "--model", base.name, "--refiner", refiner_ours.name, "--refiner-start", "0.7",
            "--sampler", "euler_a", "--steps", "10", "--height", "16", "--width", "16", "--seed", "3", "--dtype",
            "fp32", "--no-progress", "-o", str(first)]
    assert cli_main(argv) == 0
    recipe = read_metadata(first)
    assert recipe["refiner"] == refiner_ours.name and recipe["refiner_start"] == 0.7 and "denoising_end" not in recipe
    direct = generate_with_refiner(base, refiner_ours, "a red circle", refiner_start=0.7, seed=3, sampler="euler_a",
                                   num_inference_steps=10, height=16, width=16, progress=False)
    with Image.open(first) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(direct.images[0]))
    assert cli_main(["generate", "--from", str(first), "--no-progress", "-o", str(second)]) == 0
    assert second.read_bytes() == first.read_bytes()


@pytest.mark.parametrize("channels, sampler, strength", [
    (9, "ddim", 1.0), (9, "euler_a", 0.7), (9, "dpmpp_2m", 1.0),
    (4, "ddim", 1.0), (4, "euler", 0.7), (4, "euler_a", 1.0), (4, "dpmpp_2m", 0.7), (4, "unipc", 1.0)])
def test_inpaint_matches_diffusers(tmp_path, channels, sampler, strength):
    """9 channels: the mask and masked image concatenated; 4 (any SDXL UNet): diffusers re-noises the
    known region after each step, which `InpaintBlend` matches without paste-back."""
    from PIL import Image

    from builders import tiny_sdxl_inpaint_pipeline

    reference = tiny_sdxl_inpaint_pipeline(in_channels=channels)
    reference.set_progress_bar_config(disable=True)
    ours = latentloom.load_pipeline(save_sd_folder(reference, tmp_path / "inpaint"), device="cpu",
                                    dtype=torch.float32)
    use_scheduler(reference, sampler)
    mask = np.zeros((16, 24), np.uint8)
    mask[4:12, 6:20] = 255
    args = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0,
                strength=strength, crops_coords_top_left=(0, 8))
    image, mask = picture(16, 24, seed=3), Image.fromarray(mask)
    expected = reference(image=image, mask_image=mask, height=16, width=24, output_type="np",
                         generator=torch.Generator().manual_seed(6), **args).images
    got = ours.inpaint(image=image, mask_image=mask, paste_back=False, sampler=sampler, output_type="np",
                       generator=torch.Generator().manual_seed(6), progress=False, **args).images
    diff = np.abs(got - expected)
    print(f"sdxl {channels}-channel inpaint {sampler} strength {strength}: mean abs diff {diff.mean():.1e}, max {diff.max():.1e}")
    assert diff.mean() <= 1e-3 and diff.max() <= 1e-4


def test_four_channel_sdxl_inpaint_keeps_the_known_region(sdxl):
    """With paste-back (the default), outside the mask the original pixels, inside a new painting."""
    from PIL import Image

    _, ours = sdxl
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    image = picture(16, 16, seed=4)
    out = ours.inpaint("a red circle", image=image, mask_image=Image.fromarray(mask), seed=1, num_inference_steps=4,
                       original_size=(32, 32), progress=False).images[0]
    before, after = np.asarray(image), np.asarray(out)
    assert np.array_equal(after[mask == 0], before[mask == 0])
    assert np.abs(after[mask > 0].astype(int) - before[mask > 0]).mean() > 5


def test_kohya_sdxl_lora_merges_into_the_unet_and_both_text_encoders(tmp_path):
    """An SDXL LoRA in Kohya form (lora_unet_*, lora_te1_*, lora_te2_*) made from known deltas: every key is
    applied and each weight becomes W + scale * alpha / rank * up @ down."""
    from safetensors.torch import save_file

    reference = tiny_sdxl_pipeline(seed=1)
    ours = latentloom.load_pipeline(save_sd_folder(reference, tmp_path / "sdxl"), device="cpu", dtype=torch.float32)
    targets = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (
            ours.unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (
            ours.text_encoder.encoder_1.model, "text_model.encoder.layers.0.self_attn.q_proj"),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1": (
            ours.text_encoder.encoder_2.model, "text_model.encoder.layers.1.mlp.fc1"),
    }
    g = torch.Generator().manual_seed(0)
    tensors, expected = {}, {}
    rank, alpha, scale = 2, 1.0, 0.5
    def module(model, name):  # transformers 5 drops the text_model. prefix of CLIPTextModel's modules
        modules = dict(model.named_modules())
        return modules.get(name) or modules[name.removeprefix("text_model.")]

    for key, (model, name) in targets.items():
        weight = module(model, name).weight
        down, up = torch.randn(rank, weight.shape[1], generator=g), torch.randn(weight.shape[0], rank, generator=g)
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(alpha)})
        expected[key] = weight.detach().clone() + scale * alpha / rank * (up @ down)
    path = tmp_path / "sdxl_lora.safetensors"
    save_file(tensors, str(path))
    before = ours.text_encoder.encode(["a red circle"]).hidden.clone()
    report = ours.load_lora(path, scale=scale)
    assert report.applied_keys == report.total_keys == 9 and not report.unmatched
    for key, (model, name) in targets.items():
        torch.testing.assert_close(module(model, name).weight, expected[key], rtol=0, atol=1e-6)
    assert not torch.equal(ours.text_encoder.encode(["a red circle"]).hidden, before)  # no stale cache


def test_single_file_sdxl_gives_the_folders_images(tmp_path):
    """An original single-file SDXL checkpoint (sgm's conditioner.embedders keys) made from a folder's weights
    loads into the same model and makes the same images; its tokenizers come from tokenizer=<SDXL folder>."""
    from builders import to_sdxl_single_file
    from latentloom.unet import UNetConfig

    reference = tiny_sdxl_pipeline(seed=2, text_hidden=64)
    folder = save_sd_folder(reference, tmp_path / "folder")
    path = to_sdxl_single_file(reference, tmp_path / "sdxl.safetensors")
    from_folder = latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)
    from_file = latentloom.load_pipeline(path, device="cpu", dtype=torch.float32, tokenizer=folder,
                                         unet_config=UNetConfig.from_diffusers_config(dict(reference.unet.config)))
    assert from_file.text_encoder.force_zeros_for_empty_prompt and from_file.vae.config.scaling_factor == 0.13025
    assert (from_file.defaults.height, from_file.defaults.width) == (1024, 1024)
    for a, b in ((from_file.text_encoder.encoder_1.model, from_folder.text_encoder.encoder_1.model),
                 (from_file.text_encoder.encoder_2.model, from_folder.text_encoder.encoder_2.model)):
        theirs = b.state_dict()
        for key, value in a.state_dict().items():
            assert torch.equal(value, theirs[key]), key
    args = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0,
                height=16, width=16, sampler="euler_a", output_type="np", progress=False, original_size=(64, 64))
    got = from_file(**args, generator=torch.Generator().manual_seed(1)).images
    expected = from_folder(**args, generator=torch.Generator().manual_seed(1)).images
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="does not contain its tokenizers"):
        latentloom.load_pipeline(path, device="cpu", unet_config=from_file.unet.config)


def test_cli_img2img_takes_the_sdxl_options(sdxl, tmp_path):
    from latentloom.cli import main as cli_main
    from latentloom.pipelines.metadata import read_metadata

    _, ours = sdxl
    picture(16, 16, seed=5).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert cli_main(["img2img", "a red circle", "--image", str(tmp_path / "in.png"), "--model", ours.name,
                     "--prompt-2", "a watercolor", "--original-size", "64", "32", "--steps", "2", "--seed", "1",
                     "--dtype", "fp32", "--no-progress", "-o", str(out)]) == 0
    recipe = read_metadata(out)
    assert recipe["prompt_2"] == "a watercolor" and recipe["original_size"] == [64, 32]
    expected = ours.img2img("a red circle", image=picture(16, 16, seed=5), prompt_2="a watercolor",
                            original_size=(64, 32), num_inference_steps=2, seed=1, progress=False).images[0]
    from PIL import Image

    with Image.open(out) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))


def test_prompts_file_run_takes_the_sdxl_options_and_the_refiner(sdxl, refiner, tmp_path):
    """`generate --prompts` passes --prompt-2, the micro-conditioning and --refiner to every image (a JSONL
    line may set its own prompt_2), records them, and a rerun with other SDXL options is refused."""
    import json

    from PIL import Image

    from latentloom.cli import main as cli_main
    from latentloom.pipelines.handoff import generate_with_refiner
    from latentloom.pipelines.metadata import read_metadata

    _, base = sdxl
    _, refiner_ours = refiner
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle"}) + "\n"
                       + json.dumps({"prompt": "two blue stars", "prompt_2": "an oil painting"}) + "\n")
    out = tmp_path / "run"
    argv = ["generate", "--prompts", str(prompts), "--output-dir", str(out), "--model", base.name, "--refiner",
            refiner_ours.name, "--refiner-start", "0.7", "--prompt-2", "a watercolor", "--original-size", "512", "384",
            "--sampler", "euler_a", "--steps", "10", "--height", "16", "--width", "16", "--seed", "3", "--dtype",
            "fp32", "--no-progress"]
    assert cli_main(argv) == 0
    for index, prompt_2 in ((0, "a watercolor"), (1, "an oil painting")):
        recipe = read_metadata(out / f"{index:06d}.png")
        assert recipe["prompt_2"] == prompt_2 and recipe["original_size"] == [512, 384]
        assert recipe["refiner"] == refiner_ours.name and recipe["refiner_start"] == 0.7
    direct = generate_with_refiner(base, refiner_ours, "two blue stars", refiner_start=0.7, seed=4, sampler="euler_a",
                                   num_inference_steps=10, height=16, width=16, prompt_2="an oil painting",
                                   original_size=(512, 384), progress=False)
    with Image.open(out / "000001.png") as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(direct.images[0]))
    assert cli_main(argv) == 0  # a rerun keeps both images
    changed = [a if a != "384" else "256" for a in argv]
    assert cli_main(changed) == 2
    assert cli_main([a for a in argv if a not in ("--refiner", refiner_ours.name)]) == 2  # refiner_start alone


def test_fp16_keeps_an_upcast_sdxl_vae_in_fp32_and_reads_its_scaling_factor(tmp_path):
    """SDXL's published VAE says force_upcast (its fp16 decode overflows): an fp16 pipeline keeps it in fp32,
    as diffusers' upcast does, and bf16 (fp32's range) does not; the latents are scaled by its 0.13025."""
    reference = tiny_sdxl_pipeline()
    reference.set_progress_bar_config(disable=True)
    reference.vae.register_to_config(force_upcast=True)
    folder = save_sd_folder(reference, tmp_path / "sdxl")
    half = latentloom.load_pipeline(folder, device="cpu", dtype="fp16")
    assert next(half.unet.parameters()).dtype == torch.float16
    assert next(half.vae.parameters()).dtype == torch.float32 and half.vae.config.scaling_factor == 0.13025
    brain = latentloom.load_pipeline(folder, device="cpu", dtype="bf16")
    assert next(brain.vae.parameters()).dtype == torch.bfloat16
    use_scheduler(reference, "euler")
    reference.to(torch.float16)
    args = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=5.0, height=16, width=16)
    expected = reference(generator=torch.Generator().manual_seed(4), output_type="np", **args).images
    assert next(reference.vae.parameters()).dtype == torch.float16  # diffusers casts it back after decoding
    got = half(**args, sampler="euler", generator=torch.Generator().manual_seed(4), output_type="np",
               progress=False).images
    diff = np.abs(got - expected)
    print(f"sdxl fp16: mean abs diff {diff.mean():.1e}, max {diff.max():.1e}")
    assert np.isfinite(got).all() and diff.mean() <= 1e-3


def test_single_file_refiner_and_inpainting_give_their_folders_images(tmp_path):
    """Original single files of the refiner (bigG alone as conditioner.embedders.0, aesthetic scores) and of
    9-channel SDXL inpainting, made from a folder's weights, make the folder's images. (Text towers 64 wide:
    a single file's heads are inferred as width / 64, as in the releases.)"""
    from PIL import Image

    from builders import tiny_sdxl_inpaint_pipeline, to_sdxl_single_file
    from latentloom.unet import UNetConfig

    reference = tiny_sdxl_refiner(text_hidden=64)
    folder = save_sd_folder(reference, tmp_path / "refiner")
    from_folder = latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)
    path = to_sdxl_single_file(reference, tmp_path / "refiner.safetensors")
    from_file = latentloom.load_pipeline(path, device="cpu", dtype=torch.float32, tokenizer=folder,
                                         unet_config=UNetConfig.from_diffusers_config(dict(reference.unet.config)))
    assert from_file.text_encoder.encoder_1 is None and not from_file.text_encoder.force_zeros_for_empty_prompt
    args = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0,
                strength=0.5, sampler="euler", output_type="np", progress=False, aesthetic_score=7.0)
    image = picture(16, 16, seed=2)
    got = from_file.img2img(image=image, generator=torch.Generator().manual_seed(5), **args)
    expected = from_folder.img2img(image=image, generator=torch.Generator().manual_seed(5), **args)
    np.testing.assert_allclose(got.images, expected.images, rtol=0, atol=1e-5)
    assert got.recipes[0]["aesthetic_score"] == 7.0

    inpainting = tiny_sdxl_inpaint_pipeline(in_channels=9, text_hidden=64)
    folder = save_sd_folder(inpainting, tmp_path / "inpaint")
    path = to_sdxl_single_file(inpainting, tmp_path / "inpaint.safetensors")
    from_folder = latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)
    from_file = latentloom.load_pipeline(path, device="cpu", dtype=torch.float32, tokenizer=folder,
                                         unet_config=UNetConfig.from_diffusers_config(dict(inpainting.unet.config)))
    assert from_file.unet.config.in_channels == 9
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 2:10] = 255
    args = dict(prompt="a red circle", image=picture(16, 16, seed=3), mask_image=Image.fromarray(mask),
                num_inference_steps=4, guidance_scale=5.0, sampler="dpmpp_2m", output_type="np", progress=False)
    got = from_file.inpaint(generator=torch.Generator().manual_seed(2), **args).images
    expected = from_folder.inpaint(generator=torch.Generator().manual_seed(2), **args).images
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_sdxl_call_defaults_follow_diffusers_sdxl_pipeline(sdxl):
    """Left out, guidance is diffusers' SDXL default (5.0), so the same call without it gives its image."""
    reference, ours = sdxl
    assert ours.defaults.guidance_scale == 5.0
    use_scheduler(reference, "euler")
    expected = reference(prompt="a red circle", num_inference_steps=3, height=16, width=16, output_type="np",
                         generator=torch.Generator().manual_seed(2)).images
    got = ours(prompt="a red circle", num_inference_steps=3, height=16, width=16, sampler="euler", output_type="np",
               generator=torch.Generator().manual_seed(2), progress=False).images
    assert np.abs(got - expected).max() <= 1e-4


def test_text_encoders_are_released_after_encoding_and_read_back_for_a_new_prompt(sdxl, monkeypatch):
    """release_text_encoders: the encoders' weights are freed once a call's prompts are encoded (the
    UNet and VAE then run without them), read back from their files for a prompt not in the cache,
    and the images do not change; by default only where the model takes over half of the RAM."""
    from latentloom.pipelines import runtime

    reference, kept = sdxl
    folder = kept.name
    pipe = latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)
    encoders = pipe.text_encoder.encoders
    reads = []
    for encoder in encoders:
        original = encoder.reload
        encoder.reload = lambda original=original: reads.append(1) or original()
    args = dict(num_inference_steps=2, guidance_scale=5.0, height=16, width=16, seed=3, output_type="np",
                progress=False)
    monkeypatch.setattr(runtime, "physical_memory_bytes", lambda: 10**15)
    assert not pipe.releases_text_encoders()  # a tiny model on any machine: kept
    monkeypatch.setattr(runtime, "physical_memory_bytes", lambda: 1000)
    assert pipe.releases_text_encoders()  # "over half the RAM"
    first = pipe("a red circle", **args).images
    assert all(e.released and next(e.model.parameters()).device.type == "meta" for e in encoders)
    assert pipe.text_encoder.released and reads == []
    again = pipe("a red circle", **args).images  # cached prompts: nothing read back
    assert reads == [] and np.array_equal(first, again)
    other = pipe("two blue stars", **args).images  # a new prompt: both encoders read back, then freed
    assert len(reads) == 2 and pipe.text_encoder.released
    for prompt, got in (("a red circle", first), ("two blue stars", other)):  # (kept's cache may hold
        np.testing.assert_allclose(got, kept(prompt, **args).images, rtol=0, atol=1e-6)  # batched encodings)
    pipe.release_text_encoders = False
    pipe("a green square", **args)
    assert not any(e.released for e in encoders)


def test_a_lora_merged_into_a_text_encoder_keeps_it_resident(tmp_path):
    from safetensors.torch import save_file

    folder = save_sd_folder(tiny_sdxl_pipeline(), tmp_path / "sdxl")
    pipe = latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)
    pipe.release_text_encoders = True
    pipe("a red circle", num_inference_steps=1, height=16, width=16, seed=0, progress=False)
    assert pipe.text_encoder.encoder_1.released
    name = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{name}.lora_down.weight": torch.ones(2, 32), f"{name}.lora_up.weight": torch.ones(32, 2) * 0.01},
              str(tmp_path / "te.safetensors"))
    report = pipe.load_lora(tmp_path / "te.safetensors")
    assert report.applied_keys == 2 and not pipe.text_encoder.encoder_1.released
    assert all(p.device.type == "cpu" for p in pipe.text_encoder.encoder_1.model.parameters())
    assert not pipe.text_encoder.encoder_1.release_weights()  # its files no longer hold its weights
    assert pipe.text_encoder.encoder_2.release_weights()  # untouched by the LoRA: still releasable
