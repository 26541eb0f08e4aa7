"""evaluation/upscaler_fidelity: the metrics on known cases, and the whole report on a tiny
pixel-space upscaler trained here (no bundled weights needed)."""
import numpy as np
import pytest
from diffusers import AutoencoderKL

from latentloom.evaluation import upscaler_fidelity as uf
from latentloom.training.config import TrainConfig
from latentloom.training.loop import train
from latentloom.synthetic.shapes import write_dataset
from latentloom.unet import UNetConfig

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


def square(size: int = 32) -> np.ndarray:
    image = np.zeros((1, size, size, 3), dtype=np.float64)
    image[:, 8:24, 8:24] = 255.0
    return image


def test_identical_images_score_infinite_psnr_and_unit_sharpness():
    truth = square()
    band = uf.edge_band(truth)
    assert band[0, 16, 8] and not band[0, 16, 16] and not band[0, 0, 0]  # an edge pixel, the middle, a corner
    m = uf.fidelity(truth, truth, band)
    assert m == {"psnr": float("inf"), "edge_psnr": float("inf"), "sharpness": 1.0}


def test_blur_lowers_sharpness_and_edge_psnr_more_than_psnr():
    truth = square()
    blurred = truth.copy()
    for axis in (1, 2):
        blurred = (np.roll(blurred, 1, axis) + blurred + np.roll(blurred, -1, axis)) / 3
    m = uf.fidelity(blurred, truth, uf.edge_band(truth))
    assert m["sharpness"] < 0.8
    assert m["edge_psnr"] < m["psnr"] < float("inf")


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"images have shape \(1, 16, 16, 3\), the truth \(1, 32, 32, 3\)"):
        uf.fidelity(np.zeros((1, 16, 16, 3)), square(), uf.edge_band(square()))


def test_bad_scene_count_is_refused():
    with pytest.raises(ValueError, match="--scenes must be >= 1, got 0"):
        uf.main(["--scenes", "0"])
    with pytest.raises(ValueError, match="--zoom must be >= 1, got 0"):
        uf.main(["--zoom", "0"])
    with pytest.raises(ValueError, match="--strip-scenes must be >= 1, got -1"):
        uf.main(["--strip-scenes", "-1"])


def test_report_on_a_tiny_pixel_space_upscaler(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", 2, seed=3, size=128)
    unet_json = tmp_path / "up.json"
    UNetConfig(channels=[8, 16], layers_per_level=1, attention_levels=[False, True], num_heads=2, context_dim=384,
               norm_groups=8, in_channels=15, out_channels=12, num_class_embeds=21).save_json(unet_json)
    out = train(TrainConfig(model="upscaler", vae="pixel-shuffle", data=str(data), output=str(tmp_path / "m"),
                            model_config=str(unet_json), resolution=128, low_resolution=64, max_noise_level=20,
                            batch_size=2, steps=1, progress=False))
    strip = tmp_path / "strip.png"
    assert uf.main(["--model", str(out / "upscaler"), "--scenes", "2", "--steps", "2", "--guidance", "1",
                    "--noise-level", "0", "10", "--dtype", "fp32", "--save", str(strip)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "2 unseen scenes, 64 -> 128 px, against the true 128-px render"
    methods = [line[:52].strip() for line in lines[2:-1]]
    assert methods == ["truth", "nearest", "bicubic", "lanczos", "bicubic a=-0.75 (torch; a residual model's base)",
                       "upscaler: guidance 1, noise level 0, 2 steps",
                       "upscaler: guidance 1, noise level 10, 2 steps"]
    assert lines[2].split()[1:4] == ["inf", "inf", "1.000"] and lines[2].endswith("100.0%")
    assert lines[-1] == f"wrote {strip}"
    from PIL import Image

    first = np.asarray(Image.open(strip))
    assert first.shape == (2 * 128, 4 * 128, 3)
    # one scene, enlarged: the same pixels, each now 2 x 2
    assert uf.main(["--model", str(out / "upscaler"), "--scenes", "2", "--steps", "2", "--guidance", "1",
                    "--noise-level", "0", "--dtype", "fp32", "--save", str(strip), "--strip-scenes", "1",
                    "--zoom", "2"]) == 0
    zoomed = np.asarray(Image.open(strip))
    capsys.readouterr()
    # the inputs as a latent base model's outputs look: through a VAE's round trip, softer, so bicubic scores less
    vae = AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=64)
    vae.save_pretrained(tmp_path / "vae")
    assert uf.main(["--model", str(out / "upscaler"), "--scenes", "2", "--steps", "2", "--guidance", "1",
                    "--noise-level", "0", "--dtype", "fp32", "--through-vae", str(tmp_path / "vae")]) == 0
    through = capsys.readouterr().out.splitlines()
    assert through[0] == f"2 unseen scenes, 64 -> 128 px (inputs through the VAE of {tmp_path / 'vae'}), against the true 128-px render"
    assert float(through[4].split()[1]) < float(lines[4].split()[1]) - 3  # bicubic: an untrained VAE ruins the input
    assert zoomed.shape == (2 * 128, 2 * 4 * 128, 3)
    np.testing.assert_array_equal(zoomed[::2, ::2], first[:128])
