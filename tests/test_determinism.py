"""Determinism: the same seed gives the same image in another process, in a batch or alone, with every
sampler, and again from the recipe in its PNG (through `generate --from`)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import latentloom
from latentloom.cli import main as cli_main
from latentloom.samplers import SAMPLERS

CALL = dict(num_inference_steps=3, guidance_scale=4.0, height=16, width=16, progress=False)


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_same_seed_same_png_in_another_process(folder, pipe, tmp_path):
    """A fresh interpreter draws byte-identical pixels from one seed as this one."""
    argv = ["generate", "a red circle", "--model", str(folder), "--seed", "21", "--steps", "3", "--height", "16",
            "--width", "16", "--guidance", "4", "--sampler", "euler_a", "--num-images", "2", "--no-progress", "--dtype", "fp32"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "latentloom", *argv, "-o", str(tmp_path / "a.png")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    there = [_pixels(tmp_path / f"a-{i}.png") for i in range(2)]
    here = pipe("a red circle", seed=21, sampler="euler_a", num_images_per_prompt=2, **CALL).images
    for i in range(2):
        assert np.array_equal(there[i], np.asarray(here[i]))
    assert not np.array_equal(there[0], there[1])  # seed + 1 is another image


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_batch_equals_alone_for_every_sampler(pipe, sampler):
    """Stochastic samplers too: each image of a seeded batch draws from its own generator."""
    kwargs = dict(CALL, sampler=sampler, output_type="np")
    batch = pipe(["a red circle", "a green star"], seed=40, num_images_per_prompt=2,
                 negative_prompt=["blurry", "dark"], **kwargs).images
    # the second image of the first prompt and the first of the second: seed offset and prompt both move
    for i, prompt, negative in ((1, "a red circle", "blurry"), (2, "a green star", "dark")):
        alone = pipe(prompt, seed=40 + i, negative_prompt=negative, **kwargs).images[0]
        np.testing.assert_allclose(batch[i], alone, rtol=0, atol=2e-6, err_msg=f"image {i}")


def test_generator_list_batch_equals_alone(pipe):
    kwargs = dict(CALL, sampler="dpmpp_2m_sde", output_type="np")
    batch = pipe("a red circle", generator=[torch.Generator().manual_seed(s) for s in (5, 9)],
                 num_images_per_prompt=2, **kwargs).images
    for i, s in enumerate((5, 9)):
        alone = pipe("a red circle", generator=torch.Generator().manual_seed(s), **kwargs).images[0]
        np.testing.assert_allclose(batch[i], alone, rtol=0, atol=2e-6)


@pytest.mark.parametrize("settings", [
    dict(sampler="euler_a", karras_sigmas=True, negative_prompt="blurry"),
    dict(sampler="dpmpp_2m_sde", guidance_rescale=0.7),
    dict(sampler="unipc", prompt="un cercle rouge \u2600 \u65e5\u672c (red:1.3)"),
])
def test_recreate_from_png_metadata_is_identical(pipe, folder, tmp_path, settings):
    settings = dict(settings)
    prompt = settings.pop("prompt", "a red circle")
    out = pipe(prompt, seed=77, output_type="pil", **{**CALL, **settings})
    (first,) = out.save(tmp_path / "first.png")
    second = tmp_path / "second.png"
    assert cli_main(["generate", "--from", str(first), "--no-progress", "-o", str(second)]) == 0
    recipe = latentloom.read_metadata(second)
    assert recipe["prompt"] == prompt and recipe["seed"] == 77
    assert np.array_equal(_pixels(first), _pixels(second))


@pytest.mark.parametrize("kind", ["minilm", "clip"])
def test_text_embedding_does_not_depend_on_batch_mates_or_cache_history(kind):
    """A prompt first encoded next to a longer one (and cached) equals the prompt encoded alone by a
    fresh encoder, bit for bit: otherwise an image, or a resumed training run, depends on history."""
    from latentloom.text_encoders import CLIPEncoder, MiniLMEncoder

    if kind == "minilm":
        warm = MiniLMEncoder()
        fresh = MiniLMEncoder(warm.model, warm.tokenizer)
    else:
        from builders import clip_text_model, clip_tokenizer

        warm = CLIPEncoder(clip_text_model(), clip_tokenizer())
        fresh = CLIPEncoder(warm.model, warm.tokenizer)
    mates = ["a red circle", "a much longer caption about a big green star on a blue background", "", "x"]
    batched = warm.encode(mates)
    cached = warm.encode(["a red circle"])
    alone = fresh.encode(["a red circle"])
    assert torch.equal(cached.hidden, alone.hidden) and torch.equal(cached.mask, alone.mask)
    length = alone.hidden.shape[1]
    assert torch.equal(batched.hidden[0, :length], alone.hidden[0])
    assert torch.equal(fresh.encode([""]).hidden[0], batched.hidden[2, : fresh.encode([""]).hidden.shape[1]])
