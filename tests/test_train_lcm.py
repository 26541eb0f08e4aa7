"""Latent consistency distillation end to end on tiny components: the loss falls, a stop and resume
gives bit for bit the uninterrupted run (the EMA target network included), and the result (an LCM
model folder, or an LCM-LoRA for the teacher) loads and samples in 2-4 steps."""
import json

import pytest
import torch
from safetensors.torch import load_file

import latentloom
from builders import save_sd_folder, tiny_sd_pipeline
from latentloom.synthetic.shapes import write_dataset
from latentloom.training.config import TrainConfig
from latentloom.training.loop import train

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 8, seed=0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_sd_folder(tiny_sd_pipeline(), tmp_path_factory.mktemp("teacher"))


def run(data, teacher, out, **kw):
    values = dict(model="lcm", data=str(data), output=str(out), pretrained=str(teacher), resolution=16, batch_size=4,
                  steps=4, lr=1e-3, lr_warmup_steps=0, checkpoint_every=2, random_flip=False, progress=False,
                  lcm_num_ddim_timesteps=20, log_every=1)
    values.update(kw)
    return train(TrainConfig(**values))


def logged_losses(out):
    lines = (out / "checkpoints" / "lcm-log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_full_distillation_learns_resumes_exactly_and_samples_in_few_steps(data, teacher, tmp_path):
    straight = run(data, teacher, tmp_path / "a", steps=4)
    stopped = run(data, teacher, tmp_path / "b", steps=4, stop_after=2)
    resumed = run(data, teacher, tmp_path / "b", steps=4, resume="latest")
    a = load_file(str(straight / "checkpoints" / "lcm" / "checkpoint-4" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "lcm" / "checkpoint-4" / "model.safetensors"))
    assert any(k.startswith("target.") for k in a) and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert stopped == resumed

    pipe = latentloom.load_pipeline(straight, device="cpu", dtype=torch.float32)
    assert pipe.unet.config.time_cond_proj_dim == 256
    assert (pipe.defaults.sampler, pipe.defaults.num_inference_steps) == ("lcm", 4)
    assert pipe.schedule_config.original_inference_steps == 20
    for steps in (2, 4):
        result = pipe("a red circle", num_inference_steps=steps, seed=0, progress=False)
        assert result.images[0].size == (16, 16) and result.recipes[0]["guidance_mode"] == "embedded"


def test_the_loss_falls(data, teacher, tmp_path):
    out = run(data, teacher, tmp_path / "long", steps=30, checkpoint_every=100, lr=3e-3, lcm_loss="l2")
    losses = logged_losses(out)
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"lcm distillation loss: first 5 steps {first:.4g}, last 5 {last:.4g}")
    assert last < 0.7 * first


def test_lcm_lora_distillation_writes_a_lora_the_teacher_loads(data, teacher, tmp_path):
    out = run(data, teacher, tmp_path / "lora", lora_rank=4, gradient_checkpointing=True)
    lora = load_file(str(out / "lora.safetensors"))
    assert any("conv1" in k for k in lora) and any("proj_in" in k for k in lora)
    pipe = latentloom.load_pipeline(teacher, device="cpu", dtype=torch.float32)
    report = pipe.load_lora(out / "lora.safetensors")
    assert report.applied_keys == report.total_keys > 0
    image = pipe("a red circle", sampler="lcm", num_inference_steps=4, guidance_scale=1.0, height=16, width=16,
                 seed=1, progress=False).images[0]
    assert image.size == (16, 16)


def test_distillation_settings_are_checked(data, teacher):
    with pytest.raises(ValueError, match="model='lcm' distils a teacher"):
        TrainConfig(model="lcm", data=str(data))
    with pytest.raises(ValueError, match="lcm_w_min <= lcm_w_max"):
        TrainConfig(model="lcm", data=str(data), pretrained=str(teacher), lcm_w_min=5.0, lcm_w_max=2.0)
    with pytest.raises(ValueError, match="lcm_loss='l1' is not one of"):
        TrainConfig(model="lcm", data=str(data), pretrained=str(teacher), lcm_loss="l1")


def test_sdxl_teacher_distils_into_an_sdxl_lcm_folder(data, tmp_path):
    """SDXL: the teacher, student and target all read y (pooled text + each image's size and crop)."""
    from builders import tiny_sdxl_pipeline

    teacher_folder = save_sd_folder(tiny_sdxl_pipeline(), tmp_path / "sdxl")
    out = run(data, teacher_folder, tmp_path / "out", steps=2)
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == {"kind": "sdxl"} and (out / "text_encoder_2").is_dir()
    pipe = latentloom.load_pipeline(out, device="cpu", dtype=torch.float32)
    assert pipe.unet.config.time_cond_proj_dim == 256 and pipe.unet.config.adm_in_channels is not None
    result = pipe("a red circle", num_inference_steps=2, seed=0, original_size=(32, 32), progress=False)
    assert result.images[0].size == (16, 16) and result.recipes[0]["guidance_mode"] == "embedded"


def test_caption_dropout_reaches_the_teacher_and_cached_latents_are_refused(data, teacher, tmp_path, monkeypatch):
    from latentloom.text_encoders.base import FrozenTextEncoder

    seen = []
    original = FrozenTextEncoder.encode_pair

    def spy(self, prompts, negative_prompts=None):
        seen.append(list(prompts))
        return original(self, prompts, negative_prompts)

    monkeypatch.setattr(FrozenTextEncoder, "encode_pair", spy)
    run(data, teacher, tmp_path / "dropped", steps=1, caption_dropout=1.0)
    assert seen and all(c == "" for batch in seen for c in batch)
    with pytest.raises(ValueError, match="cache_latents is not supported for distillation"):
        run(data, teacher, tmp_path / "cached", cache_latents=True)
    with pytest.raises(ValueError, match=r"\['min_snr_gamma'\] do not apply to distillation"):
        run(data, teacher, tmp_path / "snr", min_snr_gamma=5.0)
