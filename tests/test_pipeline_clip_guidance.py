"""CLIP guidance in the pipeline: works with the small image-text model, raises similarity."""
import pytest
import torch

import latentloom
from builders import save_sd_folder, tiny_sd_pipeline
from latentloom.text_encoders.image_text import ImageTextConfig, ImageTextModel


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = save_sd_folder(tiny_sd_pipeline(), tmp_path_factory.mktemp("sd"))
    pipe = latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    pipe.clip_model = ImageTextModel(ImageTextConfig(channels=[8, 16], embed_dim=16, text_dim=32, resolution=16,
                                                     norm_groups=4)).eval()
    return pipe


def similarity(pipe, images, prompt):
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        return pipe.clip_model.similarity(pixels, pipe.text_encoder.encode([prompt] * len(images))).mean().item()


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim"])
def test_clip_guidance_raises_similarity(pipe, sampler):
    args = dict(num_inference_steps=4, guidance_scale=3.0, height=16, width=16, seed=0, sampler=sampler,
                output_type="np", progress=False)
    plain = pipe("a red circle", **args).images
    guided = pipe("a red circle", clip_guidance_scale=200.0, **args).images
    assert similarity(pipe, guided, "a red circle") > similarity(pipe, plain, "a red circle")


def test_clip_guidance_without_a_model_is_an_error(pipe):
    model, pipe.clip_model = pipe.clip_model, None
    try:
        with pytest.raises(ValueError, match="needs an image-text model"):
            pipe("x", clip_guidance_scale=1.0, num_inference_steps=2, height=16, width=16, progress=False)
    finally:
        pipe.clip_model = model
