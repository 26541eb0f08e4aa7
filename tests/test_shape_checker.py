"""The procedural checker reads the domain's own images back at >= 98% per attribute."""
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from latentloom.evaluation import shape_checker as sc
from latentloom.synthetic import shapes as ss


def accuracy(items):
    right, total = Counter(), Counter()
    for image, _, scene in items:
        for k, ok in sc.score(image, scene).items():
            right[k] += ok
            total[k] += 1
    return {k: right[k] / total[k] for k in total}, total


def test_checker_scores_at_least_98_percent_on_single_shape_scenes():
    items = [it for it in ss.make_dataset(700, seed=11) if len(it[2].shapes) == 1]
    assert len(items) >= 500
    acc, total = accuracy(items)
    assert set(acc) == {"color", "shape", "size", "position", "background"}
    assert all(total[k] >= 500 for k in total)
    assert min(acc.values()) >= 0.98, acc


def test_checker_scores_first_named_shape_of_two_shape_scenes_and_heldout():
    items = [it for it in ss.make_dataset(400, seed=12) if len(it[2].shapes) == 2]
    items += ss.make_dataset(150, seed=12, split="heldout")
    acc, _ = accuracy(items)
    assert min(acc.values()) >= 0.98, acc


@pytest.mark.parametrize("shape", ss.SHAPES)
@pytest.mark.parametrize("size", ss.SIZES)
def test_each_shape_and_size_in_canonical_form(shape, size):
    for position in ss.POSITIONS:
        scene = ss.SceneSpec((ss.ShapeSpec(shape, "orange", size, position),), background="yellow")
        found = sc.detect(ss.render(scene))
        assert (found.shape, found.size, found.position, found.color, found.background) == (
            shape, size, position, "orange", "yellow")
        assert found.confidence > 0.9 and found.fit > 0.9


def test_accepts_arrays_and_other_sizes():
    scene = ss.SceneSpec((ss.ShapeSpec("triangle", "cyan", "large", "top"),), background="purple")
    image = ss.render(scene)
    expected = sc.detect(image).as_dict()
    assert sc.detect(np.asarray(image)).as_dict() == expected
    assert sc.detect(np.asarray(image, dtype=np.float32) / 255.0).as_dict() == expected
    assert sc.detect(ss.render(scene, size=128)).as_dict() == expected


def test_expected_background_is_used_for_segmentation():
    scene = ss.SceneSpec((ss.ShapeSpec("square", "red", "large", "center"),), background="green")
    image = ss.render(scene)
    assert sc.detect(image, background="green").shape == "square"
    # The border does not have the claimed background: no shape is reported, confidence 0.
    wrong = sc.detect(image, background="black")
    assert wrong.shape == "none" and wrong.confidence == 0.0


def test_noise_gives_none_and_low_confidence():
    rng = np.random.default_rng(0)
    for _ in range(5):
        noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        found = sc.detect(noise)
        assert found.shape == found.color == found.size == found.position == "none"
        assert found.confidence < 0.5
        assert not any(sc.score(noise, ss.parse_caption("a red circle on the left")).values())


def test_blank_image_has_no_shape_but_a_background():
    blank = Image.new("RGB", (64, 64), ss.COLORS["pink"])
    found = sc.detect(blank)
    assert found.shape == "none" and found.background == "pink"


def test_blur_and_noise_keep_the_answer():
    # Generated images are softer and noisier than the renderer's: the checker must hold up.
    rng = np.random.default_rng(1)
    items = [it for it in ss.make_dataset(160, seed=13) if len(it[2].shapes) == 1]
    wrong = Counter()
    for image, _, scene in items:
        soft = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
        noisy = soft + rng.normal(0, 10, size=(64, 64, 3))
        for k, ok in sc.score(noisy, scene).items():
            wrong[k] += not ok
    assert len(items) >= 100
    assert all(v <= 0.02 * len(items) for v in wrong.values()), wrong


def test_score_only_checks_what_the_scene_states():
    image = ss.render(ss.SceneSpec((ss.ShapeSpec("star", "white", "small", "right"),), background="blue"))
    assert sc.score(image, ss.parse_caption("white star")) == {"color": True, "shape": True}
    assert sc.score(image, ss.parse_caption("a large white star on the left, blue background")) == {
        "color": True, "shape": True, "size": False, "position": False, "background": True}


def test_errors():
    image = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="unknown background 'teal'"):
        sc.detect(image, background="teal")
    with pytest.raises(ValueError, match=r"must be \(H, W, 3\)"):
        sc.detect(np.zeros((64, 64)))
    with pytest.raises(ValueError, match="must be square"):
        sc.detect(Image.new("RGB", (64, 32)))
    with pytest.raises(TypeError, match="PIL.Image or a numpy array"):
        sc.detect([[0, 0, 0]])
    with pytest.raises(TypeError, match="SceneSpec"):
        sc.score(image, "a red circle")
