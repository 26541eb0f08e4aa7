"""LCM-distilled UNets: the guidance embedding (diffusers' time_cond_proj_dim / timestep_cond) gives
diffusers' outputs, round-trips through the diffusers config and weights, and is refused where absent."""
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel

from latentloom.unet import UNet, UNetConfig

TINY = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=2, cross_attention_dim=32, time_cond_proj_dim=24)


def test_guidance_embedding_matches_diffusers():
    torch.manual_seed(0)
    reference = UNet2DConditionModel(**TINY).eval()
    ours = UNet.from_diffusers(reference).eval()
    assert ours.config.time_cond_proj_dim == 24
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    w = torch.tensor([7.5, 3.0])
    embedded = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=24)
    # sines of w x 1000 x freq (up to 7500 rad): float32 rounding of the frequencies shows at 1e-5
    torch.testing.assert_close(ours.guidance_embedding(w), embedded, rtol=0, atol=5e-5)
    with torch.no_grad():
        expected = reference(x, 499, context, timestep_cond=embedded).sample
        got = ours(x, 499, context, guidance=w)
        without = ours(x, 499, context)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (without - got).abs().max() > 1e-3  # w reaches the output
    with torch.no_grad():
        torch.testing.assert_close(without, reference(x, 499, context).sample, rtol=1e-4, atol=1e-5)


def test_config_and_weights_round_trip_through_diffusers(tmp_path):
    torch.manual_seed(0)
    reference = UNet2DConditionModel(**TINY).eval()
    reference.save_pretrained(tmp_path / "unet")
    ours = UNet.from_diffusers(tmp_path / "unet")
    assert "time_embedding.cond_proj.weight" in ours.state_dict()
    assert ours.config.to_diffusers_config()["time_cond_proj_dim"] == 24
    again = UNet2DConditionModel(**{k: v for k, v in ours.config.to_diffusers_config().items() if k != "_class_name"})
    again.load_state_dict(ours.to_diffusers_state_dict())
    ours.save_pretrained(tmp_path / "ours")
    assert UNet.from_pretrained(tmp_path / "ours").config.time_cond_proj_dim == 24


def test_guidance_is_refused_by_a_unet_without_the_embedding():
    model = UNet(UNetConfig.tiny()).eval()
    with pytest.raises(ValueError, match="no guidance embedding .*time_cond_proj_dim"):
        model(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 4, 32), guidance=1.0)
    with pytest.raises(ValueError, match="time_cond_proj_dim must be"):
        UNetConfig.tiny(time_cond_proj_dim=0)
