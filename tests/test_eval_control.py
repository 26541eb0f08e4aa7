"""`latentloom eval --control`: the scenes and their conflicting captions, the masks and IoU, the table,
and a tiny run of an untrained ControlNet on the bundled model (numbers not asserted, the table's shape is)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from latentloom.cli import main
from latentloom.evaluation.control_following import (
    IOU_ROWS, control_cases, evaluate_control, format_control_table, map_mask, mask_iou, shape_mask,
)
from latentloom.synthetic.shapes import render

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


def test_cases_are_one_shape_scenes_whose_conflicting_caption_names_another_position():
    cases = control_cases(12, seed=1)
    assert len(cases) == 12
    for case in cases:
        assert len(case.scene.shapes) == 1 and case.control.size == (64, 64)
        assert case.prompt_position != case.scene.shapes[0].position
        assert case.prompt_position in case.conflicting
    assert {c.scene.shapes[0].size for c in cases} == {"large", "small"}
    with pytest.raises(ValueError, match="split"):
        control_cases(1, seed=0, split="test")


def test_the_rendered_scene_matches_its_own_map():
    for case in control_cases(6, seed=1):
        assert mask_iou(shape_mask(render(case.scene)), map_mask(case.control)) > 0.9
    assert mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def test_scoring_the_rendered_scenes_is_right_and_the_table_has_every_row():
    cases = control_cases(8, seed=1)
    truth = evaluate_control(lambda texts, maps: [render(c.scene) for c in cases[:len(texts)]], cases[:4],
                             conflicting=True)
    assert truth["rows"]["position"] == 1.0 and truth["prompt_position"] == 0.0
    lines = format_control_table({"ideal": truth, "ideal again": truth}).splitlines()
    rows = {line[:20].strip(): line[20:].split() for line in lines[1:]}
    assert list(rows) == [*IOU_ROWS, "color", "shape", "size", "position", "background", "all",
                          "at prompt position"]
    assert all(len(v) == 2 for v in rows.values())
    with pytest.raises(ValueError, match="1 images for 2 captions"):
        evaluate_control(lambda texts, maps: [render(cases[0].scene)], cases[:2])


def test_eval_control_runs_on_an_untrained_controlnet(tmp_path, capsys):
    import latentloom
    from latentloom.training.task_controlnet import control_widths
    from latentloom.unet import ControlNet

    pipe = latentloom.load_pipeline(device="cpu", dtype=torch.float32)
    net = ControlNet.from_unet(pipe.unet, conditioning_embedding_out_channels=control_widths(4))
    net.save_pretrained(tmp_path / "cn")
    report = tmp_path / "control.json"
    assert main(["eval", "--control", str(tmp_path / "cn"), "--captions", "2", "--images-per-caption", "1",
                 "--steps", "2", "--guidance", "1", "--json", str(report)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "controlnet" in lines[0]
    assert lines[1].split() == ["measure", "cfg", "1", "no", "map", "cfg", "1", "cfg", "1", "conflict"]
    assert len(lines) == 2 + len(IOU_ROWS) + 5 + 2
    saved = json.loads(report.read_text())["settings"]
    assert set(saved) == {"cfg 1 no map", "cfg 1", "cfg 1 conflict"} and saved["cfg 1"]["num_images"] == 2


def test_eval_control_refuses_the_settings_it_does_not_measure(capsys):
    assert main(["eval", "--control", "x", "--clip-guidance", "0"]) == 2
    assert "--control measures a ControlNet alone" in capsys.readouterr().err
