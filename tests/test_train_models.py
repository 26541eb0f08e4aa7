"""The other models `latentloom train` makes: VAE (+ scaling factor), image-text model, upscaler;
latent UNet training on a trained VAE with the latent cache; the CLI."""
import json
import pytest
import torch

from latentloom.training.config import TrainConfig
from latentloom.text_encoders.image_text import ImageTextConfig, ImageTextModel
from latentloom.training.loop import train
from latentloom.synthetic.shapes import write_dataset
from latentloom.training.task_unet import degrade, upscaler_condition
from latentloom.unet import UNet, UNetConfig

VAE = {"down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
       "block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8,
       "mid_block_add_attention": False}
UNET = dict(channels=[8, 16], layers_per_level=1, attention_levels=[False, True], num_heads=2,
            context_dim=384, norm_groups=8)


ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 8, seed=2)


@pytest.fixture(scope="module")
def vae_out(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    cfg = out.parent / f"{out.name}-vae.json"
    cfg.write_text(json.dumps(VAE))
    train(TrainConfig(model="vae", data=str(data), output=str(out), model_config=str(cfg), resolution=16,
                      batch_size=4, steps=3, lr=1e-3, progress=False))
    return out


def test_vae_is_saved_with_a_data_scaling_factor(vae_out, data):
    from diffusers import AutoencoderKL

    from latentloom.vae.codec import encode_images
    from latentloom.training.data import CaptionedImageDataset

    vae = AutoencoderKL.from_pretrained(str(vae_out / "vae"))
    assert vae.config.block_out_channels == [8, 16]
    ds = CaptionedImageDataset(data, resolution=16)
    pixels = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
    z = encode_images(vae, pixels, generator=torch.Generator().manual_seed(0))
    assert vae.config.scaling_factor != 1.0
    assert 0.9 < z.std().item() < 1.1  # unit variance after scaling, as the UNet expects


def test_latent_unet_with_cache_uses_the_trained_vae(vae_out, data, tmp_path):
    cfg = tmp_path / "unet.json"
    UNetConfig(**UNET, in_channels=4, out_channels=4).save_json(cfg)
    common = dict(data=str(data), output=str(vae_out), model_config=str(cfg), resolution=16, batch_size=4,
                  cache_latents=True, progress=False, checkpoint_every=1)
    train(TrainConfig(steps=3, stop_after=2, **common))
    cache = vae_out / "checkpoints" / "latent-cache-16.safetensors"
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    train(TrainConfig(steps=3, resume="latest", **common))
    assert cache.stat().st_mtime_ns == stamp  # the resumed run encoded nothing
    index = json.loads((vae_out / "model_index.json").read_text())
    assert index["space"] == "latent" and index["resolution"] == 16
    assert UNet.from_pretrained(vae_out / "unet").config.in_channels == 4
    with pytest.raises(ValueError, match="crop='center'"):
        train(TrainConfig(steps=1, crop="random", **{**common, "output": str(tmp_path / "x"),
                                                     "model_config": str(cfg)}, vae=str(vae_out)))


def test_cache_without_vae_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="cache_latents needs a VAE"):
        train(TrainConfig(data=str(data), output=str(tmp_path), resolution=16, steps=1, cache_latents=True,
                          progress=False))


def test_image_text_model_trains_and_round_trips(data, tmp_path):
    cfg = tmp_path / "clip.json"
    cfg.write_text(json.dumps({"channels": [8, 16], "embed_dim": 16}))
    out = train(TrainConfig(model="clip", data=str(data), output=str(tmp_path / "m"), model_config=str(cfg),
                            resolution=16, batch_size=8, steps=6, lr=3e-3, progress=False, random_flip=False))
    model = ImageTextModel.from_pretrained(out / "clip")
    assert model.config == ImageTextConfig(channels=[8, 16], embed_dim=16, text_dim=384, resolution=16)
    from latentloom.text_encoders import TextEmbedding
    from latentloom.training.data import CaptionedImageDataset

    ds = CaptionedImageDataset(data, resolution=16)
    pixels = torch.stack([ds[i]["pixel_values"] for i in range(8)])
    emb = TextEmbedding(torch.randn(8, 3, 384), torch.ones(8, 3))
    image_z = model.encode_image(pixels.requires_grad_(True))
    assert image_z.shape == (8, 16)
    torch.testing.assert_close(image_z.norm(dim=-1), torch.ones(8))
    model.similarity(pixels, emb).sum().backward()  # differentiable in the pixels (CLIP guidance)
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="text_dim=384"):
        model.encode_text(TextEmbedding(torch.randn(1, 2, 32), torch.ones(1, 2)))

    class Encoder:  # any object with encode() and hidden_size
        hidden_size = 384

        def encode(self, prompts):
            return TextEmbedding(torch.ones(len(prompts), 2, 384), torch.ones(len(prompts), 2))

    with_text = ImageTextModel.from_pretrained(out / "clip", text_encoder=Encoder())
    assert "text_encoder" not in "".join(with_text.state_dict())
    Encoder.hidden_size = 32
    with pytest.raises(ValueError, match="size 384"):
        ImageTextModel.from_pretrained(out / "clip", text_encoder=Encoder())
    with pytest.raises(ValueError, match="not an image-text model folder"):
        ImageTextModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown ImageTextConfig fields"):
        ImageTextConfig.from_dict({"width": 3})


def test_x0_like_degradation():
    from latentloom.training.task_clip import degrade_like_x0

    pixels = torch.rand(64, 3, 16, 16) * 2 - 1
    out = degrade_like_x0(pixels, generator=torch.Generator().manual_seed(0))
    same = (out == pixels).flatten(1).all(1)
    assert 16 < same.sum() < 48  # about half untouched
    assert not torch.equal(out[~same], pixels[~same])


def test_upscaler_stage(vae_out, data, tmp_path):
    # the VAE halves the side (block_out_channels [8, 16]): 16 px low-res beside 16 x 16 latents of a 32 px image
    cfg = tmp_path / "up.json"
    UNetConfig(**UNET, in_channels=4 + 3, out_channels=4, num_class_embeds=101).save_json(cfg)
    common = dict(model="upscaler", data=str(data), model_config=str(cfg), vae=str(vae_out), low_resolution=16,
                  max_noise_level=100, batch_size=2, steps=2, progress=False)
    out = train(TrainConfig(output=str(tmp_path / "m"), resolution=32, **common))
    up = out / "upscaler"
    index = json.loads((up / "model_index.json").read_text())
    assert index["kind"] == "upscaler" and index["low_resolution"] == 16 and index["max_noise_level"] == 100
    low_res = json.loads((up / "low_res_scheduler" / "scheduler_config.json").read_text())
    assert low_res["beta_schedule"] == "linear" and low_res["beta_end"] == 0.02
    assert (up / "scheduler" / "scheduler_config.json").is_file() and (up / "vae" / "config.json").is_file()
    unet = UNet.from_pretrained(up / "unet")
    hi = torch.rand(1, 3, 32, 32) * 2 - 1
    cond = upscaler_condition(degrade(hi, low_resolution=16), noise_level=torch.tensor([0]), size=(16, 16))
    # level 0 adds noise of std 0.01 (sqrt(beta_0)); same size: no resize
    assert (cond - degrade(hi, low_resolution=16)).abs().max() < 0.06
    pred = unet(torch.cat([torch.randn(1, 4, 16, 16), cond], 1), torch.tensor([5]), torch.randn(1, 2, 384),
                class_labels=torch.tensor([20]))
    assert pred.shape == (1, 4, 16, 16)
    with pytest.raises(ValueError, match="resolution must be low_resolution x 2 = 32"):
        train(TrainConfig(output=str(tmp_path / "n"), resolution=64, **common))
    with pytest.raises(ValueError, match="the upscaler learns VAE latents"):
        train(TrainConfig(output=str(tmp_path / "n"), resolution=32, **{**common, "vae": None}))
    small = tmp_path / "small.json"
    UNetConfig(**UNET, in_channels=7, out_channels=4, num_class_embeds=10).save_json(small)
    with pytest.raises(ValueError, match="max_noise_level=100"):
        train(TrainConfig(output=str(tmp_path / "n"), resolution=32, **{**common, "model_config": str(small)}))


def test_cli(data, tmp_path, capsys):
    from latentloom.cli import main

    out = tmp_path / "cli"
    code = main(["train", "--data", str(data), "--output", str(out), "--resolution", "16", "--steps", "1",
                 "--batch-size", "2", "--no-progress", "--min-snr-gamma", "5", "--prediction-type", "v_prediction",
                 "--no-random-flip", "--threads", "1"])
    assert code == 0 and f"unet -> {out}" in capsys.readouterr().out
    saved = json.loads((out / "checkpoints" / "unet" / "checkpoint-1" / "state.json").read_text())["config"]
    assert saved["min_snr_gamma"] == 5.0 and saved["random_flip"] is False and saved["steps"] == 1
    assert saved["threads"] == 1
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_cli_rejects_bad_values(data, capsys):
    from latentloom.training.cli_train import main

    assert main(["--data", str(data), "--steps", "0"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--mixed-precision", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
