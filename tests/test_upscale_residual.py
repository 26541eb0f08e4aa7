"""Residual upscalers (`--residual`): trained on the image minus the bicubic enlargement of its
low-res view, sampled by adding that enlargement back, with the settings checked up front."""
import json

import pytest
import torch

import latentloom
import latentloom.training.task_unet as task_unet
from latentloom.vae.pixel_shuffle import PixelShuffleVAE, load_pixel_shuffle
from latentloom.pipelines.upscale_residual import RESIDUAL_SCALE, check_residual, residual_base
from latentloom.vae.codec import decode_latents, encode_images
from latentloom.training.config import TrainConfig
from latentloom.training.loop import train
from latentloom.synthetic.shapes import write_dataset
from latentloom.unet import UNetConfig

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


def _unet_json(path):
    UNetConfig(channels=[8, 16], layers_per_level=1, attention_levels=[False, True], num_heads=2, context_dim=384,
               norm_groups=8, in_channels=12 + 3, out_channels=12, num_class_embeds=21).save_json(path)
    return path


def _config(tmp_path, data, **kw):
    return TrainConfig(**{"model": "upscaler", "vae": "pixel-shuffle", "residual": True, "data": str(data),
                          "output": str(tmp_path / "m"), "model_config": str(_unet_json(tmp_path / "up.json")),
                          "resolution": 32, "low_resolution": 16, "max_noise_level": 20, "batch_size": 2,
                          "steps": 1, "progress": False, "prediction_type": "v_prediction", "random_flip": False,
                          **kw})


@pytest.mark.parametrize("kw", [{"model": "unet"}, {"vae": None}, {"vae": "some/vae"}])
def test_residual_is_for_pixel_space_upscalers_only(tmp_path, kw):
    with pytest.raises(ValueError, match="residual=True is for a pixel-space upscaler"):
        TrainConfig(**{"model": "upscaler", "vae": "pixel-shuffle", "residual": True, "data": str(tmp_path), **kw})


def test_scaling_factor_round_trips_and_is_checked(tmp_path):
    PixelShuffleVAE(2, scaling_factor=8.0).save_pretrained(tmp_path / "vae")
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["scaling_factor"] == 8.0
    vae = load_pixel_shuffle(tmp_path / "vae")
    x = torch.rand(1, 3, 4, 4) * 2 - 1
    z = encode_images(vae, x, sample=False)
    assert torch.allclose(z, torch.nn.functional.pixel_unshuffle(x, 2) * 8)
    assert torch.allclose(decode_latents(vae, z), x)
    for bad in (0, -1.0, "8", True):
        with pytest.raises(ValueError, match=f"scaling_factor must be a number > 0, got {bad!r}"):
            PixelShuffleVAE(2, scaling_factor=bad)


def test_index_value_is_checked():
    assert check_residual(None, "x") is None and check_residual("bicubic", "x") == "bicubic"
    with pytest.raises(ValueError, match=r"m/model_index.json: residual='lanczos' is not one of \('bicubic',\)"):
        check_residual("lanczos", "m/model_index.json")


def test_training_target_is_the_scaled_error_of_bicubic(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data", 2, seed=3)
    seen = {}
    real_degrade, real_loss = task_unet.degrade, task_unet.diffusion_loss

    def degrade(pixels, **kw):
        seen.setdefault("pixels", pixels.clone())
        return real_degrade(pixels, **kw)

    def diffusion_loss(predict, x0, **kw):
        seen["x0"] = x0.clone()
        return real_loss(predict, x0, **kw)

    monkeypatch.setattr(task_unet, "degrade", degrade)
    monkeypatch.setattr(task_unet, "diffusion_loss", diffusion_loss)
    train(_config(tmp_path, data))
    pixels = seen["pixels"]  # (2, 3, 32, 32) in [-1, 1]
    error = pixels - residual_base(real_degrade(pixels, low_resolution=16), (32, 32))
    assert error.abs().max() > 0.1  # the shapes' edges: a target of zeros would not pass
    assert torch.allclose(seen["x0"], torch.nn.functional.pixel_unshuffle(error, 2) * RESIDUAL_SCALE, atol=1e-5)


def test_residual_upscaler_adds_the_bicubic_base(tmp_path):
    data = write_dataset(tmp_path / "data", 2, seed=3)
    folder = train(_config(tmp_path, data, steps=2)) / "upscaler"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["residual"] == "bicubic" and index["space"] == "pixel"
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] == RESIDUAL_SCALE

    pipe = latentloom.load_pipeline(folder, device="cpu", dtype="fp32")
    assert pipe.upscaler.residual == "bicubic"
    low = torch.rand(2, 3, 16, 16)
    kw = {"image": low, "num_inference_steps": 2, "seed": 0, "progress": False}
    latents = pipe.upscale(["a red circle", "a blue star"], output_type="latent", **kw).images
    images = pipe.upscale(["a red circle", "a blue star"], output_type="np", **kw).images
    expected = decode_latents(pipe.vae, latents) + residual_base(low * 2 - 1, (32, 32))
    expected = (expected / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert images.shape == (2, 32, 32, 3)
    assert abs(images - expected).max() < 1e-5
    # a plain pixel-space model of the same weights has no base: its images differ
    pipe.upscaler.residual = None
    plain = pipe.upscale(["a red circle", "a blue star"], output_type="np", **kw).images
    assert abs(plain - images).max() > 0.05



def test_fine_tuning_an_upscaler_keeps_its_target(tmp_path):
    data = write_dataset(tmp_path / "data", 2, seed=3)
    first = train(_config(tmp_path, data))  # OUT/upscaler only: no model_index.json at OUT's top
    tuned = {"pretrained": str(first), "vae": None, "residual": False, "model_config": None}
    # OUT and OUT/upscaler are both accepted; the run learns the residual as its source did
    for i, source in enumerate((first, first / "upscaler")):
        with pytest.warns(UserWarning, match="learned the residual over bicubic, so this run does too"):
            out = train(_config(tmp_path, data, **{**tuned, "pretrained": str(source), "output": str(tmp_path / f"t{i}")}))
        assert json.loads((out / "upscaler" / "model_index.json").read_text())["residual"] == "bicubic"
    with pytest.raises(ValueError, match=r"pretrained='.*data' holds no upscaler: pass a model folder with an upscaler/"):
        train(_config(tmp_path, data, **{**tuned, "pretrained": str(data)}))

    whole = train(_config(tmp_path, data, residual=False, output=str(tmp_path / "whole")))
    with pytest.raises(ValueError, match="learned whole images .* fine-tune it without residual"):
        train(_config(tmp_path, data, **{**tuned, "pretrained": str(whole), "residual": True}))
