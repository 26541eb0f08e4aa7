"""Component configs exactly as releases publish them (tests/data/release_configs/), read by latentloom.

A release's unet/vae/text_encoder config.json leaves keys out, and an absent key means the
library default (diffusers' for the UNet and VAE, transformers' for CLIP). Each test keeps a
published file's exact set of keys, shrinks only the sizes, builds the reference module from that
dict, saves it as a release folder would hold it (weights + the published-shaped config.json)
and loads it the way a user's download is loaded.
"""
import inspect
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import latentloom
from builders import DATA, clip_tokenizer, save_sd_folder, tiny_sd_pipeline
from latentloom.pipelines.runtime import vae_dtype
from latentloom.vae.codec import decode_latents
from latentloom.text_encoders import CLIPEncoder
from latentloom.unet import UNet, UNetConfig

RELEASES = DATA / "release_configs"
SD_UNETS = ["sd15-unet_config.json", "sd15-inpainting-unet_config.json",
            "sd21-base-unet_config.json", "sd21-768-v-unet_config.json"]
SDXL_UNET = "sdxl-base-1.0-unet_config.json"
UNKNOWN_KEYS_WARNING = "ignoring diffusers UNet config keys"


def published(name: str) -> dict:
    return json.loads((RELEASES / name).read_text())


def public_keys(d: dict) -> set:
    return {k for k in d if not k.startswith("_")}


# ---------------------------------------------------------------------- shrinking, keys kept
def shrink_unet(d: dict) -> dict:
    """Same keys as `d`, tiny sizes: 16/32 channels, head dims 8-16, one ResBlock per level, 32-wide text."""
    out = dict(d)
    levels = len(d["block_out_channels"])
    widths = [16, 16, 32, 32][-levels:]
    sizes = dict(block_out_channels=widths, layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                 sample_size=8, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + 32)  # 6 size/crop numbers + pooled text
    out.update({k: v for k, v in sizes.items() if k in d})
    if isinstance(d.get("attention_head_dim"), list):  # heads per level, as SD 2 writes them
        out["attention_head_dim"] = [w // 8 for w in widths]
    elif "attention_head_dim" in d:
        out["attention_head_dim"] = 2
    if isinstance(d.get("transformer_layers_per_block"), list):
        out["transformer_layers_per_block"] = [1] * (levels - 1) + [2]
    assert out.keys() == d.keys()
    return out


def shrink_vae(d: dict) -> dict:
    out = dict(d, block_out_channels=[8, 8, 16, 16][-len(d["block_out_channels"]):], layers_per_block=1,
               norm_num_groups=8, sample_size=32)
    assert out.keys() == d.keys()
    return out


def shrink_clip_text(d: dict) -> dict:
    vocab = len(json.loads((DATA / "clip_vocab.json").read_text()))  # the tiny test tokenizer's
    out = dict(d, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
               projection_dim=16, vocab_size=vocab)
    assert out.keys() == d.keys()
    return out


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    # diffusers zero-initialises output layers; random weights everywhere make every weight count
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.05))
    return module.eval()


def write_published_config(folder: Path, d: dict) -> None:
    """What the release folder holds: only the published keys (save_pretrained writes them all)."""
    (folder / "config.json").write_text(json.dumps(d, indent=2))


def save_unet_folder(d: dict, folder: Path, *, seed: int = 0) -> None:
    torch.manual_seed(seed)
    randomize(UNet2DConditionModel.from_config(d), seed).save_pretrained(folder, safe_serialization=True)
    write_published_config(folder, d)


def diffusers_full_config(d: dict) -> dict:
    """Every key diffusers' UNet2DConditionModel registers for `d` (built on the meta device: no weights)."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return dict(UNet2DConditionModel.from_config(d).config)


UNET_DEFAULTS = {name: p.default for name, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
                 if name != "self"}


def parse(d: dict) -> UNetConfig | str:
    """latentloom's reading of a diffusers UNet config, or "refused" (ValueError / TypeError)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=UNKNOWN_KEYS_WARNING)
            return UNetConfig.from_diffusers_config(d)
    except (ValueError, TypeError):
        return "refused"


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    scale = ref.abs().max().item()
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= tol * scale, f"max abs diff {diff:.3g} > {tol} * {scale:.3g}"


# ---------------------------------------------------------------------- the data files
def test_every_release_file_is_documented_and_parses():
    readme = (RELEASES / "README.md").read_text()
    files = sorted(p.name for p in RELEASES.glob("*.json"))
    assert len(files) >= 12
    for name in files:
        assert f"| {name} |" in readme, f"{name} is not listed in release_configs/README.md"
        assert isinstance(published(name), dict)


def test_published_files_leave_out_the_keys_that_these_tests_are_about():
    # the reason the files are kept verbatim: these absences are what users' folders have
    sd15, sd21_base = published("sd15-unet_config.json"), published("sd21-base-unet_config.json")
    assert not {"upcast_attention", "use_linear_projection", "transformer_layers_per_block", "dropout",
                "num_attention_heads", "class_embed_type", "only_cross_attention"} & sd15.keys()
    assert "upcast_attention" not in sd21_base and published("sd21-768-v-unet_config.json")["upcast_attention"]
    vae = published("sd21-base-vae_config.json")
    assert not {"scaling_factor", "force_upcast", "shift_factor", "latents_mean", "latents_std",
                "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"} & vae.keys()


# ---------------------------------------------------------------------- UNet: absent keys
def test_diffusers_registers_its_signature_defaults_for_absent_keys():
    # what makes `UNET_DEFAULTS` (used for the one-key-removed sweep below) the reference
    for name in SD_UNETS:
        d = published(name)
        full = {k: v for k, v in diffusers_full_config(d).items() if not k.startswith("_")}
        assert full == {**UNET_DEFAULTS, **{k: d[k] for k in public_keys(d)}}


@pytest.mark.parametrize("name", SD_UNETS)
def test_unet_config_reads_absent_keys_as_diffusers_defaults(name):
    d = published(name)
    full = diffusers_full_config(d)
    ours = parse(d)
    assert isinstance(ours, UNetConfig), f"{name} was refused (or warned about unknown keys)"
    assert ours == parse(full)  # the same config with every key written out
    # field by field, against what diffusers resolved
    heads = full["num_attention_heads"] or full["attention_head_dim"]
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(full["block_out_channels"])
    assert [ours.heads_at(i) for i in range(ours.num_levels)] == heads
    depth = full["transformer_layers_per_block"]
    assert ours.transformer_depth == (list(depth) if isinstance(depth, (list, tuple)) else [depth] * ours.num_levels)
    assert ours.context_dim == full["cross_attention_dim"]
    assert ours.use_linear_projection is bool(full["use_linear_projection"])
    assert ours.upcast_attention is bool(full["upcast_attention"])
    assert ours.num_class_embeds == full["num_class_embeds"] and full["class_embed_type"] is None
    assert (ours.flip_sin_to_cos, ours.freq_shift) == (full["flip_sin_to_cos"], full["freq_shift"])
    assert full["time_embedding_dim"] is None and ours.time_embed_dim == 4 * full["block_out_channels"][0]
    assert (ours.norm_groups, ours.norm_eps, ours.dropout) == (full["norm_num_groups"], full["norm_eps"],
                                                               full["dropout"])
    assert (ours.in_channels, ours.out_channels) == (full["in_channels"], full["out_channels"])


@pytest.mark.parametrize("name", [*SD_UNETS, SDXL_UNET])
def test_unet_config_without_any_one_key_reads_like_diffusers(name):
    """Each published key dropped in turn: latentloom's reading equals its reading of the config
    with diffusers' default written in (or both refuse the architecture)."""
    d = published(name)
    for key in sorted(public_keys(d)):
        without = {k: v for k, v in d.items() if k != key}
        with_default = {**without, key: UNET_DEFAULTS[key]}
        assert parse(without) == parse(with_default), f"{name} without {key!r}"


@pytest.mark.parametrize("name", SD_UNETS)
def test_published_unet_folder_gives_diffusers_output(name, tmp_path):
    d = shrink_unet(published(name))
    save_unet_folder(d, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()).keys() == published(name).keys()
    ours = UNet.from_diffusers(tmp_path)
    ref = UNet2DConditionModel.from_pretrained(tmp_path).eval()  # diffusers reading the same absent keys
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, d["in_channels"], 8, 8, generator=g)
    t = torch.tensor([7.5, 640.0])
    context = torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        assert_close(ours(x, t, context), ref(x, t, context).sample)


def test_published_sdxl_unet_folder_gives_diffusers_output(tmp_path):
    """SDXL base's published config (sizes shrunk, keys kept): the vector conditioning y is read from
    addition_embed_type "text_time" and equals diffusers' added_cond_kwargs path."""
    d = shrink_unet(published(SDXL_UNET))
    save_unet_folder(d, tmp_path)
    ours = UNet.from_diffusers(tmp_path)
    ref = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    assert ours.config.adm_in_channels == d["projection_class_embeddings_input_dim"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, d["in_channels"], 8, 8, generator=g)
    t = torch.tensor([7.5, 640.0])
    context = torch.randn(2, 7, 32, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 512.0, 8.0, 0.0, 1024.0, 896.0]])
    with torch.no_grad():
        expected = ref(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        assert_close(ours(x, t, context, y=ours.vector_conditioning(pooled, time_ids)), expected)


# ---------------------------------------------------------------------- a folder shaped like SD 2.1 base
@pytest.fixture(scope="module")
def sd21_base_folder(tmp_path_factory) -> Path:
    """A tiny diffusers folder whose unet/vae/text_encoder configs and scheduler_config.json have
    exactly the keys SD 2.1 base publishes (sizes shrunk)."""
    folder = save_sd_folder(tiny_sd_pipeline(), tmp_path_factory.mktemp("sd21_base"))
    shutil.rmtree(folder / "unet")
    save_unet_folder(shrink_unet(published("sd21-base-unet_config.json")), folder / "unet")

    vae = shrink_vae(published("sd21-base-vae_config.json"))
    torch.manual_seed(0)
    randomize(AutoencoderKL.from_config(vae), 2).save_pretrained(folder / "vae", safe_serialization=True)
    write_published_config(folder / "vae", vae)

    text = shrink_clip_text(published("sd21-base-text_encoder_config.json"))
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig.from_dict({k: v for k, v in text.items() if k != "torch_dtype"}))
    shutil.rmtree(folder / "text_encoder")
    model.save_pretrained(folder / "text_encoder")
    write_published_config(folder / "text_encoder", text)

    shutil.copy(RELEASES / "sd21-base-scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    return folder


@pytest.fixture(scope="module")
def sd21_base_pipe(sd21_base_folder):
    return latentloom.load_pipeline(sd21_base_folder, device="cpu", dtype=torch.float32)


VAE_DEFAULTS = dict(scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
                    force_upcast=True, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)


def test_published_vae_config_takes_diffusers_defaults(sd21_base_folder, sd21_base_pipe):
    vae = sd21_base_pipe.vae
    ref = AutoencoderKL.from_pretrained(sd21_base_folder / "vae").eval()
    for key, value in VAE_DEFAULTS.items():
        assert getattr(vae.config, key) == getattr(ref.config, key) == value, key
    # force_upcast absent = True: an fp16 pipeline keeps this VAE in fp32, as diffusers does
    assert vae_dtype(vae, torch.float16) == torch.float32
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(decode_latents(vae, z, tiling=False), ref.decode(z / ref.config.scaling_factor).sample)


def test_published_unet_sample_size_gives_diffusers_default_size(sd21_base_folder, sd21_base_pipe):
    unet = UNet2DConditionModel.from_pretrained(sd21_base_folder / "unet")
    vae = AutoencoderKL.from_pretrained(sd21_base_folder / "vae")
    side = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)  # diffusers' height / width
    assert (sd21_base_pipe.defaults.height, sd21_base_pipe.defaults.width) == (side, side) == (64, 64)


def test_published_text_encoder_config_loads_as_transformers_reads_it(sd21_base_folder):
    enc = CLIPEncoder.from_pretrained(sd21_base_folder)
    # as a float32 diffusers pipeline loads it (torch_dtype=float32 over the published "float16")
    ref = CLIPTextModel.from_pretrained(sd21_base_folder / "text_encoder", dtype=torch.float32).eval()
    assert enc.model.config.hidden_act == ref.config.hidden_act == "gelu"  # OpenCLIP's, not quick_gelu
    assert enc.model.config.num_hidden_layers == ref.config.num_hidden_layers == 2
    assert enc.model.dtype == ref.dtype == torch.float32
    tok = clip_tokenizer()
    prompt = "a red circle"
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        assert_close(enc.encode([prompt]).hidden, ref(ids).last_hidden_state, tol=1e-5)


def test_float32_pipeline_gets_a_float32_text_encoder_like_diffusers(sd21_base_folder, sd21_base_pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = StableDiffusionPipeline.from_pretrained(sd21_base_folder, torch_dtype=torch.float32,
                                                      safety_checker=None, feature_extractor=None)
    assert ref.text_encoder.dtype == torch.float32
    # the published config says "torch_dtype": "float16"; transformers alone would load that
    assert sd21_base_pipe.text_encoder.model.dtype == torch.float32


# ---------------------------------------------------------------------- SD 1.5's model_index.json
def test_sd15_model_index_naming_absent_safety_checker_loads(tmp_path):
    """SD 1.5's model_index.json names safety_checker/ and feature_extractor/, which a folder without
    them lacks: latentloom does not need them; diffusers loads it only when told they are None."""
    folder = save_sd_folder(tiny_sd_pipeline(), tmp_path)
    shutil.copy(RELEASES / "sd15-model_index.json", folder / "model_index.json")
    shutil.copy(RELEASES / "sd15-scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    assert not (folder / "safety_checker").exists() and not (folder / "feature_extractor").exists()

    pipe = latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(OSError):  # diffusers looks for the safety checker's weights
            StableDiffusionPipeline.from_pretrained(folder)
        ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None)
    assert type(ref.scheduler).__name__ == "PNDMScheduler"
    side = ref.unet.config.sample_size * ref.vae_scale_factor
    assert (pipe.defaults.height, pipe.defaults.width) == (side, side)
    g = torch.Generator().manual_seed(4)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        assert_close(pipe.unet(x, 500, context), ref.unet(x, 500, context).sample)
