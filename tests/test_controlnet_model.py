"""latentloom's ControlNet equals diffusers' ControlNetModel on the same weights (fp32, CPU), and its
file formats (diffusers folder, original lllyasviel layout) load, save and round-trip."""
import json
import warnings

import pytest
import torch
from builders import tiny_diffusers_unet
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import load_file, save_file

from latentloom.unet import ControlNet, ControlNetConfig, UNet
from latentloom.unet.controlnet_convert import infer_config_from_original

EMBED = (8, 8, 16, 16)  # four widths, as released ControlNets: the control image is 8x the latents
# What shape inference assumes for SD 1.x files (norm groups and heads are not in the shapes): 32 groups,
# 8 heads at a 768-wide context.
SD1 = dict(block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=768, attention_head_dim=8)
SD2 = dict(use_linear_projection=True, transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
           upcast_attention=True)
SDXL = dict(SD2, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8)
CONFIGS = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}


def make_ref(unet_kwargs: dict, seed: int = 0, **control) -> ControlNetModel:
    """diffusers' ControlNetModel.from_unet on a tiny UNet, every weight (zero convs too) random."""
    ref = ControlNetModel.from_unet(tiny_diffusers_unet(seed, **unet_kwargs),
                                    conditioning_embedding_out_channels=EMBED, **control).eval()
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2 if p.ndim > 1 else 0.05)
    return ref


def make_inputs(ref: ControlNetModel, *, seed: int = 0, B: int = 2, size=(8, 8), L: int = 7):
    g = torch.Generator().manual_seed(seed)
    cfg = ref.config
    x = torch.randn(B, cfg.in_channels, *size, generator=g)
    t = torch.rand(B, generator=g) * 999
    context = torch.randn(B, L, cfg.cross_attention_dim, generator=g)
    image = torch.rand(B, cfg.conditioning_channels, size[0] * 8, size[1] * 8, generator=g)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = torch.randn(B, 32, generator=g)
        numbers = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * B)
        added = {"text_embeds": pooled, "time_ids": numbers}
    return x, t, context, image, added


def run_both(ref, ours, inputs, **kw):
    x, t, context, image, added = inputs
    y = None if added is None else ours.vector_conditioning(added["text_embeds"], added["time_ids"])
    with torch.no_grad():
        down_ref, mid_ref = ref(x, t, context, image, added_cond_kwargs=added, return_dict=False, **kw)
        down, mid = ours(x, t, context, image, y=y, **kw)
    return (down, mid), (down_ref, mid_ref)


def assert_residuals_close(got, want, tol: float = 1e-5) -> None:
    (down, mid), (down_ref, mid_ref) = got, want
    assert len(down) == len(down_ref)
    for i, (a, b) in enumerate([*zip(down, down_ref), (mid, mid_ref)]):
        assert a.shape == b.shape, f"residual {i}: {tuple(a.shape)} != {tuple(b.shape)}"
        scale, diff = b.abs().max().item(), (a - b).abs().max().item()
        assert scale > 0 and diff <= tol * scale, f"residual {i}: max abs diff {diff:.3g} > {tol} * {scale:.3g}"


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(diffusers reference, ours loaded from the folder diffusers saved)."""
    ref = make_ref(CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, ControlNet.from_diffusers(folder)


@pytest.mark.parametrize("kw", [{}, {"conditioning_scale": 0.7}, {"guess_mode": True},
                                {"guess_mode": True, "conditioning_scale": 0.7}],
                         ids=["plain", "scale0.7", "guess", "guess+scale0.7"])
def test_forward_matches_diffusers(pair, kw):
    ref, ours = pair
    assert_residuals_close(*run_both(ref, ours, make_inputs(ref), **kw))


def test_residuals_match_the_unet_skips(pair):
    ref, ours = pair
    down, mid = ours(*make_inputs(ref)[:4], y=None if ours.config.adm_in_channels is None else
                     torch.zeros(2, ours.config.adm_in_channels))
    assert len(down) == ours.num_residuals == 1 + sum(ours.config.layers_per_level) + ours.config.num_levels - 1
    assert mid.shape == (2, ours.config.channels[-1], 4, 4)


@pytest.mark.parametrize("control", [{"global_pool_conditions": True},
                                     {"controlnet_conditioning_channel_order": "bgr"}], ids=["global_pool", "bgr"])
@pytest.mark.parametrize("guess_mode", [False, True])
def test_config_switches_match_diffusers(control, guess_mode):
    base = make_ref(SD1)
    ref = ControlNetModel.from_config(base.config, **control).eval()
    ref.load_state_dict(base.state_dict())
    ours = ControlNet.from_diffusers(ref)
    assert all(getattr(ours.config, k) == v for k, v in control.items())
    got, want = run_both(ref, ours, make_inputs(ref), guess_mode=guess_mode, conditioning_scale=0.7)
    assert_residuals_close(got, want)
    if control.get("global_pool_conditions"):
        assert all(d.shape[-2:] == (1, 1) for d in got[0])


def test_scalar_timestep_and_one_control_image_for_the_batch():
    ref = make_ref(SD1)
    ours = ControlNet.from_diffusers(ref)
    x, _, context, image, _ = make_inputs(ref)
    with torch.no_grad():
        want = ref(x, 500, context, image[:1], return_dict=False)
        got = ours(x, 500, context, image[:1])
    assert_residuals_close(got, want)


def test_context_mask_equals_dropping_the_padding():
    ref = make_ref(SD1)
    ours = ControlNet.from_diffusers(ref)
    x, t, context, image, _ = make_inputs(ref, B=1)
    mask = torch.ones(1, context.shape[1], dtype=torch.long)
    mask[:, 4:] = 0
    with torch.no_grad():
        masked = ours(x, t, context, image, context_mask=mask)
        short = ours(x, t, context[:, :4], image)
    assert_residuals_close(masked, short, tol=1e-5)


# ---------------------------------------------------------------------- from_unet
@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_from_unet_equals_diffusers_from_unet(name):
    unet = tiny_diffusers_unet(0, **CONFIGS[name])
    with torch.no_grad():
        for p in unet.parameters():  # diffusers zero-initialises some UNet layers; make every copy visible
            p.normal_(0.0, 0.2)
    ref = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBED)
    ours = ControlNet.from_unet(UNet.from_diffusers(unet), conditioning_embedding_out_channels=EMBED)
    want, got = ref.state_dict(), ours.to_diffusers_state_dict()
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        # the control embedding's first convs are freshly (randomly) initialised on both sides
        if k.startswith("controlnet_cond_embedding.") and not k.startswith("controlnet_cond_embedding.conv_out"):
            continue
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    zero = [k for k in want if k.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                             "controlnet_cond_embedding.conv_out"))]
    assert zero and all(not got[k].any() for k in zero)
    # a fresh ControlNet adds nothing
    x, t, context, image, added = make_inputs(ref)
    y = None if added is None else ours.vector_conditioning(added["text_embeds"], added["time_ids"])
    down, mid = ours(x, t, context, image, y=y)
    assert not mid.any() and not any(d.any() for d in down)


def test_from_unet_takes_a_diffusers_unet_and_copies_the_guidance_embedding():
    unet = UNet.from_diffusers(tiny_diffusers_unet(0, time_cond_proj_dim=16))
    net = ControlNet.from_unet(unet)
    torch.testing.assert_close(net.time_embedding.cond_proj.weight, unet.time_embedding.cond_proj.weight)
    assert ControlNet.from_unet(tiny_diffusers_unet(0)).config.conditioning_embedding_out_channels == [16, 32, 96, 256]


# ---------------------------------------------------------------------- diffusers folder
@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_pretrained_loads_in_diffusers(name, tmp_path):
    ref = make_ref(CONFIGS[name])
    ours = ControlNet.from_diffusers(ref)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown config keys for diffusers
        back = ControlNetModel.from_pretrained(tmp_path)
    want, got = ref.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert_residuals_close(*run_both(back, ours, make_inputs(ref)))  # heads and switches too, not only weights
    again = ControlNet.from_pretrained(tmp_path)
    assert again.config == ours.config
    assert_residuals_close(*run_both(ref, again, make_inputs(ref)))


def test_release_shaped_config(tmp_path):
    """The keys lllyasviel/control_v11p_sd15_canny's config.json carries (written out here from that
    release's key set, shrunk; global_pool_conditions absent, as in configs saved before it existed)."""
    config = {
        "_class_name": "ControlNetModel", "_diffusers_version": "0.16.0.dev0", "act_fn": "silu",
        "attention_head_dim": 8, "block_out_channels": [32, 64], "class_embed_type": None,
        "conditioning_embedding_out_channels": list(EMBED), "controlnet_conditioning_channel_order": "rgb",
        "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 1,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None,
        "only_cross_attention": False, "projection_class_embeddings_input_dim": None,
        "resnet_time_scale_shift": "default", "upcast_attention": False, "use_linear_projection": False,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = ControlNetConfig.from_diffusers_config(config)
    assert cfg.global_pool_conditions is False and cfg.conditioning_channels == 3
    assert cfg == ControlNet.from_diffusers(make_ref(SD1)).config


# ---------------------------------------------------------------------- original layout
@pytest.mark.parametrize("name", list(CONFIGS))
def test_original_layout_equals_diffusers_single_file_conversion(name):
    ref = make_ref(CONFIGS[name])
    original = ControlNet.from_diffusers(ref).to_original_state_dict()
    assert all(k.startswith("control_model.") for k in original)
    assert {"control_model.input_hint_block.14.weight", "control_model.middle_block_out.0.bias"} <= set(original)
    converted = convert_controlnet_checkpoint(original, {"layers_per_block": ref.config.layers_per_block})
    if name == "sdxl":  # diffusers' converter does not map label_emb (no SDXL original layout there)
        assert not any(k.startswith("add_embedding") for k in converted)
        converted.update({k: v for k, v in ref.state_dict().items() if k.startswith("add_embedding")})
    want = ref.state_dict()
    assert set(converted) == set(want)
    for k in want:
        torch.testing.assert_close(converted[k], want[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("prefix", ["control_model.", ""], ids=["prefixed", "bare"])
def test_single_file_round_trip(prefix, tmp_path):
    ref = make_ref(SD1)
    ours = ControlNet.from_diffusers(ref)
    path = tmp_path / "control_tiny.safetensors"
    ours.save_single_file(path, prefix=prefix)
    assert all(k.startswith(prefix) for k in load_file(path))
    back = ControlNet.from_single_file(path)  # config inferred from the shapes
    assert back.config == ours.config
    assert_residuals_close(*run_both(ref, back, make_inputs(ref), conditioning_scale=0.7))


def test_controlnet_1_0_file_with_the_whole_sd_model(tmp_path):
    """ControlNet 1.0 files hold the SD model beside control_model.*: those keys are not the ControlNet's."""
    ref = make_ref(SD1)
    sd = ControlNet.from_diffusers(ref).to_original_state_dict()
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 3, 3)
    sd["first_stage_model.decoder.conv_out.bias"] = torch.zeros(3)
    back = ControlNet.from_original_state_dict(sd)
    assert_residuals_close(*run_both(ref, back, make_inputs(ref)))


def test_sdxl_original_layout_with_config(tmp_path):
    ref = make_ref(SDXL)
    ours = ControlNet.from_diffusers(ref)
    path = tmp_path / "control_xl.safetensors"
    ours.save_single_file(path)
    # the numbers' embedding width (8 here, 256 in SDXL) and the heads are not in the shapes
    back = ControlNet.from_single_file(path, config=ours.config)
    assert_residuals_close(*run_both(ref, back, make_inputs(ref)))


# ---------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def original():
    return ControlNet.from_diffusers(make_ref(SD1)).to_original_state_dict()


def test_unknown_original_keys_are_named(original):
    cfg = infer_config_from_original(original)
    sd = {**original, "control_model.zero_convs.9.0.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): \['control_model\.zero_convs\.9\.0\.weight'\]"):
        ControlNet.from_original_state_dict(sd)
    sd = {**original, "control_model.input_hint_block.3.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"input_hint_block convs at indices \[0, 2, 3, 4,"):
        ControlNet.from_original_state_dict(sd)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): \['control_model\.input_hint_block\.3\.weight'\]"):
        ControlNet.from_original_state_dict(sd, config=cfg)


def test_missing_original_keys_are_named(original):
    sd = {k: v for k, v in original.items() if k != "control_model.middle_block_out.0.bias"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['control_model\.middle_block_out\.0\.bias'\]"):
        ControlNet.from_original_state_dict(sd)


def test_output_blocks_in_a_controlnet_file_are_unexpected(original):
    sd = dict(original)
    sd["control_model.output_blocks.0.0.in_layers.0.weight"] = torch.zeros(64)
    with pytest.raises(ValueError, match=r"unexpected keys.*control_model\.output_blocks\.0\.0\.in_layers\.0\.weight"):
        ControlNet.from_original_state_dict(sd)


def test_shape_mismatch_is_named(original):
    cfg = infer_config_from_original(original)
    bad = ControlNetConfig(**{**cfg.to_dict(), "conditioning_channels": 1})
    with pytest.raises(ValueError, match=r"controlnet_cond_embedding\.conv_in\.weight"):
        ControlNet.from_original_state_dict(original, config=bad)


def test_not_a_controlnet_file():
    with pytest.raises(ValueError, match="not an original ControlNet state dict"):
        ControlNet.from_original_state_dict({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})


def test_pickle_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pickle checkpoint.*from_original_state_dict"):
        ControlNet.from_single_file(tmp_path / "control_sd15_canny.pth")


def test_diffusers_folder_errors(tmp_path):
    ref = make_ref(SD1)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sparkle": 1}))
    with pytest.warns(UserWarning, match=r"\['sparkle'\]"):
        ControlNet.from_diffusers(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "controlnet_conditioning_channel_order": "rbg"}))
    with pytest.raises(ValueError, match=r"controlnet_conditioning_channel_order must be one of \('rgb', 'bgr'\)"):
        ControlNet.from_diffusers(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="'UNet2DConditionModel'.*expected 'ControlNetModel'"):
        ControlNet.from_diffusers(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    sd = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    sd.pop("controlnet_mid_block.bias")
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['controlnet_mid_block\.bias'\]"):
        ControlNet.from_diffusers(tmp_path)


def test_bad_inputs_are_named():
    ref = make_ref(SD1)
    ours = ControlNet.from_diffusers(ref)
    x, t, context, image, _ = make_inputs(ref)
    with pytest.raises(ValueError, match=r"control_image must have shape \(2 or 1, 3, 64, 64\).*got \(2, 3, 32, 32\)"):
        ours(x, t, context, image[..., :32, :32])
    with pytest.raises(ValueError, match=r"control_image must have shape.*got \(2, 1, 64, 64\)"):
        ours(x, t, context, image[:, :1])
    with pytest.raises(ValueError, match="no guidance embedding"):
        ours(x, t, context, image, guidance=4.0)
    with pytest.raises(TypeError, match="conditioning_scale must be a number"):
        ours(x, t, context, image, conditioning_scale="1")
    with pytest.raises(ValueError, match="layers_per_block for all levels"):
        ControlNetConfig.tiny(layers_per_level=[1, 2]).to_diffusers_config()
    with pytest.raises(ValueError, match="conditioning_embedding_out_channels must be >= 1"):
        ControlNetConfig.tiny(conditioning_embedding_out_channels=[8, 0])
