"""`--low-res-vae`: an upscaler of a cascade sees part of its low-res images through the base
model's VAE round trip (how the base stage's outputs look), and learns to sharpen those too."""
import pytest
import torch
from diffusers import AutoencoderKL

import latentloom.training.task_unet as task_unet
from latentloom.pipelines.upscale_residual import RESIDUAL_SCALE, residual_base
from latentloom.pipelines.vae import decode_latents, encode_images
from latentloom.training.config import TrainConfig
from latentloom.training.loop import train
from latentloom.training.synthetic_shapes import write_dataset
from latentloom.training.task_unet import degrade, vae_round_trip
from latentloom.unet import UNetConfig

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


def _tiny_vae(folder):
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=16)
    vae.save_pretrained(folder)
    return vae.eval()


@pytest.mark.parametrize("kw, match", [
    ({"model": "unet", "low_res_vae": "v"}, "low_res_vae is for the upscaler"),
    ({"model": "upscaler", "low_res_vae_p": 0.0}, r"low_res_vae_p must be in \(0, 1\], got 0.0"),
    ({"model": "upscaler", "low_res_vae_p": 1.5}, r"low_res_vae_p must be in \(0, 1\], got 1.5"),
])
def test_config_refusals(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(data="d", **kw)


def test_round_trip_replaces_the_picked_share(tmp_path):
    vae = _tiny_vae(tmp_path / "vae")
    low = torch.rand(16, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        trip = decode_latents(vae, encode_images(vae, low, sample=False)).clamp(-1, 1)
    torch.testing.assert_close(vae_round_trip(low, vae, p=1.0, generator=torch.Generator().manual_seed(0)), trip)
    mixed = vae_round_trip(low, vae, p=0.5, generator=torch.Generator().manual_seed(0))
    same = [torch.equal(m, x) for m, x in zip(mixed, low)]
    tripped = [torch.allclose(m, t, atol=1e-4) for m, t in zip(mixed, trip)]
    assert all(s != t for s, t in zip(same, tripped))  # each image is one or the other
    assert 2 <= sum(tripped) <= 14


def test_training_uses_one_low_res_view_for_the_base_and_the_condition(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data", 2, seed=3)
    vae = _tiny_vae(tmp_path / "vae")
    unet_json = tmp_path / "up.json"
    UNetConfig(channels=[8, 16], layers_per_level=1, attention_levels=[False, True], num_heads=2, context_dim=384,
               norm_groups=8, in_channels=15, out_channels=12, num_class_embeds=21).save_json(unet_json)
    seen = {}
    real_degrade, real_condition, real_loss = task_unet.degrade, task_unet.upscaler_condition, task_unet.diffusion_loss

    def spy_degrade(pixels, **kw):
        seen["pixels"] = pixels.clone()
        return real_degrade(pixels, **kw)

    def spy_condition(low, **kw):
        seen["low"] = low.clone()
        return real_condition(low, **kw)

    def spy_loss(predict, x0, **kw):
        seen["x0"] = x0.clone()
        return real_loss(predict, x0, **kw)

    monkeypatch.setattr(task_unet, "degrade", spy_degrade)
    monkeypatch.setattr(task_unet, "upscaler_condition", spy_condition)
    monkeypatch.setattr(task_unet, "diffusion_loss", spy_loss)
    train(TrainConfig(model="upscaler", vae="pixel-shuffle", residual=True, low_res_vae=str(tmp_path / "vae"),
                      low_res_vae_p=1.0, data=str(data), output=str(tmp_path / "m"), model_config=str(unet_json),
                      resolution=32, low_resolution=16, max_noise_level=20, batch_size=2, steps=1, progress=False,
                      prediction_type="v_prediction", random_flip=False))
    pixels = seen["pixels"]
    with torch.no_grad():
        expected_low = decode_latents(vae, encode_images(vae, degrade(pixels, low_resolution=16), sample=False)).clamp(-1, 1)
    torch.testing.assert_close(seen["low"], expected_low, atol=1e-5, rtol=1e-5)
    error = pixels - residual_base(expected_low, (32, 32))
    torch.testing.assert_close(seen["x0"], torch.nn.functional.pixel_unshuffle(error, 2) * RESIDUAL_SCALE,
                               atol=1e-4, rtol=1e-4)
