"""AUTOMATIC1111 infotext both ways: the `parameters` chunk latentloom writes, and A1111 / Forge PNGs read back."""
import warnings

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import latentloom
from latentloom.cli import main as cli_main
from latentloom.pipelines.infotext import A1111_SAMPLERS, a1111_sampler, infotext, parse_infotext
from latentloom.pipelines.metadata import read_metadata, save_png
from latentloom.samplers import SAMPLERS

BASE = {"num_inference_steps": 20, "guidance_scale": 7.0, "seed": 123, "height": 512, "width": 512,
        "model": "v1-5", "model_hash": "6ce0161689", "latentloom_version": "0.1.0", "task": "txt2img",
        "guidance_rescale": 0.0, "clip_guidance_scale": 0.0, "karras_sigmas": False}


def recipe(**fields):
    return {**BASE, "prompt": "a lighthouse", "negative_prompt": None, "sampler": "euler_a",
            "scheduler_config": {"timestep_spacing": "linspace"}, **fields}


def parse_quietly(text):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parsed = parse_infotext(text)
    return parsed, [str(w.message) for w in caught]


def a1111_png(path, text, size=(64, 64)):
    """A PNG as A1111 saves it: the image and one `parameters` text chunk, no latentloom JSON."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", size, "gray").save(path, pnginfo=info)
    return path


# --- writing -------------------------------------------------------------------------------------------------

def test_infotext_plain_recipe():
    assert infotext(recipe()) == (
        "a lighthouse\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7, Seed: 123, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5, Timestep spacing: linspace, Version: latentloom 0.1.0")


def test_infotext_quotes_commas_colons_and_newlines_and_writes_karras():
    text = infotext(recipe(prompt="a cat, sitting: on a mat\nsecond line", negative_prompt="blurry, bad: ugly",
                           sampler="dpmpp_2m", karras_sigmas=True, guidance_scale=7.5, model="bundled:default",
                           guidance_rescale=0.7, height=768))
    assert text == (
        "a cat, sitting: on a mat\nsecond line\n"
        "Negative prompt: blurry, bad: ugly\n"
        'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 123, Size: 512x768, '
        'Model hash: 6ce0161689, Model: "bundled:default", Guidance rescale: 0.7, Timestep spacing: linspace, '
        "Version: latentloom 0.1.0")


def test_infotext_img2img_denoising_strength_and_latentloom_settings():
    text = infotext(recipe(task="img2img", strength=0.6, sampler="tcd", eta=0.3, cache_interval=2,
                           clip_guidance_scale=100.0, scheduler_config={"timestep_spacing": "trailing"}))
    assert text == (
        "a lighthouse\n"
        "Steps: 20, Sampler: TCD, Schedule type: SGM Uniform, CFG scale: 7, Seed: 123, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5, Denoising strength: 0.6, CLIP guidance scale: 100, TCD eta: 0.3, "
        "Timestep spacing: trailing, Cache interval: 2, Version: latentloom 0.1.0")
    custom = infotext(recipe(sampler="euler", timesteps=[999, 759, 499, 259], num_inference_steps=4))
    # a caller's own schedule has no A1111 schedule type; the list is JSON-quoted (it holds commas)
    assert "Schedule type" not in custom and 'Timesteps: "[999, 759, 499, 259]"' in custom


def test_every_sampler_has_an_a1111_name_that_reads_back():
    assert set(A1111_SAMPLERS) == set(SAMPLERS)
    for ours, theirs in A1111_SAMPLERS.items():
        assert a1111_sampler(theirs) == (ours, None)
        assert a1111_sampler(f"{theirs} Karras") == (ours, "Karras")
    assert a1111_sampler("k_dpmpp_2m_ka") == ("dpmpp_2m", "Karras")
    assert a1111_sampler("k_euler_a") == ("euler_a", None)
    assert a1111_sampler("DPM++ 2M SDE Exponential") == ("dpmpp_2m_sde", "Exponential")
    assert a1111_sampler("LMS Karras") == (None, "Karras")


@pytest.mark.parametrize("fields", [
    dict(),
    dict(prompt="a cat, sitting: on a mat\nsecond line", negative_prompt="blurry, bad: ugly\nworse"),
    dict(sampler="dpmpp_2m", karras_sigmas=True, guidance_scale=7.5, guidance_rescale=0.7),
    dict(sampler="ddim", scheduler_config={"timestep_spacing": "leading"}, task="img2img", strength=0.35),
    dict(sampler="tcd", eta=0.3, cache_interval=3, timesteps=[999, 500], num_inference_steps=2,
         scheduler_config={"timestep_spacing": "trailing"}),
])
def test_round_trip_recipe_infotext_recipe(fields):
    original = recipe(**fields)
    parsed, notes = parse_quietly(infotext(original))
    assert notes == []
    for key in ("prompt", "negative_prompt", "num_inference_steps", "sampler", "karras_sigmas", "guidance_scale",
                "seed", "height", "width", "model", "model_hash", "latentloom_version", "task", "strength", "eta",
                "cache_interval", "timesteps"):
        assert parsed.get(key) == original.get(key), key
    assert parsed["scheduler_config"] == original["scheduler_config"]
    assert parsed.get("guidance_rescale", 0.0) == original["guidance_rescale"]


# --- reading A1111's ------------------------------------------------------------------------------------------

A1111_HIRES = (
    "masterpiece, best quality, 1girl, (smile:1.2), <lora:a:0.8>\n"
    "Negative prompt: lowres, bad anatomy\n"
    "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 3456789012, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, "
    'Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, Lora hashes: "a: 123, b: 456", '
    'ADetailer model: face_yolov8n.pt, ADetailer prompt: "a face, smiling", Version: v1.6.0')


def test_reads_an_old_a1111_infotext_with_hires_and_extensions():
    parsed, notes = parse_quietly(A1111_HIRES)
    assert parsed["prompt"] == "masterpiece, best quality, 1girl, (smile:1.2), <lora:a:0.8>"
    assert parsed["negative_prompt"] == "lowres, bad anatomy"
    assert (parsed["sampler"], parsed["karras_sigmas"]) == ("dpmpp_2m", True)
    assert parsed["a1111_sampler"] == "DPM++ 2M Karras"
    assert (parsed["num_inference_steps"], parsed["guidance_scale"], parsed["seed"]) == (28, 7.5, 3456789012)
    assert (parsed["width"], parsed["height"]) == (512, 768)
    assert (parsed["model"], parsed["model_hash"], parsed["a1111_version"]) == ("v1-5-pruned-emaonly", "6ce0161689",
                                                                                "v1.6.0")
    # with Hires keys the denoising strength is the hires pass's: still txt2img, the strength kept as extra
    assert parsed["task"] == "txt2img" and "strength" not in parsed
    assert parsed["a1111_extra"] == {
        "Denoising strength": "0.45", "Clip skip": "2", "Hires upscale": "2", "Hires steps": "10",
        "Hires upscaler": "Latent", "Lora hashes": "a: 123, b: 456", "ADetailer model": "face_yolov8n.pt",
        "ADetailer prompt": "a face, smiling"}
    assert parsed["a1111_infotext"] == A1111_HIRES
    (note,) = notes
    assert "a1111_extra" in note and "Hires upscale" in note and "Lora hashes" in note and "ADetailer prompt" in note


def test_reads_a_new_a1111_img2img_infotext_with_schedule_type():
    text = ("a watercolor of a lighthouse\n"
            "Steps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6, Seed: 7, Size: 768x512, "
            "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Denoising strength: 0.6, "
            'Hashes: {"model": "31e35c80fc"}, Version: v1.10.1')
    parsed, notes = parse_quietly(text)
    assert parsed["negative_prompt"] is None
    assert (parsed["task"], parsed["strength"], parsed["sampler"], parsed["karras_sigmas"]) == ("img2img", 0.6,
                                                                                                "euler_a", False)
    assert "scheduler_config" not in parsed  # Automatic: the model's own spacing for the sampler
    assert parsed["a1111_extra"] == {"Hashes": '{"model": "31e35c80fc"}'}
    assert len(notes) == 1 and "Hashes" in notes[0]


@pytest.mark.parametrize("sampler, schedule, karras, spacing", [
    ("DPM++ 2M", "Karras", True, None),
    ("DPM++ 2M", "Automatic", True, None),  # A1111 >= 1.9: DPM++ 2M's own default is Karras
    ("Euler", "Automatic", False, None),
    ("Euler", "Uniform", False, "linspace"),
    ("Euler", "SGM Uniform", False, "trailing"),
    ("DDIM", "DDIM", False, "leading"),
    ("UniPC", "sgm_uniform", False, "trailing"),  # the API's lower-case names
    ("DPM++ 2M", None, False, None),  # before 1.9 a plain name was the plain schedule
])
def test_schedule_types(sampler, schedule, karras, spacing):
    schedule_pair = f"Schedule type: {schedule}, " if schedule else ""
    parsed, notes = parse_quietly(f"x\nSteps: 4, Sampler: {sampler}, {schedule_pair}CFG scale: 7, Seed: 1")
    assert parsed["karras_sigmas"] is karras and notes == []
    assert parsed.get("scheduler_config", {}).get("timestep_spacing") == spacing


def test_schedule_and_sampler_latentloom_lacks_are_reported_not_dropped():
    parsed, notes = parse_quietly("x\nSteps: 4, Sampler: Euler, Schedule type: Exponential, CFG scale: 7, Seed: 1")
    assert parsed["sampler"] == "euler" and parsed["a1111_schedule_type"] == "Exponential"
    assert any("no 'Exponential' schedule" in n for n in notes)
    parsed, notes = parse_quietly("x\nSteps: 4, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 1")
    assert parsed["sampler"] is None and parsed["a1111_sampler"] == "DPM++ SDE Karras"
    assert any("no sampler like A1111's 'DPM++ SDE Karras'" in n and "DPM++ 2M" in n for n in notes)


def test_controlnet_units_are_kept_and_named_as_not_replayed():
    unit = 'Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, Guidance End: 1.0'
    text = f'a house\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, ControlNet 0: "{unit}"'
    recipe, notes = parse_quietly(text)
    assert recipe["a1111_extra"] == {"ControlNet 0": unit} and "controlnets" not in recipe
    assert any("made with ControlNet" in n and f"ControlNet 0 ({unit})" in n
               and "give --controlnet PATH --control-image FILE" in n for n in notes)


def test_controlnets_are_written_as_sd_webui_controlnet_units():
    recipe = {"prompt": "a house", "num_inference_steps": 20, "sampler": "euler_a", "guidance_scale": 7.0, "seed": 1,
              "controlnets": [
                  {"model": "/models/control_v11p_sd15_canny.safetensors", "model_hash": "d14c016b9f", "scale": 0.8,
                   "start": 0.0, "end": 0.5, "image": "/x/edges.png", "image_sha256": "0" * 64},
                  {"model": "bundled:controlnet", "model_hash": "a32e71c72b", "scale": 1.0, "start": 0.25,
                   "end": 1.0}]}
    text = infotext(recipe)
    assert ('ControlNet 0: "Module: none, Model: control_v11p_sd15_canny [d14c016b], Weight: 0.8, '
            'Guidance Start: 0, Guidance End: 0.5"') in text
    assert 'ControlNet 1: "Module: none, Model: bundled:controlnet [a32e71c7], Weight: 1, Guidance Start: 0.25' in text
    parsed, notes = parse_quietly(text)  # read back: kept, and named as not replayed
    assert set(parsed["a1111_extra"]) == {"ControlNet 0", "ControlNet 1"}
    assert parsed["seed"] == 1 and any("made with ControlNet" in n for n in notes)


def test_odd_infotexts_give_clear_errors_or_warnings():
    for text, match in [("", "empty"), ("just a prompt", "no settings line"),
                        ("a\nNegative prompt: b", "no settings line"),
                        ("a\nSampler: Euler, CFG scale: 7, Seed: 1", "no Steps"),
                        ("a\nSteps: many, Sampler: Euler, CFG scale: 7", "whole number >= 1, got 'many'")]:
        with pytest.raises(ValueError, match=match):
            parse_infotext(text)
    parsed, notes = parse_quietly('a\nSteps: 5, Sampler: Euler, CFG scale: high, Seed: 1, Size: big, oops, '
                                  'Weird: "unclosed, Tiling')
    assert parsed["num_inference_steps"] == 5 and "guidance_scale" not in parsed
    assert parsed["a1111_extra"]["CFG scale"] == "high" and parsed["a1111_extra"]["Size"] == "big"
    assert any("CFG scale 'high' is not a float" in n for n in notes)
    assert any("no `Key: value` pair" in n and "oops" in n for n in notes)
    # only the settings line: an empty prompt (A1111 strips the text)
    assert parse_quietly("Steps: 5, Sampler: Euler, CFG scale: 7")[0]["prompt"] == ""


def test_read_metadata_reads_an_a1111_png(tmp_path):
    path = a1111_png(tmp_path / "a1111.png", A1111_HIRES)
    with pytest.warns(UserWarning, match="Hires upscale"):
        parsed = read_metadata(path)
    assert parsed["sampler"] == "dpmpp_2m" and parsed["seed"] == 3456789012
    broken = a1111_png(tmp_path / "broken.png", "a prompt and nothing else")
    with pytest.raises(ValueError, match="is no A1111 infotext: .*no settings line"):
        read_metadata(broken)


# --- generate --from on infotext-only PNGs, with the bundled model --------------------------------------------

def test_generate_from_an_a1111_png(tmp_path, capsys):
    text = ("a large red circle on the left, of a blue background\n"
            "Negative prompt: green\n"
            "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4.5, Seed: 42, Size: 64x64, "
            "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: \"a: 123\", Version: v1.10.1")
    source = a1111_png(tmp_path / "a1111.png", text)
    out = tmp_path / "again.png"
    with pytest.warns(UserWarning, match="Lora hashes"):
        assert cli_main(["generate", "--from", str(source), "--no-progress", "-o", str(out)]) == 2
    assert "made by AUTOMATIC1111 with model 'v1-5-pruned-emaonly'" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="Lora hashes"):
        rc = cli_main(["generate", "--from", str(source), "--model", "bundled:default", "--steps", "3",
                       "--no-progress", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    made = read_metadata(out)
    assert (made["prompt"], made["negative_prompt"], made["seed"]) == (
        "a large red circle on the left, of a blue background", "green", 42)
    assert (made["sampler"], made["karras_sigmas"], made["guidance_scale"], made["num_inference_steps"]) == (
        "dpmpp_2m", True, 4.5, 3)
    assert (made["height"], made["width"], made["model"]) == (64, 64, "bundled:default")

    lacking = a1111_png(tmp_path / "lms.png", text.replace("DPM++ 2M", "LMS"))
    with pytest.warns(UserWarning):
        assert cli_main(["generate", "--from", str(lacking), "--model", "bundled:default", "--no-progress",
                         "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "sampler 'LMS', which latentloom does not have; pass --sampler" in err and "dpmpp_2m" in err


def test_latentloom_png_without_its_json_is_made_again_from_the_infotext(tmp_path):
    first = tmp_path / "first.png"
    assert cli_main(["generate", "a blue square, top: left", "--negative-prompt", "red, round", "--seed", "5",
                     "--steps", "3", "--sampler", "dpmpp_2m", "--karras", "--no-progress", "-o", str(first)]) == 0
    with Image.open(first) as image:
        text = image.text["parameters"]
        pixels = np.asarray(image)
    stripped = a1111_png(tmp_path / "stripped.png", text)  # as a tool that keeps only `parameters` leaves it
    again = tmp_path / "again.png"
    assert cli_main(["generate", "--from", str(stripped), "--no-progress", "-o", str(again)]) == 0
    with Image.open(again) as image:
        assert np.array_equal(np.asarray(image), pixels)


# --- other readers --------------------------------------------------------------------------------------------

def test_sd_parsers_reads_a_latentloom_png(tmp_path):
    import sd_parsers
    for prompt in ("a lighthouse at dusk", "a cat, sitting: on a mat, (red:1.2)"):
        path = save_png(Image.new("RGB", (8, 8), "blue"), tmp_path / "x.png",
                        recipe(prompt=prompt, negative_prompt="blurry, bad: ugly", sampler="dpmpp_2m",
                               karras_sigmas=True, guidance_scale=7.5, seed=4242, model="bundled:default"))
        info = sd_parsers.ParserManager().parse(path)
        assert info is not None and info.generator == sd_parsers.data.Generators.AUTOMATIC1111
        (sampler,) = info.samplers
        assert info.full_prompt == prompt and info.full_negative_prompt == "blurry, bad: ugly"
        assert sampler.name == "DPM++ 2M"
        assert sampler.parameters["seed"] == "4242" and sampler.parameters["steps"] == "20"
        assert sampler.parameters["cfg_scale"] == "7.5" and sampler.parameters["scheduler"] == "Karras"


def test_saved_png_carries_the_infotext_and_the_json(tmp_path):
    original = recipe(prompt="a, b: c")
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "y.png", original)
    with Image.open(path) as image:
        assert image.text["parameters"] == infotext(original)
    assert latentloom.read_metadata(path) == original  # the JSON chunk stays the source of truth


# --- odd text never crashes -----------------------------------------------------------------------------------

_FUZZ = dict(max_examples=300, deadline=None, derandomize=True, database=None)
_ALPHABET = 'ab :,\n"{}[]\\-/0123456789xStepsNgativ'


def test_any_text_parses_or_gives_a_value_error():
    import hypothesis
    st = hypothesis.strategies

    @hypothesis.settings(**_FUZZ)
    @hypothesis.given(st.text(alphabet=_ALPHABET, max_size=80) | st.text(max_size=40).map(
        lambda s: f"{s}\nSteps: 3, Sampler: {s}, CFG scale: {s}, Seed: {s}, Size: {s}"))
    def check(text):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                assert isinstance(parse_infotext(text), dict)
            except ValueError:
                pass

    check()


def test_any_prompt_round_trips():
    import hypothesis
    st = hypothesis.strategies
    # A1111 strips each prompt line, and a line that starts `Negative prompt:` starts the negative prompt
    line = st.text(alphabet='ab :,"()\\[]{}=é1', max_size=20).map(str.strip).filter(
        lambda s: not s.startswith("Negative prompt:"))

    @hypothesis.settings(**_FUZZ)
    @hypothesis.given(st.lists(line, min_size=1, max_size=3).map("\n".join), st.lists(line, max_size=2).map("\n".join))
    def check(prompt, negative):
        hypothesis.assume(prompt.strip() == prompt and negative.strip() == negative)
        parsed, notes = parse_quietly(infotext(recipe(prompt=prompt, negative_prompt=negative or None)))
        assert (parsed["prompt"], parsed["negative_prompt"], notes) == (prompt, negative or None, [])

    check()
