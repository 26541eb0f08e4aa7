"""The UNet training loop end to end on a tiny config: exact resume, grad accumulation,
export layout, fine-tuning from an exported folder, caption dropout."""
import json

import pytest
import torch
from safetensors.torch import load_file

from latentloom.training.config import TrainConfig
from latentloom.training.loop import train
from latentloom.synthetic.shapes import write_dataset
from latentloom.training.task_unet import drop_captions
from latentloom.unet import UNet, UNetConfig

TINY = dict(channels=[8, 16], layers_per_level=1, attention_levels=[False, True], num_heads=2,
            context_dim=384, norm_groups=8, in_channels=3, out_channels=3)


ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 12, seed=0)


@pytest.fixture(scope="module")
def unet_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "unet.json"
    UNetConfig(**TINY).save_json(path)
    return str(path)


def run(data, unet_config, out, **kw):
    values = dict(data=str(data), output=str(out), model_config=unet_config, resolution=16, batch_size=3,
                  steps=4, lr=1e-3, lr_warmup_steps=1, checkpoint_every=2, ema=True, ema_decay=0.9,
                  caption_dropout=0.3, min_snr_gamma=5.0, noise_offset=0.1, random_flip=True, progress=False)
    values.update(kw)
    return train(TrainConfig(**values))


def weights(folder):
    return load_file(str(folder / "unet" / "model.safetensors"))


def test_resume_equals_uninterrupted(data, unet_config, tmp_path):
    # EMA, caption dropout, min-SNR, noise offset, random flips, v targets, 2 micro-batches a step
    common = dict(steps=5, prediction_type="v_prediction", batch_size=2, grad_accum=2)
    straight = run(data, unet_config, tmp_path / "a", **common)
    stopped = run(data, unet_config, tmp_path / "b", stop_after=2, **common)
    assert sorted(p.name for p in (stopped / "checkpoints" / "unet").iterdir()) == ["checkpoint-2"]
    resumed = run(data, unet_config, tmp_path / "b", resume="latest", **common)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ckpt_a = load_file(str(straight / "checkpoints" / "unet" / "checkpoint-5" / "model.safetensors"))
    ckpt_b = load_file(str(resumed / "checkpoints" / "unet" / "checkpoint-5" / "model.safetensors"))
    for k in ckpt_a:
        torch.testing.assert_close(ckpt_a[k], ckpt_b[k], rtol=0, atol=0, msg=k)


def test_export_layout_and_ema(data, unet_config, tmp_path):
    out = run(data, unet_config, tmp_path / "out", steps=3, checkpoint_every=10)
    index = json.loads((out / "model_index.json").read_text())
    assert index["format"] == "latentloom" and index["version"] == 1
    assert index["text_encoder"] == {"kind": "minilm"} and index["resolution"] == 16
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                "timestep_spacing", "steps_offset", "rescale_betas_zero_snr"):
        assert key in sched
    unet = UNet.from_pretrained(out / "unet")
    assert unet.config == UNetConfig(**TINY)
    # exported weights are the EMA, not the last step's raw weights
    raw = load_file(str(out / "checkpoints" / "unet" / "checkpoint-3" / "model.safetensors"))
    ema = load_file(str(out / "checkpoints" / "unet" / "checkpoint-3" / "ema.safetensors"))
    exported = weights(out)
    name = "conv_in.weight"
    torch.testing.assert_close(exported[name], ema[f"shadow.{name}"])
    assert not torch.equal(exported[name], raw[name])
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())


def test_grad_accumulation_matches_a_bigger_batch(data, unet_config, tmp_path):
    # Same 6 images per step: 1 x 6 vs 2 x 3 (no dropout/noise offset so only the batching differs;
    # the noise draws differ per micro-batch, so compare the data order and that both train).
    big = run(data, unet_config, tmp_path / "big", steps=2, batch_size=6, ema=False)
    acc = run(data, unet_config, tmp_path / "acc", steps=2, batch_size=3, grad_accum=2, ema=False)
    for out in (big, acc):
        state = json.loads((out / "checkpoints" / "unet" / "checkpoint-2" / "state.json").read_text())
        assert state["position"] == 12
    assert not torch.equal(weights(big)["conv_in.weight"], weights(acc)["conv_in.weight"])


def test_fine_tune_from_exported_folder(data, unet_config, tmp_path):
    base = run(data, unet_config, tmp_path / "base", steps=2, ema=False, prediction_type="v_prediction")
    with pytest.warns(UserWarning, match="prediction_type"):
        tuned = run(data, None, tmp_path / "tuned", steps=2, ema=False, pretrained=str(base), model_config=None)
    sched = json.loads((tuned / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"  # the model's own objective is kept
    assert UNet.from_pretrained(tuned / "unet").config == UNet.from_pretrained(base / "unet").config
    assert not torch.equal(weights(base)["conv_in.weight"], weights(tuned)["conv_in.weight"])


def test_bf16_autocast_with_gradient_checkpointing(data, unet_config, tmp_path):
    out = run(data, unet_config, tmp_path / "bf16", steps=2, mixed_precision="bf16", gradient_checkpointing=True,
              num_workers=1)
    w = weights(out)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in w.values())  # fp32 master weights


def test_caption_dropout():
    gen = torch.Generator().manual_seed(0)
    captions = [f"c{i}" for i in range(2000)]
    dropped = drop_captions(captions, p=0.25, generator=gen)
    share = sum(c == "" for c in dropped) / len(dropped)
    assert 0.2 < share < 0.3
    assert all(d in ("", c) for d, c in zip(dropped, captions))
    assert drop_captions(captions[:3], p=0.0, generator=gen) == captions[:3]
    assert drop_captions(captions[:3], p=1.0, generator=gen) == ["", "", ""]


def test_config_errors_reach_the_user(data, tmp_path):
    bad = tmp_path / "bad.json"
    UNetConfig(**{**TINY, "context_dim": 32}).save_json(bad)
    with pytest.raises(ValueError, match="context_dim=32"):
        run(data, str(bad), tmp_path / "o", steps=1)
    wrong_in = tmp_path / "wrong_in.json"
    UNetConfig(**{**TINY, "in_channels": 4}).save_json(wrong_in)
    with pytest.raises(ValueError, match="in_channels=4"):
        run(data, str(wrong_in), tmp_path / "o", steps=1)


def test_progress_log_and_nan_guard(data, unet_config, tmp_path):
    out = run(data, unet_config, tmp_path / "log", steps=3, log_every=2, checkpoint_every=10)
    lines = [json.loads(x) for x in (out / "checkpoints" / "unet-log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 3]
    assert all(x["images_per_s"] > 0 and x["loss"] > 0 for x in lines)
    with pytest.raises(FloatingPointError, match="loss became (nan|inf) at step 1"):
        run(data, unet_config, tmp_path / "nan", steps=2, noise_offset=float("inf"))
    assert not (tmp_path / "nan" / "checkpoints" / "unet").exists()  # nothing was saved from a broken step


def test_fine_tune_a_stable_diffusion_folder(data, tmp_path):
    from builders import save_sd_folder, tiny_sd_pipeline

    import latentloom

    sd = save_sd_folder(tiny_sd_pipeline(), tmp_path / "sd")
    out = run(data, None, tmp_path / "tuned", steps=2, ema=False, pretrained=str(sd), model_config=None,
              caption_dropout=0.5)
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == {"kind": "clip"} and index["use_context_mask"] is False
    assert (out / "text_encoder" / "config.json").is_file() and (out / "vae" / "config.json").is_file()
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear" and sched["prediction_type"] == "epsilon"
    pipe = latentloom.load_pipeline(out, device="cpu")
    assert pipe.use_context_mask is False
    image = pipe("a red circle", num_inference_steps=2, seed=0, height=16, width=16).images[0]
    assert image.size == (16, 16)
    again = run(data, None, tmp_path / "again", steps=1, ema=False, pretrained=str(out), model_config=None)
    assert json.loads((again / "model_index.json").read_text())["text_encoder"] == {"kind": "clip"}
