"""LoRA: training adapters only, saving them alone, merging with a scale, Kohya / diffusers key formats."""
import pytest
import torch
from safetensors.torch import save_file

from latentloom.training.config import TrainConfig
from latentloom.training.lora import add_lora, save_lora
from latentloom.unet.lora import load_lora, lora_metadata, read_lora_file
from latentloom.training.loop import train
from latentloom.synthetic.shapes import write_dataset
from latentloom.unet import UNet, UNetConfig

TINY = dict(channels=[8, 16], layers_per_level=1, attention_levels=[False, True], num_heads=2,
            context_dim=384, norm_groups=8, in_channels=3, out_channels=3)


ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


def forward(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 16, generator=g)
    ctx = torch.randn(2, 5, 384, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), ctx)


def trained_lora_unet(rank=4, alpha=8.0):
    torch.manual_seed(0)
    unet = add_lora(UNet(UNetConfig(**TINY)), rank=rank, alpha=alpha)
    with torch.no_grad():  # as if trained: B is zero at init
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)
    return unet


def base_unet():
    torch.manual_seed(0)
    return UNet(UNetConfig(**TINY))


def test_add_lora_freezes_the_base_and_targets_attention():
    unet = trained_lora_unet()
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(any(t in n for t in (".to_q.", ".to_k.", ".to_v.", ".to_out.0.")) for n in trainable)
    fresh = add_lora(base_unet(), rank=2)  # B = 0 at init: the model is unchanged
    torch.testing.assert_close(forward(fresh), forward(base_unet()))
    with pytest.raises(ValueError, match="rank"):
        add_lora(base_unet(), rank=0)


def test_saved_lora_merges_to_the_same_outputs_with_scale(tmp_path):
    tuned = trained_lora_unet(rank=4, alpha=8.0)
    path = save_lora(tuned, tmp_path / "lora.safetensors")
    assert lora_metadata(path) == {"format": "latentloom-lora", "rank": 4, "alpha": 8.0}
    tensors, _ = read_lora_file(path)
    assert all(".lora_" in k and k.startswith("unet.") for k in tensors)
    merged = base_unet()
    report = load_lora(merged, path)
    assert report.applied_keys == report.total_keys == len(tensors) and not report.unmatched
    torch.testing.assert_close(forward(merged), forward(tuned), atol=1e-5, rtol=1e-4)
    # scale 0.5 lies between; scale -1 takes it back out
    half = base_unet()
    load_lora(half, path, scale=0.5)
    assert 0 < (forward(half) - forward(base_unet())).abs().max() < (forward(tuned) - forward(base_unet())).abs().max()
    load_lora(merged, path, scale=-1.0)
    torch.testing.assert_close(forward(merged), forward(base_unet()), atol=1e-5, rtol=1e-4)


def to_kohya(tensors, alpha):
    out = {}
    for key, value in tensors.items():
        module, _, part = key.removeprefix("unet.").rpartition(".lora_")
        stem = "lora_unet_" + module.replace(".", "_")
        out[f"{stem}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out


def test_kohya_and_old_diffusers_formats_load_the_same(tmp_path):
    tuned = trained_lora_unet(rank=4, alpha=8.0)
    path = save_lora(tuned, tmp_path / "lora.safetensors")
    tensors, _ = read_lora_file(path)
    kohya = tmp_path / "kohya.safetensors"
    save_file(to_kohya(tensors, 8.0), str(kohya))
    a, b = base_unet(), base_unet()
    load_lora(a, path)
    report = load_lora(b, kohya)
    assert report.applied_keys == report.total_keys == len(tensors) * 3 // 2  # + one alpha per module
    torch.testing.assert_close(forward(a), forward(b))
    # the old attention-processor spelling, alpha = rank (no alpha keys, no metadata)
    old = {k.removeprefix("unet.").replace(".to_q.lora_A.weight", ".processor.to_q_lora.down.weight")
           .replace(".to_q.lora_B.weight", ".processor.to_q_lora.up.weight"): v
           for k, v in tensors.items() if ".to_q." in k}
    c = base_unet()
    report = load_lora(c, old)
    assert report.applied_keys == len(old)


def test_kohya_ldm_numbering():
    # lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q is diffusers' mid_block.attentions.0...
    unet = base_unet()
    name = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    w = dict(unet.named_modules())[name].weight
    down, up = torch.randn(2, w.shape[1]), torch.randn(w.shape[0], 2)
    before = w.clone()
    report = load_lora(unet, {"lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
                              "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.lora_up.weight": up})
    assert report.applied_keys == 2
    torch.testing.assert_close(w, before + up @ down)


def test_unmatched_keys_are_reported_never_silently_dropped():
    lora = {"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(2, 8),
            "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(8, 2),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2),
            "something_else": torch.zeros(1)}
    with pytest.raises(ValueError, match="5 of 5 LoRA keys were not applied"):
        load_lora(base_unet(), lora)
    with pytest.warns(UserWarning, match="not applied"):
        report = load_lora(base_unet(), lora, strict=False)
    assert report.applied_keys == 0 and set(report.unmatched) == set(lora)
    assert "no text_encoder was given" in report.unmatched["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"]
    name = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    with pytest.raises(ValueError, match="needs both down"):
        load_lora(base_unet(), {f"unet.{name}.lora_A.weight": torch.zeros(2, 16)})
    with pytest.raises(ValueError, match="weight is"):
        load_lora(base_unet(), {f"unet.{name}.lora_A.weight": torch.zeros(2, 7),
                                f"unet.{name}.lora_B.weight": torch.zeros(16, 2)})
    with pytest.raises(ValueError, match="safetensors"):
        load_lora(base_unet(), "weights.ckpt")
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_lora(base_unet(), "x.safetensors")


def test_lora_training_run_then_load_into_a_pipeline_with_a_scale(tmp_path):
    from builders import tiny_vae

    import latentloom
    from latentloom.pipelines.pipeline import load_lora_into_pipeline

    data = write_dataset(tmp_path / "data", 6, seed=1)
    tiny_vae().save_pretrained(str(tmp_path / "vae"))
    cfg_path = tmp_path / "unet.json"
    UNetConfig(**{**TINY, "in_channels": 4, "out_channels": 4}).save_json(cfg_path)
    common = dict(data=str(data), resolution=16, batch_size=2, progress=False, caption_dropout=0.0)
    base = train(TrainConfig(output=str(tmp_path / "base"), model_config=str(cfg_path), vae=str(tmp_path / "vae"),
                             steps=1, **common))
    out = train(TrainConfig(output=str(tmp_path / "lora"), pretrained=str(base), lora_rank=2, steps=2, lr=1e-2,
                            **common))
    assert (out / "lora.safetensors").is_file() and not (out / "unet").exists()
    pipe = latentloom.load_pipeline(base, device="cpu", dtype="fp32")  # fp32: merging out is exact only there
    call = dict(num_inference_steps=2, seed=0, output_type="np")
    before, hash_before = pipe("a red circle", **call).images, pipe.model_hash()
    report = pipe.load_lora(out / "lora.safetensors", scale=1.0)
    assert report.applied_keys == report.total_keys > 0
    assert pipe.model_hash() != hash_before  # image metadata tells a LoRA'd model apart
    after = pipe("a red circle", **call).images
    assert abs(after - before).max() > 1e-4
    load_lora_into_pipeline(pipe, out / "lora.safetensors", scale=-1.0)
    assert abs(pipe("a red circle", **call).images - before).max() < 1e-3
    with pytest.raises(ValueError, match="pretrained"):
        TrainConfig(output=str(tmp_path / "x"), lora_rank=2, **common)


def test_kohya_text_encoder_keys_go_to_the_text_encoder():
    from builders import clip_text_model

    te = clip_text_model()
    # Kohya spells text_model.encoder...; transformers 5's CLIPTextModel has no text_model level
    (name,) = [n for n, _ in te.named_modules() if n.endswith("encoder.layers.0.mlp.fc1")]
    w = dict(te.named_modules())[name].weight
    before = w.clone()
    down, up = torch.randn(2, w.shape[1]), torch.randn(w.shape[0], 2)
    lora = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up,
            "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}

    class Wrapper:  # a latentloom text encoder holds the transformers model as .model
        model = te
        cleared = False

        def clear_cache(self):
            Wrapper.cleared = True

    report = load_lora(base_unet(), lora, text_encoder=Wrapper(), scale=2.0)
    assert report.applied_keys == 3 and report.modules == [f"text_encoder.{name}"]
    torch.testing.assert_close(w, before + 2.0 * 0.5 * up @ down)
    assert Wrapper.cleared  # cached prompt encodings are dropped
