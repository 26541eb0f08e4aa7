"""UNet forward contract, switches (checkpointing, dtypes, layouts) and save/load."""
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from latentloom.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny()).eval()


def inputs(B=2, L=5, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, size, size, generator=g), torch.randn(B, L, 32, generator=g)


def test_properties(unet):
    assert unet.config == UNetConfig.tiny()
    assert unet.dtype == torch.float32 and unet.device == torch.device("cpu")


def test_timestep_forms_agree(unet):
    x, c = inputs()
    with torch.no_grad():
        ref = unet(x, torch.tensor([7.0, 7.0]), c)
        for t in (7, 7.0, torch.tensor(7), torch.tensor([7]), torch.tensor([7, 7]),
                  torch.tensor(7.0, dtype=torch.float64)):
            torch.testing.assert_close(unet(x, t, c), ref, rtol=0, atol=0)
        # a fractional timestep is used as is, not rounded
        assert not torch.equal(unet(x, 7.5, c), ref)


def test_batch_item_equals_item_alone(unet):
    x, c = inputs(B=3)
    t = torch.tensor([3.0, 500.0, 999.0])
    with torch.no_grad():
        batched = unet(x, t, c)
        alone = unet(x[1:2], t[1:2], c[1:2])
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=1e-5)


def test_padding_tokens_are_ignored_under_the_mask(unet):
    x, c = inputs(B=1, L=6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    c2 = c.clone()
    c2[:, 4:] = torch.randn(1, 2, 32) * 10  # change only the padding tokens
    with torch.no_grad():
        a = unet(x, 10, c, context_mask=mask)
        b = unet(x, 10, c2, context_mask=mask)
        short = unet(x, 10, c[:, :4])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, short, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda m, x, c: m(x[:, :3], 1, c), r"x must have shape \(B, 4, H, W\)"),
    (lambda m, x, c: m(x, 1, c[..., :16]), r"context must have shape \(2, L, 32\)"),
    (lambda m, x, c: m(x, 1, c[:1]), r"context must have shape \(2, L, 32\)"),
    (lambda m, x, c: m(x, 1, c, context_mask=torch.ones(2, 4)), r"context_mask must have shape \(2, 5\)"),
    (lambda m, x, c: m(x, torch.ones(3), c), r"t must be a scalar or have shape \(2,\)"),
    (lambda m, x, c: m(x, torch.ones(2, 1), c), r"t must be a scalar or have shape \(2,\)"),
    (lambda m, x, c: m(x, 1, c, class_labels=torch.zeros(2, dtype=torch.long)), "has no class embedding"),
])
def test_bad_inputs_raise(unet, call, match):
    x, c = inputs()
    with pytest.raises(ValueError, match=match):
        call(unet, x, c)


def test_bad_timestep_type_raises(unet):
    x, c = inputs()
    with pytest.raises(TypeError, match="t must be a number or a tensor"):
        unet(x, "500", c)
    with pytest.raises(TypeError, match="UNet expects a UNetConfig"):
        UNet({"channels": [16, 32]})


def test_class_labels_required_and_used():
    torch.manual_seed(0)
    m = UNet(UNetConfig.tiny(in_channels=7, num_class_embeds=10)).eval()
    x, c = torch.randn(2, 7, 8, 8), torch.randn(2, 3, 32)
    with pytest.raises(ValueError, match=r"needs class_labels \(B,\) ints in \[0, 10\)"):
        m(x, 1, c)
    with pytest.raises(ValueError, match=r"class_labels must be \(2,\) integers"):
        m(x, 1, c, class_labels=torch.zeros(2))
    with torch.no_grad():
        a = m(x, 1, c, class_labels=torch.tensor([0, 0]))
        b = m(x, 1, c, class_labels=torch.tensor([0, 5]))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = UNet(UNetConfig.tiny(transformer_depth=2)).train()
    x, c = inputs()

    def grads():
        m.zero_grad()
        m(x, 5, c).square().mean().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    plain = grads()
    m.enable_gradient_checkpointing()
    assert m.gradient_checkpointing
    ckpt = grads()
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, atol=1e-6, rtol=1e-5)
    m.enable_gradient_checkpointing(False)
    assert not m.gradient_checkpointing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_and_channels_last_stay_close_to_fp32(dtype):
    torch.manual_seed(0)
    m = UNet(UNetConfig.tiny(upcast_attention=True)).eval()
    x, c = inputs()
    with torch.no_grad():
        ref = m(x, 10, c)
        cl = m.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), 10, c)
        torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-5)
        half = m.to(dtype)
        assert half.dtype == dtype
        out = half(x, 10, c)  # fp32 inputs are cast to the weights' dtype ...
    assert out.dtype == torch.float32  # ... and the prediction returns in x's dtype
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_save_and_load_pretrained(tmp_path, unet):
    unet.save_pretrained(tmp_path / "u")
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == ["config.json", "model.safetensors"]
    assert UNetConfig.load_json(tmp_path / "u" / "config.json") == unet.config
    loaded = UNet.from_pretrained(tmp_path / "u")
    x, c = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, 3, c), unet(x, 3, c))
    assert UNet.from_pretrained(tmp_path / "u", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_channels_last_weights_save_and_reload(tmp_path):
    m = UNet(UNetConfig.tiny()).to(memory_format=torch.channels_last)
    m.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "model.safetensors")) == set(m.state_dict())


def test_load_pretrained_errors(tmp_path, unet):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        UNet.from_pretrained(tmp_path)
    unet.config.save_json(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        UNet.from_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in unet.state_dict().items()}
    sd.pop("conv_out.bias")
    sd["extra.weight"] = torch.zeros(2)
    sd["conv_in.weight"] = torch.zeros(3, 3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        UNet.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing keys (1): ['conv_out.bias']" in msg
    assert "unexpected keys (1): ['extra.weight']" in msg
    assert "conv_in.weight: (3, 3) != (16, 4, 3, 3)" in msg


def tiny_diffusers():
    torch.manual_seed(0)
    return UNet2DConditionModel(**UNetConfig.tiny().to_diffusers_config()).eval()


def test_from_diffusers_folder_plain_fp16_variant_and_pickle(tmp_path):
    ref = tiny_diffusers()
    ref.save_pretrained(tmp_path / "plain")  # diffusion_pytorch_model.safetensors
    x, c = inputs()
    with torch.no_grad():
        expected = ref(x, 4, c).sample
        got = UNet.from_diffusers(tmp_path / "plain")(x, 4, c)
        # from_pretrained recognises a diffusers folder too
        again = UNet.from_pretrained(tmp_path / "plain")(x, 4, c)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got, again)

    ref.to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert UNet.from_diffusers(tmp_path / "fp16").dtype == torch.float16
    assert UNet.from_diffusers(tmp_path / "fp16", dtype=torch.float32).dtype == torch.float32

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(dict(ref.config)))
    torch.save({}, tmp_path / "bin" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickle weights"):
        UNet.from_diffusers(tmp_path / "bin")
    (tmp_path / "bin" / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        UNet.from_diffusers(tmp_path / "bin")


def test_from_diffusers_errors(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="pass its 'unet' subfolder"):
        UNet.from_diffusers(tmp_path)
    with pytest.raises(TypeError, match="expected a diffusers UNet2DConditionModel"):
        UNet.from_diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="takes a UNet2DConditionModel or a folder path"):
        UNet.from_diffusers(42)
    with pytest.raises(TypeError, match="takes a dict of tensors"):
        UNet.from_ldm_state_dict([1, 2])
    with pytest.raises(ValueError, match="not an LDM UNet state dict"):
        UNet.from_ldm_state_dict({"first_stage_model.x": torch.zeros(1)})


def test_from_diffusers_copies_the_weights():
    ref = tiny_diffusers()
    ours = UNet.from_diffusers(ref)
    with torch.no_grad():
        ours.conv_in.weight.zero_()
    assert ref.conv_in.weight.abs().sum() > 0  # the diffusers module is untouched
    assert UNet.from_diffusers(ref, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_conv_projection_in_a_linear_config_is_an_error():
    ref = tiny_diffusers()  # SD-1.x-style 1x1 conv projections
    sd = {k: v for k, v in ref.state_dict().items()}
    from latentloom.unet.convert import diffusers_to_ours

    with pytest.raises(ValueError, match="is a 1x1 conv .* use_linear_projection=True"):
        diffusers_to_ours(sd, UNetConfig.tiny(use_linear_projection=True))
