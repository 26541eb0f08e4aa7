"""PixelShuffleVAE: the weightless space-to-depth "VAE" of pixel-space upscalers — exact round
trips, clear errors, saved and loaded as a model folder's vae/, trained and sampled through the
SD-x4-style upscaler task and pipeline."""
import json

import pytest
import torch

import latentloom
from latentloom.vae.pixel_shuffle import PixelShuffleVAE, factor_for, is_pixel_shuffle_folder
from latentloom.vae.codec import decode_latents, encode_images, vae_scale_factor
from latentloom.training.config import TrainConfig
from latentloom.training.loop import train
from latentloom.synthetic.shapes import write_dataset
from latentloom.unet import UNetConfig

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


def test_encode_decode_is_exact_space_to_depth():
    vae = PixelShuffleVAE(2)
    x = torch.rand(2, 3, 8, 6) * 2 - 1
    z = encode_images(vae, x, sample=False)
    assert z.shape == (2, 12, 4, 3) and vae_scale_factor(vae) == 2
    assert torch.equal(z[0, :4, 0, 0], x[0, 0, :2, :2].flatten())  # channel 0's 2x2 block, row-major
    assert torch.equal(decode_latents(vae, z), x)
    assert torch.equal(encode_images(vae, x, generator=torch.Generator().manual_seed(0)), z)  # no sampling noise


@pytest.mark.parametrize("factor", [0, 1, 3, 2.0, True, "2"])
def test_bad_factor_is_refused(factor):
    with pytest.raises(ValueError, match=f"factor must be a power of two >= 2 \\(2, 4, 8, ...\\), got {factor!r}"):
        PixelShuffleVAE(factor)


def test_bad_shapes_are_refused():
    vae = PixelShuffleVAE(4)
    with pytest.raises(ValueError, match=r"image sides must be multiples of 4, got \(6, 8\)"):
        vae.encode(torch.zeros(1, 3, 6, 8))
    with pytest.raises(ValueError, match="expected 48 latent channels, got 12"):
        vae.decode(torch.zeros(1, 12, 2, 2))


def test_upscaler_factor_from_resolutions():
    assert factor_for(128, 64) == 2 and factor_for(256, 64) == 4
    with pytest.raises(ValueError, match="got resolution=96, low_resolution=64"):
        factor_for(96, 64)
    with pytest.raises(ValueError, match="got resolution=192, low_resolution=64"):
        factor_for(192, 64)


def test_saved_config_round_trips(tmp_path):
    PixelShuffleVAE(4).save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == "PixelShuffleVAE" and config["downsample_factor"] == 4
    assert config["latent_channels"] == 48 and is_pixel_shuffle_folder(tmp_path / "vae")
    assert not is_pixel_shuffle_folder(tmp_path)


def test_pixel_space_upscaler_trains_loads_and_upscales(tmp_path):
    data = write_dataset(tmp_path / "data", 4, seed=3)
    unet_json = tmp_path / "up.json"
    UNetConfig(channels=[8, 16], layers_per_level=1, attention_levels=[False, True], num_heads=2, context_dim=384,
               norm_groups=8, in_channels=12 + 3, out_channels=12, num_class_embeds=21).save_json(unet_json)
    out = train(TrainConfig(model="upscaler", vae="pixel-shuffle", data=str(data), output=str(tmp_path / "m"),
                            model_config=str(unet_json), resolution=32, low_resolution=16, max_noise_level=20,
                            batch_size=2, steps=2, progress=False, prediction_type="v_prediction"))
    folder = out / "upscaler"
    assert sorted(p.name for p in (folder / "vae").iterdir()) == ["config.json"]  # no weights to ship
    assert json.loads((folder / "model_index.json").read_text())["space"] == "pixel"

    pipe = latentloom.load_pipeline(folder, device="cpu", dtype="fp32")
    assert isinstance(pipe.vae, PixelShuffleVAE) and pipe.vae_scale_factor == 2 and pipe.latent_channels == 12
    low = torch.rand(1, 3, 16, 16)
    result = pipe.upscale("a red circle", image=low, num_inference_steps=2, seed=0, progress=False, output_type="np")
    assert result.images.shape == (1, 32, 32, 3)
    assert result.recipes[0]["input_height"] == 16 and result.recipes[0]["height"] == 32
    pipe.to(dtype="bf16")
    assert pipe.vae.dtype == torch.bfloat16 and pipe.unet.dtype == torch.bfloat16


def test_pixel_shuffle_upscaler_needs_a_power_of_two_factor(tmp_path):
    data = write_dataset(tmp_path / "data", 2, seed=3)
    with pytest.raises(ValueError, match="got resolution=48, low_resolution=16"):
        train(TrainConfig(model="upscaler", vae="pixel-shuffle", data=str(data), output=str(tmp_path / "m"),
                          resolution=48, low_resolution=16, batch_size=2, steps=1, progress=False))


def test_pixel_shuffle_is_for_the_upscaler_only(tmp_path):
    data = write_dataset(tmp_path / "data", 2, seed=3)
    with pytest.raises(ValueError, match="vae='pixel-shuffle' is for the upscaler"):
        train(TrainConfig(model="unet", vae="pixel-shuffle", data=str(data), output=str(tmp_path / "m"),
                          resolution=16, batch_size=2, steps=1, progress=False))
