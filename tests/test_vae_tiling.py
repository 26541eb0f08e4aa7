"""VAE tiling: tiled and untiled decodes agree away from the seams, the automatic choice switches
where vae.py documents it, the caller's VAE keeps its tiling state, and `vae_tiling` (Python and
`--vae-tiling` on the command line) reaches the decoder."""
import json

import numpy as np
import pytest
import torch

from builders import tiny_vae
from latentloom.cli import main as cli_main
from latentloom.vae import codec as vae_glue
from latentloom.vae.codec import auto_tiling, decode_latents, encode_images, untiled_decode_bytes


def wide_tile_vae():
    """Tiny VAE (factor 2) whose tiles are 64 latents: wide enough that a tile's inside is out of
    reach of the tile's edges (the decoder sees ~12 latents around a pixel)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=128,
    ).eval()


def meta_vae(**config):
    """An AutoencoderKL with a real config and no weights (the automatic rule reads only the config)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(**config)


SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def test_tiled_and_untiled_decodes_agree_away_from_the_seams():
    vae = wide_tile_vae()
    z = torch.randn(1, 4, 96, 96, generator=torch.Generator().manual_seed(0)) * vae.config.scaling_factor
    untiled = decode_latents(vae, z, tiling=False)
    tiled = decode_latents(vae, z, tiling=True)
    assert tiled.shape == untiled.shape == (1, 3, 192, 192)
    # tiling ran: diffusers blends overlapping tiles, so the seams differ
    assert not torch.allclose(tiled, untiled, atol=1e-3)
    # inside the first tile (pixels 0..95 of its 128; it is blended into the next one from 96):
    # only the tile's own group-norm statistics differ from the whole image's
    scale = untiled.std().item()
    inside = (tiled - untiled)[..., :96, :96].abs()
    assert inside.mean().item() < 0.05 * scale, (inside.mean().item(), scale)
    # the images as a whole stay close too: a different latent differs ~40x more
    other = decode_latents(vae, torch.randn_like(z), tiling=False)
    assert (tiled - untiled).abs().mean() < 0.1 * (other - untiled).abs().mean()


def test_automatic_choice_on_stable_diffusions_vae_switches_at_two_tiles():
    vae = meta_vae(**SD_VAE)
    assert vae.tile_latent_min_size == 64
    assert not auto_tiling(vae, (1, 4, 64, 64))  # 512 px: one tile
    assert not auto_tiling(vae, (1, 4, 127, 127))  # just under two tiles a side
    assert auto_tiling(vae, (1, 4, 128, 128))  # 1024 px
    assert auto_tiling(vae, (1, 4, 128, 64))  # either side counts
    # the byte estimate behind it: ~8 bytes of activations per full-resolution channel and pixel
    assert untiled_decode_bytes(vae, (1, 4, 64, 64)) == 8 * 128 * 512 * 512 * 4
    assert untiled_decode_bytes(vae, (2, 4, 64, 64)) == 2 * untiled_decode_bytes(vae, (1, 4, 64, 64))


def test_automatic_choice_leaves_small_vaes_untiled_however_large_the_image():
    from latentloom.weights import bundled_model_dir

    bundled = json.loads((bundled_model_dir() / "vae" / "config.json").read_text())
    config = {k: v for k, v in bundled.items() if not k.startswith("_")}
    vae = meta_vae(**config)
    assert not auto_tiling(vae, (1, 4, 256, 256))  # 1024 px: ~0.5 GB untiled, not worth seams
    assert untiled_decode_bytes(vae, (1, 4, 256, 256)) < vae_glue.AUTO_TILE_BYTES
    assert auto_tiling(vae, (1, 4, 512, 512))  # 2048 px: 2 GB


def test_decode_follows_the_automatic_choice(monkeypatch):
    vae = tiny_vae()  # tiles of 8 latents
    monkeypatch.setattr(vae_glue, "AUTO_TILE_BYTES", 0)  # so the size rule alone decides
    calls = []
    original = vae.tiled_decode
    monkeypatch.setattr(vae, "tiled_decode", lambda z, **kw: calls.append(tuple(z.shape)) or original(z, **kw))
    decode_latents(vae, torch.zeros(1, 4, 15, 15))
    assert calls == []
    decode_latents(vae, torch.zeros(1, 4, 16, 16))
    assert calls == [(1, 4, 16, 16)]


def test_the_callers_tiling_state_is_left_as_it_was():
    vae = tiny_vae()
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(1))
    decode_latents(vae, z, tiling=True)
    assert vae.use_tiling is False
    vae.enable_tiling()
    untiled = decode_latents(vae, z, tiling=False)
    assert vae.use_tiling is True
    vae.disable_tiling()
    torch.testing.assert_close(untiled, decode_latents(vae, z, tiling=False))
    with pytest.raises(RuntimeError):  # 3 latent channels: the decoder fails inside the switch
        decode_latents(vae, z[:, :3], tiling=True)
    assert vae.use_tiling is False


def test_tiled_encode_is_used_and_close():
    vae = wide_tile_vae()
    images = torch.rand(1, 3, 192, 192, generator=torch.Generator().manual_seed(2)) * 2 - 1
    untiled = encode_images(vae, images, sample=False, tiling=False)
    tiled = encode_images(vae, images, sample=False, tiling=True)
    assert tiled.shape == untiled.shape == (1, 4, 96, 96)
    assert not torch.allclose(tiled, untiled, atol=1e-4)
    assert (tiled - untiled)[..., :48, :48].abs().mean() < 0.05 * untiled.std()
    assert vae.use_tiling is False


def test_tiling_errors():
    vae = tiny_vae()
    with pytest.raises(TypeError, match="vae_tiling must be None .* got str 'on'"):
        decode_latents(vae, torch.zeros(1, 4, 8, 8), tiling="on")

    class PlainDecoder(torch.nn.Module):  # a VAE without diffusers' tiling switch
        def __init__(self):
            super().__init__()
            self.inner = tiny_vae()
            self.config = self.inner.config
            self.dtype = torch.float32

        def decode(self, z):
            return self.inner.decode(z)

    plain = PlainDecoder()
    with pytest.raises(ValueError, match="vae_tiling=True needs a VAE with tiling .*PlainDecoder"):
        decode_latents(plain, torch.zeros(1, 4, 8, 8), tiling=True)
    assert decode_latents(plain, torch.zeros(1, 4, 8, 8)).shape == (1, 3, 16, 16)  # automatic: off


# ---------------------------------------------------------------- the call argument and the CLI
def spy_tiled_decodes(monkeypatch, vae) -> list:
    calls = []
    original = vae.tiled_decode
    monkeypatch.setattr(vae, "tiled_decode", lambda z, **kw: calls.append(tuple(z.shape)) or original(z, **kw))
    return calls


def test_vae_tiling_argument_reaches_the_decoder(pipe, monkeypatch):
    calls = spy_tiled_decodes(monkeypatch, pipe.vae)
    kwargs = dict(num_inference_steps=1, guidance_scale=1.0, height=48, width=48, seed=0, progress=False,
                  output_type="np")
    tiled = pipe("a red circle", vae_tiling=True, **kwargs).images
    assert calls == [(1, 4, 24, 24)]  # the tiny VAE's tiles are 8 latents
    untiled = pipe("a red circle", vae_tiling=False, **kwargs).images
    automatic = pipe("a red circle", **kwargs).images  # tiny VAE: never worth tiling
    assert len(calls) == 1
    np.testing.assert_array_equal(untiled, automatic)
    assert not np.array_equal(tiled, untiled)
    assert pipe.vae.use_tiling is False


def test_vae_tiling_argument_is_checked_before_any_work(pipe, monkeypatch):
    monkeypatch.setattr(pipe.text_encoder, "encode", lambda *a, **k: pytest.fail("encoded before the check"))
    with pytest.raises(TypeError, match="vae_tiling must be None .* got str 'on'"):
        pipe("a red circle", vae_tiling="on", num_inference_steps=1, progress=False)


@pytest.mark.parametrize("flag, expected", [("on", True), ("off", False), ("auto", None), (None, None)])
def test_cli_vae_tiling_option(folder, tmp_path, monkeypatch, flag, expected):
    seen = []
    from latentloom.pipelines import output as common

    original = common.decode_latents
    monkeypatch.setattr(common, "decode_latents",
                        lambda vae, z, *, tiling=None: seen.append(tiling) or original(vae, z, tiling=tiling))
    argv = ["generate", "a red circle", "--model", str(folder), "--steps", "1", "--height", "16", "--width", "16",
            "--seed", "0", "--no-progress", "-o", str(tmp_path / "x.png")]
    assert cli_main(argv + ([] if flag is None else ["--vae-tiling", flag])) == 0
    assert seen == [expected]


def test_cli_rejects_an_unknown_vae_tiling_choice(folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "x", "--model", str(folder), "--vae-tiling", "yes", "-o", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'yes'" in capsys.readouterr().err


def test_vae_tiling_is_recorded_and_replayed_by_generate_from(folder, tmp_path, monkeypatch):
    from latentloom.pipelines import output as common
    from latentloom.pipelines.metadata import read_metadata

    base = ["--model", str(folder), "--steps", "1", "--height", "16", "--width", "16", "--seed", "0", "--no-progress"]
    first = tmp_path / "first.png"
    assert cli_main(["generate", "a red circle", "--vae-tiling", "on", "-o", str(first)] + base) == 0
    assert read_metadata(first)["vae_tiling"] is True
    seen = []
    original = common.decode_latents
    monkeypatch.setattr(common, "decode_latents",
                        lambda vae, z, *, tiling=None: seen.append(tiling) or original(vae, z, tiling=tiling))
    assert cli_main(["generate", "--from", str(first), "-o", str(tmp_path / "again.png"), "--no-progress"]) == 0
    assert cli_main(["generate", "--from", str(first), "--vae-tiling", "off", "-o", str(tmp_path / "off.png"),
                     "--no-progress"]) == 0
    assert seen == [True, False]
    assert read_metadata(tmp_path / "off.png")["vae_tiling"] is False
