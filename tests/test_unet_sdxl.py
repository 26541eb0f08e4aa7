"""SDXL's UNet: the vector conditioning y (pooled text + embedded size numbers) through the timestep
embedding, per-level transformer depth, diffusers / LDM names and config inference, against diffusers."""
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from latentloom.unet import UNet, UNetConfig, infer_config_from_ldm_state_dict
from latentloom.unet.convert import LDM_PREFIX, diffusers_to_ldm

POOLED, TIME_DIM = 16, 8
# Tiny SDXL base: no attention on the first level, depth 1 / 2 / 3, 6 numbers (original size, crop, target size)
BASE = dict(
    block_out_channels=(32, 32, 64), layers_per_block=(1, 2, 1), norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 3), attention_head_dim=(2, 2, 4), cross_attention_dim=48,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
)
# Tiny refiner: four levels, attention in the middle two, 5 numbers (original size, crop, aesthetic score)
REFINER = dict(
    BASE, block_out_channels=(16, 32, 32, 32), layers_per_block=1, transformer_layers_per_block=2,
    attention_head_dim=(2, 2, 2, 2),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM,
)
CONFIGS = {"base": (BASE, 6), "refiner": (REFINER, 5)}


def make_diffusers(kwargs: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    model = UNet2DConditionModel(sample_size=16, **kwargs).eval()
    with torch.no_grad():  # diffusers zero-initialises some layers: make every weight count
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.ndim > 1 else 0.05)
    return model


def make_inputs(ref, numbers: int, *, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 12, generator=g)
    t = torch.tensor([999.0, 312.5])
    context = torch.randn(2, 7, ref.config.cross_attention_dim, generator=g)
    pooled = torch.randn(2, POOLED, generator=g)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0][:numbers],
                             [512.0, 512.0, 64.0, 0.0, 896.0, 1152.0][:numbers]])
    if numbers == 5:  # the refiner's last number is the aesthetic score
        time_ids[:, 4] = torch.tensor([6.0, 2.5])
    return x, t, context, pooled, time_ids


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4 * scale, f"max abs diff {diff:.3g} > 1e-4 * {scale:.3g}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_diffusers(name):
    kwargs, numbers = CONFIGS[name]
    ref = make_diffusers(kwargs)
    ours = UNet.from_diffusers(ref)
    assert ours.config.adm_in_channels == kwargs["projection_class_embeddings_input_dim"]
    x, t, context, pooled, time_ids = make_inputs(ref, numbers, seed=1)
    with torch.no_grad():
        expected = ref(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = ours(x, t, context, y=ours.vector_conditioning(pooled, time_ids))
        assert_close(got, expected)
        # the numbers matter: another original size gives another prediction
        other = time_ids.clone()
        other[:, 0] += 256
        assert (ours(x, t, context, y=ours.vector_conditioning(pooled, other)) - got).abs().max() > 1e-3


def test_y_is_pooled_text_then_each_number_embedded_as_diffusers_does():
    ref = make_diffusers(BASE)
    ours = UNet.from_diffusers(ref)
    _, _, _, pooled, time_ids = make_inputs(ref, 6, seed=2)
    with torch.no_grad():
        expected = torch.cat([pooled, ref.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=-1)
    torch.testing.assert_close(ours.vector_conditioning(pooled, time_ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_to_diffusers_round_trips(name):
    ref = make_diffusers(CONFIGS[name][0])
    ours = UNet.from_diffusers(ref)
    exported = ours.to_diffusers_state_dict()
    assert sorted(exported) == sorted(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(exported[key], value), key
    rebuilt = UNet2DConditionModel(**ours.config.to_diffusers_config())
    rebuilt.load_state_dict(exported, strict=True)
    assert UNetConfig.from_diffusers_config(ours.config.to_diffusers_config()) == ours.config


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ldm_names_of_the_vector_conditioning(name):
    ref = make_diffusers(dict(CONFIGS[name][0], layers_per_block=1))  # diffusers' converter takes one int
    ours = UNet.from_diffusers(ref)
    ldm = {LDM_PREFIX + k: v for k, v in diffusers_to_ldm(ref.state_dict(), ours.config).items()}
    assert "model.diffusion_model.label_emb.0.0.weight" in ldm and "model.diffusion_model.label_emb.0.2.bias" in ldm
    back = convert_ldm_unet_checkpoint(dict(ldm), dict(ref.config))  # diffusers' converter judges our names
    assert sorted(back) == sorted(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(back[key], value), key
    loaded = UNet.from_ldm_state_dict(ldm, config=ours.config).state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("cfg", [
    UNetConfig.sdxl(),
    UNetConfig.sdxl(in_channels=9),  # SDXL inpainting
    # the refiner: 4 levels of 384..1536, depth 4, OpenCLIP-bigG context only, 5 numbers
    UNetConfig(channels=[384, 768, 1536, 1536], attention_levels=[False, True, True, False], num_heads=None,
               head_dim=64, transformer_depth=[1, 4, 4, 4], context_dim=1280, use_linear_projection=True,
               adm_in_channels=2560, addition_time_embed_dim=256),
], ids=["base", "inpaint", "refiner"])
def test_full_size_sdxl_layouts_match_diffusers_and_are_inferred_from_ldm_shapes(cfg):
    with torch.device("meta"):  # shapes only: no memory for billions of parameters
        ours = UNet(cfg)
        theirs = UNet2DConditionModel(**cfg.to_diffusers_config())
    exported = ours.to_diffusers_state_dict()
    expected = theirs.state_dict()
    assert sorted(exported) == sorted(expected)
    assert all(tuple(exported[k].shape) == tuple(expected[k].shape) for k in expected)
    ldm = diffusers_to_ldm(exported, cfg)
    assert infer_config_from_ldm_state_dict({LDM_PREFIX + k: v for k, v in ldm.items()}) == cfg


def test_sdxl_preset_has_the_released_parameter_count():
    with torch.device("meta"):
        model = UNet(UNetConfig.sdxl())
    assert sum(p.numel() for p in model.parameters()) == 2_567_463_684  # SDXL base's UNet


def test_vector_conditioning_errors_name_the_shapes():
    ref = make_diffusers(BASE)
    ours = UNet.from_diffusers(ref)
    x, t, context, pooled, time_ids = make_inputs(ref, 6, seed=3)
    with pytest.raises(ValueError, match=r"needs y of shape \(2, 64\).*got nothing"):
        ours(x, t, context)
    with pytest.raises(ValueError, match=r"needs y of shape \(2, 64\).*got shape \(2, 63\)"):
        ours(x, t, context, y=torch.zeros(2, 63))
    with pytest.raises(ValueError, match=r"16\) \+ 5 numbers x 8 = 56, but this UNet reads y of width 64"):
        ours.vector_conditioning(pooled, time_ids[:, :5])
    plain = UNet(UNetConfig.tiny())
    with pytest.raises(ValueError, match="no vector conditioning"):
        plain(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 3, 32), y=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="adm_in_channels and addition_time_embed_dim go together"):
        UNetConfig.tiny(adm_in_channels=64)
    with pytest.raises(ValueError, match="needs int projection_class_embeddings_input_dim"):
        UNetConfig.from_diffusers_config({**BASE, "projection_class_embeddings_input_dim": None})


def test_configs_saved_before_vector_conditioning_still_load(tmp_path):
    cfg = UNetConfig.tiny()
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("adm_in_channels", "addition_time_embed_dim")}
    assert UNetConfig.from_dict(old) == cfg
