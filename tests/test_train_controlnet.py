"""ControlNet training end to end on tiny components: the loss falls, a stop and resume gives bit for
bit the uninterrupted run (EMA, cached latents, flips and caption dropout included), the result is a
ControlNet folder the pipeline loads and that changes the images, and options the task does not use
are refused."""
import json

import pytest
import torch
from safetensors.torch import load_file

import latentloom
from builders import save_sd_folder, tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_sdxl_refiner
from latentloom.synthetic.shapes import make_item, render_control_map, write_dataset
from latentloom.training.config import TrainConfig
from latentloom.training.loop import train
from latentloom.training.task_controlnet import control_widths, export_checkpoint

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 8, seed=0, control_maps=True)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_sd_folder(tiny_sd_pipeline(), tmp_path_factory.mktemp("teacher"))


def run(data, teacher, out, **kw):
    values = dict(model="controlnet", data=str(data), output=str(out), pretrained=str(teacher), resolution=16,
                  batch_size=4, steps=4, lr=1e-3, lr_warmup_steps=0, checkpoint_every=2, random_flip=False,
                  progress=False, log_every=1)
    values.update(kw)
    return train(TrainConfig(**values))


def test_resume_is_exact_and_the_result_loads_and_steers(data, teacher, tmp_path):
    common = dict(steps=4, ema=True, ema_decay=0.9, random_flip=True, caption_dropout=0.5, cache_latents=True)
    straight = run(data, teacher, tmp_path / "a", **common)
    run(data, teacher, tmp_path / "b", stop_after=2, **common)
    resumed = run(data, teacher, tmp_path / "b", resume="latest", **common)
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(straight / "checkpoints" / "controlnet" / "checkpoint-4" / name))
        b = load_file(str(resumed / "checkpoints" / "controlnet" / "checkpoint-4" / name))
        assert a.keys() == b.keys() and any("controlnet_down_blocks" in k for k in a)
        assert not any(k.startswith("up_blocks") for k in a)  # the frozen UNet is not in the checkpoint
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert (straight / "config.json").is_file() and (straight / "diffusion_pytorch_model.safetensors").is_file()
    # a checkpoint exports to the same folder the finished run wrote (its EMA weights), or in fp16
    again = export_checkpoint(straight / "checkpoints" / "controlnet" / "checkpoint-4", tmp_path / "again")
    final = load_file(str(straight / "diffusion_pytorch_model.safetensors"))
    exported = load_file(str(again / "diffusion_pytorch_model.safetensors"))
    assert final.keys() == exported.keys() and all(torch.equal(v, exported[k]) for k, v in final.items())
    half = export_checkpoint(straight / "checkpoints" / "controlnet" / "checkpoint-4", tmp_path / "half",
                             dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in load_file(str(half / "diffusion_pytorch_model.safetensors")).values())

    plain = latentloom.load_pipeline(teacher, device="cpu", dtype=torch.float32)
    pipe = latentloom.load_pipeline(teacher, controlnet=straight, device="cpu", dtype=torch.float32)
    _, text, scene = make_item(0, seed=0)
    control = render_control_map(scene, size=16)
    kw = dict(height=16, width=16, num_inference_steps=4, seed=0, progress=False, output_type="np")
    without = plain(text, **kw).images[0]
    steered = pipe(text, control_image=control, **kw).images[0]
    assert abs(torch.as_tensor(steered) - torch.as_tensor(without)).max() > 1e-3


def test_the_loss_falls(data, teacher, tmp_path):
    out = run(data, teacher, tmp_path / "long", steps=80, checkpoint_every=100, lr=3e-3, caption_dropout=0.0)
    lines = (out / "checkpoints" / "controlnet-log.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert len(losses) == 80
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"controlnet loss: first 20 steps {first:.4g}, last 20 {last:.4g}")
    assert last < 0.8 * first


def test_unused_options_and_missing_maps_are_refused(data, teacher, tmp_path):
    with pytest.raises(ValueError, match="pretrained"):
        TrainConfig(model="controlnet", data=str(data), output=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="LoRA trains the UNet only"):
        run(data, teacher, tmp_path / "bad", lora_rank=4)
    for bad in (dict(vae=str(teacher)), dict(prediction_type="v_prediction"), dict(lcm_w_min=1.0),
                dict(low_resolution=16)):
        with pytest.raises(ValueError, match="do not apply to ControlNet training"):
            run(data, teacher, tmp_path / "bad", **bad)
    plain = write_dataset(tmp_path / "nomaps", 2, seed=0)
    with pytest.raises(ValueError, match="conditioning"):
        run(plain, teacher, tmp_path / "bad2")


def test_control_widths_follow_the_vae_factor():
    assert control_widths(8) == (16, 32, 96, 256) and control_widths(4) == (16, 32, 96)
    with pytest.raises(ValueError, match="factor is 3"):
        control_widths(3)


@pytest.fixture(scope="module")
def sdxl_teacher(tmp_path_factory):
    return save_sd_folder(tiny_sdxl_pipeline(), tmp_path_factory.mktemp("sdxl-teacher"))


def test_sdxl_controlnet_trains_resumes_exactly_and_steers(data, sdxl_teacher, tmp_path):
    """An SDXL base: the ControlNet reads the UNet's vector conditioning (pooled text, size and crop)."""
    common = dict(steps=4, ema=True, ema_decay=0.9, random_flip=True, caption_dropout=0.5, cache_latents=True)
    straight = run(data, sdxl_teacher, tmp_path / "a", **common)
    run(data, sdxl_teacher, tmp_path / "b", stop_after=2, **common)
    resumed = run(data, sdxl_teacher, tmp_path / "b", resume="latest", **common)
    a = load_file(str(straight / "checkpoints" / "controlnet" / "checkpoint-4" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "controlnet" / "checkpoint-4" / "model.safetensors"))
    assert any(k.startswith("add_embedding") for k in a)  # its own copy of the vector embedding, trained
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    from diffusers import ControlNetModel

    assert ControlNetModel.from_pretrained(straight).config.addition_embed_type == "text_time"
    plain = latentloom.load_pipeline(sdxl_teacher, device="cpu", dtype=torch.float32)
    pipe = latentloom.load_pipeline(sdxl_teacher, controlnet=straight, device="cpu", dtype=torch.float32)
    _, text, scene = make_item(0, seed=0)
    kw = dict(height=16, width=16, num_inference_steps=4, seed=0, progress=False, output_type="np")
    steered = pipe(text, control_image=render_control_map(scene, size=16), **kw).images[0]
    assert abs(torch.as_tensor(steered) - torch.as_tensor(plain(text, **kw).images[0])).max() > 1e-3


def test_sdxl_refiner_is_refused(data, tmp_path):
    refiner = save_sd_folder(tiny_sdxl_refiner(), tmp_path / "refiner")
    with pytest.raises(ValueError, match="SDXL refiner"):
        run(data, refiner, tmp_path / "out")
