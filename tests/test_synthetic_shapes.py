"""The synthetic shapes domain: deterministic scenes, captions that parse back, a held-out split."""
import hashlib
import io
import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from latentloom.synthetic import shapes as ss


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_vocabulary_is_large_enough_and_colors_are_well_separated():
    assert set(ss.SHAPES) >= {"circle", "square", "triangle", "star"}
    assert len(ss.COLORS) >= 8
    rgb = np.array(list(ss.COLORS.values()), dtype=float)
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=2)
    assert d[~np.eye(len(rgb), dtype=bool)].min() > 75
    assert set(ss.POSITIONS) == {"left", "right", "top", "bottom", "center"}
    assert set(ss.SIZES) == {"small", "large"}


def test_same_seed_gives_identical_bytes_and_other_seed_differs():
    a = [png_bytes(im) + t.encode() for im, t, _ in ss.make_dataset(12, seed=3)]
    b = [png_bytes(im) + t.encode() for im, t, _ in ss.make_dataset(12, seed=3)]
    c = [png_bytes(im) + t.encode() for im, t, _ in ss.make_dataset(12, seed=4)]
    assert a == b
    assert a != c


def test_longer_dataset_extends_shorter_one():
    short = ss.make_dataset(5, seed=9)
    long = ss.make_dataset(9, seed=9)
    assert [t for _, t, _ in short] == [t for _, t, _ in long[:5]]


def test_render_is_64x64_rgb_with_antialiased_edges():
    scene = ss.SceneSpec((ss.ShapeSpec("circle", "red", "large", "center"),), background="blue")
    image = ss.render(scene)
    assert image.size == (64, 64) and image.mode == "RGB"
    arr = np.asarray(image)
    assert tuple(arr[0, 0]) == ss.COLORS["blue"]
    assert tuple(arr[32, 32]) == ss.COLORS["red"]
    # Supersampling leaves intermediate colors on the edge (no hard aliasing).
    colors = {tuple(p) for p in arr.reshape(-1, 3)}
    assert len(colors) > 5


def test_render_puts_shape_where_the_position_says():
    for position, (sx, sy) in {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}.items():
        scene = ss.SceneSpec((ss.ShapeSpec("square", "white", "small", position),), background="black")
        ys, xs = np.nonzero(np.asarray(ss.render(scene))[..., 0] > 128)
        cx, cy = xs.mean() + 0.5 - 32, ys.mean() + 0.5 - 32
        assert np.sign(round(cx)) == sx and np.sign(round(cy)) == sy, position


def test_every_phrasing_parses_back_to_the_scene():
    rng = random.Random(0)
    for _ in range(60):
        scene = ss.sample_scene(rng)
        for k in range(ss.NUM_PHRASINGS):
            text = ss.caption(scene, phrasing=k)
            parsed = ss.parse_caption(text)
            assert len(parsed.shapes) == len(scene.shapes)
            for p, s in zip(parsed.shapes, scene.shapes):
                assert (p.shape, p.color, p.size, p.position) == (s.shape, s.color, s.size, s.position), text
            assert parsed.background == (None if k == 0 else scene.background), text


def test_captions_read_naturally():
    scene = ss.SceneSpec((ss.ShapeSpec("circle", "red", "small", "left"),), background="orange")
    assert ss.caption(scene, phrasing=0) == "a small red circle on the left"
    assert ss.caption(scene, phrasing=1) == "a small red circle on the left on an orange background"
    assert ss.caption(scene, phrasing=2) == "red circle, small, left side, on orange"
    star = ss.SceneSpec((ss.ShapeSpec("star", "yellow", "large", "center"),), background="black")
    assert ss.caption(star, phrasing=3) == "a large yellow star in the center of a black background"


def test_heldout_combos_never_in_train_and_always_first_in_heldout():
    assert len(ss.HELDOUT_COMBOS) == 20
    # every color, shape and position is still seen in training
    for i, values in enumerate((tuple(ss.COLORS), ss.SHAPES, ss.POSITIONS)):
        for v in values:
            assert sum(c[i] == v for c in ss.HELDOUT_COMBOS) < len(ss.HELDOUT_COMBOS)
    train = ss.make_dataset(300, seed=1, split="train")
    for _, _, scene in train:
        for s in scene.shapes:
            assert s.combo not in ss.HELDOUT_COMBOS
    heldout = ss.make_dataset(100, seed=1, split="heldout")
    assert all(scene.shapes[0].combo in ss.HELDOUT_COMBOS for _, _, scene in heldout)


def test_two_shape_scenes_follow_the_layout_rule():
    scenes = [s for _, _, s in ss.make_dataset(200, seed=2)]
    two = [s for s in scenes if len(s.shapes) == 2]
    assert 20 < len(two) < 100
    for s in two:
        a, b = s.shapes
        assert (a.size, b.size) == ("large", "small")
        assert ss.OPPOSITE[a.position] == b.position
        assert a.color != b.color and s.background not in (a.color, b.color)
    counts = Counter(s.shapes[0].shape for s in scenes)
    assert set(counts) == set(ss.SHAPES)


def test_write_dataset_writes_pngs_and_metadata(tmp_path):
    out = ss.write_dataset(tmp_path / "shapes", 6, seed=5, split="heldout")
    lines = (out / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 6
    expected = ss.make_dataset(6, seed=5, split="heldout")
    for line, (image, text, scene) in zip(lines, expected):
        row = json.loads(line)
        assert row["text"] == text
        assert ss.scene_from_dict(row["scene"]) == scene
        assert (out / row["file_name"]).read_bytes() == png_bytes(image)
    assert not list(out.glob("*.tmp"))
    again = ss.write_dataset(tmp_path / "again", 6, seed=5, split="heldout")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert [digest(p) for p in sorted(out.iterdir())] == [digest(p) for p in sorted(again.iterdir())]


def test_write_dataset_refuses_to_overwrite(tmp_path):
    ss.write_dataset(tmp_path, 2, seed=0)
    with pytest.raises(FileExistsError, match="metadata.jsonl"):
        ss.write_dataset(tmp_path, 2, seed=0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ss.ShapeSpec("hexagon", "red"), "unknown shape 'hexagon'.*circle"),
        (lambda: ss.ShapeSpec("circle", "mauve"), "unknown color 'mauve'"),
        (lambda: ss.ShapeSpec("circle", "red", size="huge"), "unknown size 'huge'"),
        (lambda: ss.ShapeSpec("circle", "red", position="up"), "unknown position 'up'"),
        (lambda: ss.ShapeSpec("circle", "red", extent=200.0), "extent must be in"),
        (lambda: ss.SceneSpec(()), "1 or 2 shapes"),
        (lambda: ss.SceneSpec((ss.ShapeSpec("circle", "red"),), background="red"), "invisible"),
        (lambda: ss.SceneSpec((ss.ShapeSpec("circle", "red"),), background="teal"), "unknown background"),
        (lambda: ss.make_dataset(0, seed=0), "n must be a positive int"),
        (lambda: ss.make_dataset(2, seed=0, split="test"), "unknown split 'test'"),
        (lambda: ss.write_dataset("/tmp/never", 0, seed=0), "n must be a positive int"),
        (lambda: ss.caption(ss.sample_scene(random.Random(0)), phrasing=99), "phrasing must be"),
        (lambda: ss.render(ss.sample_scene(random.Random(0)), size=8), "size must be an int >= 16"),
        (lambda: ss.parse_caption("a blue background"), "no shape word"),
        (lambda: ss.parse_caption("a circle on the left"), "no color word"),
        (lambda: ss.parse_caption("a red circle and a blue star and a green square"), "at most 2"),
    ],
)
def test_errors_name_the_bad_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_render_without_background_picks_a_visible_one():
    black = ss.SceneSpec((ss.ShapeSpec("square", "black", "large", "center"),))
    assert tuple(np.asarray(ss.render(black))[0, 0]) == ss.COLORS["white"]
    red = ss.parse_caption("a large red square in the center")
    assert tuple(np.asarray(ss.render(red))[0, 0]) == ss.COLORS["black"]


def test_render_scales_to_other_sizes():
    scene = ss.SceneSpec((ss.ShapeSpec("circle", "red", "large", "left"),), background="blue")
    big = ss.render(scene, size=128)
    assert big.size == (128, 128)
    small_from_big = np.asarray(big.resize((64, 64), Image.Resampling.BOX), dtype=float)
    assert np.abs(small_from_big - np.asarray(ss.render(scene), dtype=float)).mean() < 2.0
