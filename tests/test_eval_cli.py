"""`latentloom eval`: settings grid, comparison table, argument errors, and a tiny run on the bundled model."""
from __future__ import annotations

import json

import pytest

from latentloom.cli import main
from latentloom.evaluation.cli_eval import format_comparison, settings_grid


def test_settings_grid_orders_guidance_within_clip():
    assert settings_grid(guidance=[1.0, 4.0], clip_guidance=[0.0, 300.0]) == [
        (1.0, 0.0), (4.0, 0.0), (1.0, 300.0), (4.0, 300.0)]


def test_format_comparison_has_one_column_per_setting_and_an_all_row():
    results = {
        "cfg 1": {"accuracy": {"color": 0.5, "shape": 0.25}, "all_correct": 0.125},
        "cfg 4": {"accuracy": {"color": 1.0, "position": 0.75}, "all_correct": 0.5},
    }
    lines = format_comparison(results).splitlines()
    assert lines[0].split() == ["attribute", "cfg", "1", "cfg", "4"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["color"] == ["50.0%", "100.0%"]
    assert rows["shape"] == ["25.0%", "-"]  # not scored in that setting
    assert rows["position"] == ["-", "75.0%"]
    assert rows["all"] == ["12.5%", "50.0%"]


@pytest.mark.parametrize("argv,message", [
    (["--captions", "0"], "--captions must be >= 1"),
    (["--images-per-caption", "0"], "--images-per-caption must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--split", "test"], "--split must be 'heldout' or 'train'"),
    (["--guidance", "-1"], "--guidance scales must be >= 0"),
    (["--clip-guidance", "-2"], "--clip-guidance scales must be >= 0"),
])
def test_bad_arguments_fail_with_a_message(argv, message, capsys):
    assert main(["eval", *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_model_fails_with_a_message(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nope")]) == 2
    assert "no model at" in capsys.readouterr().err


def test_clip_guidance_without_image_text_model_fails(tmp_path, capsys):
    import shutil

    from latentloom.weights import bundled_model_dir

    folder = tmp_path / "no-clip"
    shutil.copytree(bundled_model_dir(), folder, ignore=shutil.ignore_patterns("clip"))
    assert main(["eval", "--model", str(folder), "--clip-guidance", "100", "--captions", "1"]) == 2
    assert "has no image-text model" in capsys.readouterr().err


def test_tiny_eval_on_the_bundled_model_prints_the_table(tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", "--captions", "2", "--images-per-caption", "1", "--steps", "2",
                 "--guidance", "1", "3", "--clip-guidance", "0", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "2 heldout captions x 1 images" in printed
    header = [line for line in printed.splitlines() if line.startswith("attribute")][0]
    assert "cfg 1" in header and "cfg 3" in header
    for attr in ("color", "shape", "size", "position", "all"):
        assert any(line.startswith(attr) for line in printed.splitlines()), attr
    saved = json.loads(out.read_text())
    assert set(saved["settings"]) == {"cfg 1", "cfg 3"}
    assert saved["settings"]["cfg 1"]["num_images"] == 2
