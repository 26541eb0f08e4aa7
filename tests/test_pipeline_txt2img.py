"""Text-to-image behaviour: determinism, batches, metadata, outputs, and every documented error."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import latentloom
from latentloom.cli import main as cli_main


def make(pipe, prompt="a red circle", **kwargs):
    args = dict(num_inference_steps=3, guidance_scale=4.0, height=16, width=16, progress=False, output_type="np")
    args.update(kwargs)
    return pipe(prompt, **args)


def test_same_seed_same_image_and_other_seed_differs(pipe):
    a, b, c = make(pipe, seed=5).images, make(pipe, seed=5).images, make(pipe, seed=6).images
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_image_in_a_batch_equals_image_made_alone(pipe):
    batch = make(pipe, ["a red circle", "a green star"], seed=7, num_images_per_prompt=2).images
    assert batch.shape == (4, 16, 16, 3)
    alone = make(pipe, "a green star", seed=7 + 3).images
    np.testing.assert_allclose(batch[3], alone[0], atol=1e-5)


def test_output_types(pipe):
    pil = make(pipe, seed=0, output_type="pil").images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (16, 16)
    latents = make(pipe, seed=0, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8)
    arr = make(pipe, seed=0).images
    assert arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1


def test_callback_sees_every_step(pipe):
    seen = []
    make(pipe, seed=0, num_inference_steps=4, callback=lambda i, sigma, x, d: seen.append(i))
    assert seen == [0, 1, 2, 3]


def test_png_metadata_round_trip_and_recreate(pipe, tmp_path):
    out = make(pipe, "a blue square", seed=11, output_type="pil", negative_prompt="blurry")
    (path,) = out.save(tmp_path / "img.png")
    recipe = latentloom.read_metadata(path)
    for key in ("prompt", "negative_prompt", "seed", "num_inference_steps", "sampler", "guidance_scale",
                "height", "width", "model", "model_hash", "dtype", "latentloom_version"):
        assert key in recipe, key
    assert recipe["prompt"] == "a blue square" and recipe["seed"] == 11 and recipe["negative_prompt"] == "blurry"
    assert len(recipe["model_hash"]) == 10
    # the human-readable chunk is AUTOMATIC1111's infotext (tests/test_a1111_infotext.py has the format)
    assert Image.open(path).text["parameters"].startswith("a blue square\nNegative prompt: blurry\nSteps: 3, Sampler: ")
    again = pipe(recipe["prompt"], negative_prompt=recipe["negative_prompt"], seed=recipe["seed"],
                 num_inference_steps=recipe["num_inference_steps"], guidance_scale=recipe["guidance_scale"],
                 sampler=recipe["sampler"], height=recipe["height"], width=recipe["width"], progress=False)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(Image.open(path)))


def test_cli_generate_and_from(folder, tmp_path):
    first = tmp_path / "first.png"
    rc = cli_main(["generate", "a red circle", "--model", str(folder), "--seed", "3", "--steps", "3",
                   "--height", "16", "--width", "16", "--no-progress", "-o", str(first)])
    assert rc == 0 and first.is_file()
    assert latentloom.read_metadata(first)["seed"] == 3
    second = tmp_path / "second.png"
    assert cli_main(["generate", "--from", str(first), "--no-progress", "-o", str(second)]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_cli_errors_exit_2_with_a_message(folder, tmp_path, capsys):
    assert cli_main(["generate", "--model", str(folder)]) == 2
    assert "give a prompt" in capsys.readouterr().err
    assert cli_main(["generate", "x", "--model", str(folder), "--height", "15", "--no-progress"]) == 2
    assert "multiple of 2" in capsys.readouterr().err
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    assert cli_main(["generate", "--from", str(plain)]) == 2
    assert "no latentloom metadata" in capsys.readouterr().err


def test_read_metadata_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        latentloom.read_metadata(tmp_path / "missing.png")
    jpg = tmp_path / "a.jpg"
    Image.new("RGB", (4, 4)).save(jpg)
    with pytest.raises(ValueError, match="no latentloom metadata"):
        latentloom.read_metadata(jpg)
    text = tmp_path / "t.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="not an image"):
        latentloom.read_metadata(text)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prompt=None), TypeError, "str or a list of str"),
        (dict(prompt=[]), ValueError, "empty list"),
        (dict(prompt=["ok", 3]), TypeError, "must be a str"),
        (dict(height=0), ValueError, "height must be >= 1"),
        (dict(height=-16), ValueError, "height must be >= 1"),
        (dict(width=17), ValueError, "width must be a multiple of 2"),
        (dict(height=8192, width=8192), ValueError, "larger than"),
        (dict(height=16.0), TypeError, "height must be an int"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(num_inference_steps=5000), ValueError, "num_inference_steps"),
        (dict(guidance_scale=math.nan), ValueError, "guidance_scale"),
        (dict(guidance_scale=-1.0), ValueError, "guidance_scale"),
        (dict(guidance_rescale=1.5), ValueError, "guidance_rescale"),
        (dict(sampler="nope"), ValueError, "unknown sampler"),
        (dict(output_type="jpeg"), ValueError, "output_type"),
        (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=1, generator=torch.Generator()), ValueError, "either seed or generator"),
        (dict(generator=[torch.Generator()] * 3), ValueError, "one per image"),
        (dict(generator="x"), TypeError, "torch.Generator"),
        (dict(negative_prompt=["a", "b"]), ValueError, "negative prompts"),
    ],
)
def test_documented_errors(pipe, kwargs, error, match):
    kwargs = {"prompt": "a red circle", **kwargs}
    prompt = kwargs.pop("prompt")
    with pytest.raises(error, match=match):
        make(pipe, prompt, **kwargs)


def test_long_and_unicode_prompts_work(pipe):
    assert make(pipe, "a red circle " * 60, seed=0).images.shape == (1, 16, 16, 3)
    assert make(pipe, "un cercle rouge ☀ 日本", seed=0).images.shape == (1, 16, 16, 3)


def test_load_errors(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="no model at"):
        latentloom.load_pipeline(tmp_path / "nothing", device="cpu")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        latentloom.load_pipeline(tmp_path, device="cpu")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((folder / "model_index.json").read_text())
    with pytest.raises(FileNotFoundError, match="missing its unet/"):
        latentloom.load_pipeline(broken, device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        latentloom.load_pipeline(folder, device="cpu", dtype="int8")


def test_missing_bundled_model_is_a_clear_error(monkeypatch, tmp_path):
    import latentloom.pipelines.loading as loading

    monkeypatch.setattr(loading, "bundled_model_dir", lambda name="default": tmp_path / "default")
    with pytest.raises(FileNotFoundError, match="bundled default model is not in this install"):
        latentloom.load_pipeline(device="cpu")


def test_cli_generate_several_prompts(folder, tmp_path):
    out = tmp_path / "many" / "shape.png"
    rc = cli_main(["generate", "a red circle", "a green star", "--model", str(folder), "--seed", "1", "--steps", "2",
                   "--height", "16", "--width", "16", "--no-progress", "-o", str(out)])
    assert rc == 0
    recipes = [latentloom.read_metadata(tmp_path / "many" / f"shape-{i}.png") for i in (0, 1)]
    assert [r["prompt"] for r in recipes] == ["a red circle", "a green star"]
    assert [r["seed"] for r in recipes] == [1, 2]
