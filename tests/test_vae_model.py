"""latentloom's own AutoencoderKL against diffusers' on identical weights: encode, decode, tiled
encode and decode, tiny and SD-shaped; folders both ways; the LDM single-file keys; the config."""
import inspect
import json

import pytest
import torch

from builders import _vae_to_ldm, tiny_vae
from latentloom.vae.autoencoder import AutoencoderKL
from latentloom.vae.config import VAEConfig
from latentloom.vae.convert import infer_config_from_ldm, ldm_to_diffusers
from latentloom.vae.loading import load_vae

SD_SHAPED = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=64,
                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def randomized(module, seed):
    """Non-trivial norms and biases (fresh GroupNorms are the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def pair(kind: str):
    from diffusers import AutoencoderKL as DiffusersVAE

    reference = tiny_vae(0) if kind == "tiny" else DiffusersVAE(**SD_SHAPED).eval()
    randomized(reference, 1)
    ours = AutoencoderKL(VAEConfig.from_diffusers_config(dict(reference.config)))
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours.eval()


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def assert_close(got, expected, label):
    scale = expected.abs().max().item()
    diff = (got - expected).abs().max().item()
    print(f"{label}: max|diff| {diff:.2e}, max|reference| {scale:.2e}")
    assert got.shape == expected.shape and diff <= 1e-5 * scale


@pytest.fixture(scope="module", params=["tiny", "sd-shaped"])
def vaes(request):
    return request.param, *pair(request.param)


@torch.no_grad()
def test_names_encode_and_decode_match_diffusers(vaes):
    kind, reference, ours = vaes
    assert list(ours.state_dict()) == list(reference.state_dict())
    f = ours.config.downsample_factor
    images = torch.rand(2, 3, 4 * f, 5 * f, generator=torch.Generator().manual_seed(2)) * 2 - 1
    expected, got = reference.encode(images).latent_dist, ours.encode(images).latent_dist
    assert_close(got.mean, expected.mean, f"{kind} encode mean")
    assert_close(got.std, expected.std, f"{kind} encode std")
    assert_close(got.sample(torch.Generator().manual_seed(3)), expected.sample(torch.Generator().manual_seed(3)),
                 f"{kind} posterior sample")
    latents = torch.randn(2, 4, 4, 5, generator=torch.Generator().manual_seed(4))
    assert_close(ours.decode(latents).sample, reference.decode(latents).sample, f"{kind} decode")


@torch.no_grad()
def test_tiled_decode_and_encode_match_diffusers(vaes):
    kind, reference, ours = vaes
    f = ours.config.downsample_factor
    tile = 4 * f  # a small tile so that a small input spans a 3 x 4 grid of overlapping tiles
    reference.enable_tiling()
    reference.tile_sample_min_size, reference.tile_latent_min_size = tile, tile // f
    ours.enable_tiling()
    ours.config.sample_size = tile
    try:
        # 11 x 14 latents: no edge tile of a single row or column (GroupNorm needs two values a group)
        latents = torch.randn(1, 4, 11, 14, generator=torch.Generator().manual_seed(5))
        assert_close(ours.decode(latents).sample, reference.decode(latents).sample, f"{kind} tiled decode")
        images = torch.rand(1, 3, 11 * f, 14 * f, generator=torch.Generator().manual_seed(6)) * 2 - 1
        assert_close(ours.encode(images).latent_dist.mean, reference.encode(images).latent_dist.mean,
                     f"{kind} tiled encode")
    finally:
        reference.disable_tiling()
        ours.disable_tiling()


def test_folders_load_both_ways(tmp_path):
    from diffusers import AutoencoderKL as DiffusersVAE

    reference, _ = pair("tiny")
    reference.save_pretrained(tmp_path / "diffusers", safe_serialization=True)
    ours = load_vae(tmp_path / "diffusers")
    assert isinstance(ours, AutoencoderKL)
    assert same_weights(ours, reference)
    ours.save_pretrained(tmp_path / "ours")
    back = DiffusersVAE.from_pretrained(tmp_path / "ours", local_files_only=True)
    assert dict(back.config)["scaling_factor"] == reference.config.scaling_factor
    assert same_weights(back, reference)
    twin = ours.to_diffusers()  # in memory, for code that needs diffusers' class
    assert isinstance(twin, DiffusersVAE) and same_weights(twin, reference)
    assert dict(twin.config)["block_out_channels"] == list(reference.config.block_out_channels)


def test_folder_with_pre_0_14_attention_names_loads(tmp_path):
    from safetensors.torch import save_file

    reference, _ = pair("tiny")
    reference.save_pretrained(tmp_path, safe_serialization=True)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in reference.state_dict().items():
        for new, was in old.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{was}.")
        state[key] = value.contiguous()
    assert any(".query." in k for k in state)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    ours = load_vae(tmp_path)
    assert same_weights(ours, reference)


def test_a_weight_that_does_not_fit_is_named(tmp_path):
    from safetensors.torch import save_file

    reference, _ = pair("tiny")
    reference.save_pretrained(tmp_path, safe_serialization=True)
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "decoder.conv_out.bias"}
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \(1\): \['decoder.conv_out.bias'\].*unexpected \(1\): "
                                         r"\['decoder.extra.weight'\]"):
        load_vae(tmp_path)


def test_ldm_keys_convert_as_diffusers_converter_does():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    reference, _ = pair("tiny")
    ldm = _vae_to_ldm(reference.state_dict())
    ours = ldm_to_diffusers(ldm)
    theirs = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ldm.items()}, dict(reference.config))
    assert sorted(ours) == sorted(theirs)
    for key in ours:  # diffusers keeps the attention as (C, C, 1, 1) and squeezes at load; the numbers agree
        assert torch.equal(ours[key].reshape(theirs[key].shape), theirs[key]), key
    config = infer_config_from_ldm(ldm, scaling_factor=0.18215)
    assert (config.block_out_channels, config.layers_per_block, config.norm_num_groups) == ((8, 16), 1, 8)
    with pytest.raises(ValueError, match="no place in an AutoencoderKL.*encoder.mystery.weight"):
        ldm_to_diffusers({**ldm, "encoder.mystery.weight": torch.zeros(1)})


def test_config_defaults_are_diffusers_defaults_and_odd_values_are_refused():
    from diffusers import AutoencoderKL as DiffusersVAE

    signature = {k: p.default for k, p in inspect.signature(DiffusersVAE.__init__).parameters.items()
                 if p.default is not inspect.Parameter.empty}
    ours = VAEConfig().to_diffusers_config()
    for key, default in signature.items():
        expected = list(default) if isinstance(default, tuple) else default
        assert ours[key] == expected, key
    with pytest.warns(UserWarning, match=r"\['mystery_key'\]"):
        VAEConfig.from_diffusers_config({"mystery_key": 1, "_class_name": "AutoencoderKL"})
    with pytest.raises(ValueError, match="down_block_types must be 1 x 'DownEncoderBlock2D'"):
        VAEConfig(down_block_types=("AttnDownEncoderBlock2D",))
    with pytest.raises(ValueError, match=r"block_out_channels \[20\] are not divisible by norm_num_groups=32"):
        VAEConfig(block_out_channels=(20,))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\), got \(1, 4, 8, 8\)"):
        AutoencoderKL(VAEConfig(block_out_channels=(32,))).encode(torch.zeros(1, 4, 8, 8))


def test_release_vae_config_reads_like_diffusers(tmp_path):
    """SD 2.1-base's vae/config.json as published (it leaves out scaling_factor and the later keys)."""
    from pathlib import Path

    release_configs = Path(__file__).parent / "data" / "release_configs"
    published = json.loads((release_configs / "sd21-base-vae_config.json").read_text())
    config = VAEConfig.from_diffusers_config(published)
    assert (config.scaling_factor, config.sample_size, config.tile_latent_size, config.downsample_factor) == \
           (0.18215, 768, 96, 8)
    assert config.force_upcast and config.mid_block_add_attention and config.use_quant_conv
