"""UNetConfig: presets, JSON round-trip, validation errors, diffusers config translation."""
import json

import pytest

from latentloom.unet import UNetConfig

DIFFUSERS_SD15 = {  # the released runwayml/stable-diffusion-v1-5 unet/config.json
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
DIFFUSERS_SD21 = dict(DIFFUSERS_SD15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                      use_linear_projection=True, upcast_attention=True, dual_cross_attention=False,
                      num_class_embeds=None, only_cross_attention=False, class_embed_type=None)
DIFFUSERS_X4 = dict(DIFFUSERS_SD15, attention_head_dim=8, block_out_channels=[256, 512, 512, 1024],
                    cross_attention_dim=1024, in_channels=7, num_class_embeds=1000,
                    only_cross_attention=[True, True, True, False], use_linear_projection=True,
                    down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
                    up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"])


@pytest.mark.parametrize("preset", ["sd15", "sd2", "sd_x4_upscaler", "tiny"])
def test_json_round_trip(preset, tmp_path):
    cfg = getattr(UNetConfig, preset)()
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg.save_json(tmp_path / "c.json")
    assert UNetConfig.load_json(tmp_path / "c.json") == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temp file left behind


def test_presets_have_the_released_shapes():
    sd15, sd2, tiny = UNetConfig.sd15(), UNetConfig.sd2(), UNetConfig.tiny(in_channels=9)
    assert (sd15.context_dim, sd15.num_heads, sd15.use_linear_projection) == (768, [8] * 4, False)
    assert [sd2.heads_at(i) for i in range(4)] == [5, 10, 20, 20] and sd2.use_linear_projection
    assert tiny.in_channels == 9 and tiny.channels == [16, 32]
    assert UNetConfig.sd_x4_upscaler().num_class_embeds == 1000


def test_per_level_scalars_expand_to_lists():
    cfg = UNetConfig.tiny(layers_per_level=2, transformer_depth=[1, 2], attention_levels=False)
    assert cfg.layers_per_level == [2, 2] and cfg.transformer_depth == [1, 2]
    assert cfg.attention_levels == [False, False]


def test_from_dict_rejects_unknown_and_missing_fields():
    d = UNetConfig.tiny().to_dict()
    with pytest.raises(ValueError, match=r"unknown UNetConfig fields \['heads'\]"):
        UNetConfig.from_dict({**d, "heads": 4})
    del d["context_dim"]
    with pytest.raises(ValueError, match=r"missing UNetConfig fields \['context_dim'\]"):
        UNetConfig.from_dict(d)
    with pytest.raises(TypeError, match="expects a dict"):
        UNetConfig.from_dict([1, 2])


@pytest.mark.parametrize("field, value, error, match", [
    ("in_channels", "4", TypeError, "in_channels must be an int"),
    ("in_channels", 0, ValueError, "in_channels must be >= 1"),
    ("channels", 32, TypeError, "channels must be a non-empty list"),
    ("channels", [16, 32.0], TypeError, "channels must be an int"),
    ("layers_per_level", [1, 1, 1], ValueError, "has 3 entries but there are 2 levels"),
    ("layers_per_level", [1, 0], ValueError, "entries must be >= 1"),
    ("attention_levels", [1, 0], TypeError, "attention_levels must be a bool"),
    ("use_linear_projection", 1, TypeError, "use_linear_projection must be a bool"),
    ("norm_eps", "1e-5", TypeError, "norm_eps must be a float"),
    ("dropout", 1.5, ValueError, "dropout must be in"),
    ("num_heads", 3, ValueError, "not divisible by the attention split"),
    ("norm_groups", 5, ValueError, "not divisible by norm_groups=5"),
    ("num_class_embeds", 0, ValueError, "num_class_embeds must be >= 1"),
])
def test_wrong_fields_raise_naming_the_value(field, value, error, match):
    with pytest.raises(error, match=match):
        UNetConfig.from_dict({**UNetConfig.tiny().to_dict(), field: value})


def test_exactly_one_of_heads_and_head_dim():
    with pytest.raises(ValueError, match="exactly one of num_heads / head_dim"):
        UNetConfig.tiny(head_dim=8)
    with pytest.raises(ValueError, match="exactly one of num_heads / head_dim"):
        UNetConfig.tiny(num_heads=None)
    assert UNetConfig.tiny(num_heads=None, head_dim=8).heads_at(1) == 4
    with pytest.raises(ValueError, match=r"channels\[0\]=16 is not divisible by the attention split"):
        UNetConfig.tiny(num_heads=None, head_dim=32)
    with pytest.raises(TypeError, match="norm_groups must be an int"):
        UNetConfig.tiny(norm_groups="8")


def test_from_diffusers_config_sd15_sd21_x4():
    assert UNetConfig.from_diffusers_config(DIFFUSERS_SD15) == UNetConfig.sd15()
    sd21 = UNetConfig.from_diffusers_config(DIFFUSERS_SD21)
    assert sd21.num_heads == [5, 10, 20, 20] and sd21.upcast_attention and sd21.context_dim == 1024
    assert UNetConfig.from_diffusers_config(DIFFUSERS_X4) == UNetConfig.sd_x4_upscaler()
    for cfg in (UNetConfig.sd15(), UNetConfig.sd_x4_upscaler(), UNetConfig.tiny()):
        assert UNetConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg


@pytest.mark.parametrize("override, match", [
    ({"addition_embed_type": "text_time"}, "addition_embed_type"),  # SDXL
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"cross_attention_dim": [768, 768, 768, 768]}, "per-block cross_attention_dim"),
    ({"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["AttnDownBlock2D"]}, "AttnDownBlock2D"),
    ({"up_block_types": ["CrossAttnUpBlock2D"] * 4}, "must mirror each other"),
    ({"_class_name": "UNet2DModel"}, "UNet2DModel"),
    ({"norm_num_groups": None}, "norm_num_groups=None"),
    ({"transformer_layers_per_block": [[1], [2], [3], [4]]}, "nested transformer_layers_per_block"),
])
def test_from_diffusers_config_refuses_unsupported_features(override, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig.from_diffusers_config({**DIFFUSERS_SD15, **override})


def test_from_diffusers_config_warns_on_unknown_keys():
    with pytest.warns(UserWarning, match="some_future_option"):
        UNetConfig.from_diffusers_config({**DIFFUSERS_SD15, "some_future_option": 3})
    with pytest.raises(TypeError, match="expected a diffusers config dict"):
        UNetConfig.from_diffusers_config("config.json")
