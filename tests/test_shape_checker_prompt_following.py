"""evaluate(): a generator that draws the asked-for scene scores ~100%, a wrong-color one scores low."""
import pytest
from PIL import Image

from latentloom.evaluation.prompt_following import domain_prompts, evaluate
from latentloom.synthetic import shapes as ss

WRONG = {"red": "green", "green": "blue", "blue": "red", "yellow": "purple", "purple": "yellow",
         "orange": "cyan", "cyan": "orange", "white": "pink", "pink": "white", "black": "red"}


def true_generate(captions, k):
    return [ss.render(ss.parse_caption(c)) for c in captions for _ in range(k)]


def wrong_color_generate(captions, k):
    images = []
    for c in captions:
        scene = ss.parse_caption(c)
        shapes = tuple(ss.ShapeSpec(s.shape, WRONG[s.color], s.size, s.position) for s in scene.shapes)
        background = scene.background
        if background in {s.color for s in shapes}:
            background = None
        images += [ss.render(ss.SceneSpec(shapes, background))] * k
    return images


def test_true_scenes_score_100_percent():
    prompts = domain_prompts(40, seed=0)
    calls = []
    result = evaluate(lambda c, k: calls.append(len(c)) or true_generate(c, k), prompts,
                      images_per_caption=2, batch_size=16)
    assert calls == [16, 16, 8]
    assert result["num_images"] == 80 and result["num_captions"] == 40
    assert set(result["accuracy"]) == {"color", "shape", "size", "position", "background"}
    assert all(v == 1.0 for v in result["accuracy"].values()), result["table"]
    assert result["all_correct"] == 1.0
    assert result["counts"]["color"] == (80, 80)
    assert result["counts"]["background"][1] < 80  # phrasing 0 does not name it: not scored
    assert "color" in result["table"] and "100.0%" in result["table"]
    assert len(result["per_caption"]) == 40 and len(result["per_caption"][0]["scores"]) == 2


def test_wrong_colors_score_low_on_color_only():
    result = evaluate(wrong_color_generate, domain_prompts(40, seed=0), images_per_caption=1)
    assert result["accuracy"]["color"] == 0.0
    assert result["accuracy"]["shape"] == 1.0 and result["accuracy"]["position"] == 1.0
    assert result["all_correct"] == 0.0


def test_blank_images_score_nothing():
    blank = lambda c, k: [Image.new("RGB", (64, 64), (40, 80, 220))] * (len(c) * k)  # noqa: E731
    result = evaluate(blank, [("a small red circle on the left", None)])
    assert result["accuracy"]["color"] == 0.0 and result["accuracy"]["shape"] == 0.0


def test_domain_prompts_are_heldout_and_parsed():
    prompts = domain_prompts(30, seed=1)
    for caption, scene in prompts:
        assert scene == ss.parse_caption(caption)
        assert scene.shapes[0].combo in ss.HELDOUT_COMBOS


def test_errors():
    prompts = domain_prompts(2, seed=0)
    with pytest.raises(ValueError, match="generate returned 1 images for 2 captions x 1"):
        evaluate(lambda c, k: true_generate(c, k)[:1], prompts)
    with pytest.raises(ValueError, match="images_per_caption must be a positive int, got 0"):
        evaluate(true_generate, prompts, images_per_caption=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        evaluate(true_generate, prompts, batch_size=0)
    with pytest.raises(ValueError, match="is empty"):
        evaluate(true_generate, [])
    with pytest.raises(TypeError, match="expected \\(caption: str"):
        evaluate(true_generate, [("a red circle", "not a scene")])
    with pytest.raises(ValueError, match="unknown split 'val'"):
        domain_prompts(2, seed=0, split="val")
    with pytest.raises(ValueError, match="n must be a positive int"):
        domain_prompts(0, seed=0)
