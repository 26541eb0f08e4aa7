"""Original single-file SD checkpoints load into latentloom and give diffusers' images."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import latentloom
from latentloom.unet import UNetConfig
from builders import save_sd_folder, tiny_sd_pipeline, to_single_file, use_scheduler


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    pipe = tiny_sd_pipeline(text_hidden=64)
    folder = save_sd_folder(pipe, root / "folder")
    return pipe, to_single_file(pipe, root / "model.safetensors"), folder


def load(files, **kwargs):
    """The tiny UNet is not SD-shaped (8 norm groups, 4 heads), so its config is given."""
    pipe, path, folder = files
    config = UNetConfig.from_diffusers_config(dict(pipe.unet.config))
    return latentloom.load_pipeline(path, device="cpu", dtype=torch.float32, tokenizer=folder, unet_config=config,
                                    **kwargs)


def test_single_file_gives_diffusers_images(files):
    pipe, _, _ = files
    ours = load(files)
    args = dict(prompt=["a red circle", "two stars"], num_inference_steps=4, guidance_scale=6.0, height=16, width=16)
    use_scheduler(pipe, "dpmpp_2m")
    expected = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **args).images
    # that reference states leading spacing; the file samples as from_single_file would (SD 1.5's published
    # config, no spacing: test_single_file_schedule.py), so this call states the reference's
    got = ours(**args, sampler="dpmpp_2m", generator=torch.Generator().manual_seed(0), output_type="np",
               progress=False, scheduler_config={"timestep_spacing": "leading"}).images
    assert np.abs(got - expected).max() < 1e-4


def test_single_file_weights_equal_the_folder(files):
    pipe, _, _ = files
    ours = load(files)
    for name, value in pipe.vae.state_dict().items():
        assert torch.equal(ours.vae.state_dict()[name], value), name
    for name, value in pipe.text_encoder.state_dict().items():
        assert torch.equal(ours.text_encoder.model.state_dict()[name], value), name


def test_single_file_needs_a_tokenizer(files, tmp_path):
    pipe, path, _ = files
    config = UNetConfig.from_diffusers_config(dict(pipe.unet.config))
    with pytest.raises(FileNotFoundError, match="does not contain its tokenizer"):
        latentloom.load_pipeline(path, device="cpu", unet_config=config)
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer"):
        latentloom.load_pipeline(path, device="cpu", tokenizer=tmp_path, unet_config=config)


def test_single_file_without_a_unet_or_vae_is_an_error(files, tmp_path):
    empty = tmp_path / "empty.safetensors"
    save_file({"something.else": torch.zeros(1)}, str(empty))
    with pytest.raises(ValueError, match="no Stable Diffusion UNet"):
        latentloom.load_pipeline(empty, device="cpu")
    pipe, path, folder = files
    from safetensors.torch import load_file

    no_vae = {k: v for k, v in load_file(str(path)).items() if not k.startswith("first_stage_model.")}
    save_file(no_vae, str(tmp_path / "novae.safetensors"))
    with pytest.raises(ValueError, match="holds no VAE"):
        latentloom.load_pipeline(tmp_path / "novae.safetensors", device="cpu", tokenizer=folder,
                                 unet_config=UNetConfig.from_diffusers_config(dict(pipe.unet.config)))


def test_pickle_checkpoint_is_refused_by_default(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="pickle checkpoint.*allow_pickle=True"):
        latentloom.load_pipeline(path, device="cpu")


def test_truncated_safetensors_is_a_clear_error(files, tmp_path):
    _, path, _ = files
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        latentloom.load_pipeline(broken, device="cpu")
