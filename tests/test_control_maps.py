"""Control maps for ControlNet: canny, user-made maps, `preprocess canny`, make-shapes --control-maps,
and the training dataset's maps under the image's own crops and flips."""
import hashlib
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from latentloom.cli import main
from latentloom.pipelines.control_maps import canny, check_thresholds, load_control_image
from latentloom.pipelines.metadata import read_metadata
from latentloom.synthetic import shapes as ss
from latentloom.training.data import CaptionedImageDataset, LatentCache


def square(mode="L", size=64, box=(16, 16, 48, 48), fg=255, bg=0):
    """A filled square covering columns/rows box[0]..box[2]-1 on a flat background."""
    image = Image.new(mode, (size, size), bg)
    image.paste(fg, box)
    return image


def border_distance(size=64, box=(16, 16, 48, 48)):
    """Chebyshev distance of every pixel to the square's border (0 on its outermost pixels)."""
    ys, xs = np.mgrid[:size, :size]
    inside = np.minimum.reduce([xs - box[0], box[2] - 1 - xs, ys - box[1], box[3] - 1 - ys])  # >= 0 inside
    return np.abs(inside)


# ------------------------------------------------------------------ canny


@pytest.mark.parametrize("image", [square("L"), square("RGB", fg=(220, 40, 40), bg=(40, 80, 220))], ids=["gray", "rgb"])
def test_canny_finds_the_border_of_a_square_and_nothing_inside(image):
    edges = canny(image)
    assert edges.mode == "RGB" and edges.size == image.size
    array = np.asarray(edges)
    assert np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])
    assert set(np.unique(array)) == {0, 255}  # white edges on black
    on = array[..., 0] == 255
    dist = border_distance()
    # cv2 puts a step's edge on either of the two pixels beside it: on the border, or one outside
    assert dist[on].max() <= 1
    # every side is traced along its whole length (corners aside): left/top at 15-16, right/bottom at 47-48
    middle = slice(18, 46)
    for side in (on[middle, 15:17], on[middle, 47:49], on[15:17, middle].T, on[47:49, middle].T):
        assert side.any(axis=1).all()
    ys, xs = np.mgrid[:64, :64]
    interior = (xs >= 18) & (xs <= 45) & (ys >= 18) & (ys <= 45)
    assert not on[interior].any()


def test_canny_keeps_the_size_of_non_square_images():
    image = Image.new("RGB", (100, 60), (0, 0, 0))
    image.paste((255, 255, 255), (30, 10, 70, 50))
    assert canny(image).size == (100, 60)


def test_canny_high_thresholds_find_no_weak_edges():
    faint = square("L", fg=30, bg=0)  # a step of 30 gives a Sobel L1 magnitude near 120
    assert np.asarray(canny(faint, low=10, high=20)).any()
    assert not np.asarray(canny(faint, low=250, high=255)).any()


@pytest.mark.parametrize(
    ("low", "high", "message"),
    [
        (-1, 200, r"low threshold must be an int in 0\.\.255, got -1"),
        (100, 256, r"high threshold must be an int in 0\.\.255, got 256"),
        (100.0, 200, r"low threshold must be an int in 0\.\.255, got 100\.0"),
        (True, 200, r"low threshold must be an int in 0\.\.255, got True"),
        (100, "200", r"high threshold must be an int in 0\.\.255, got '200'"),
        (201, 200, r"low threshold \(201\) must be <= high threshold \(200\)"),
    ],
)
def test_canny_thresholds_are_checked(low, high, message):
    with pytest.raises(ValueError, match=message):
        canny(square(), low=low, high=high)


def test_equal_thresholds_are_allowed():
    assert check_thresholds(120, 120) == (120, 120)
    assert np.asarray(canny(square(), low=120, high=120)).any()


def test_canny_reports_unusable_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.png"):
        canny(tmp_path / "no-such.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        canny(tmp_path / "junk.png")
    with pytest.raises(ValueError, match=r"mode 'I;16'.*8-bit"):  # would be clipped to 8 bits
        canny(Image.new("I;16", (8, 8)))
    with pytest.raises(TypeError, match="PIL image or a path.*got ndarray"):
        canny(np.zeros((8, 8, 3), np.uint8))


def test_canny_without_opencv_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    with pytest.raises(ImportError, match=r"latentloom\[control\]"):
        canny(square())


# ------------------------------------------------------------------ user-made maps


def test_load_control_image_keeps_size_and_makes_rgb(tmp_path):
    gray = square("L", size=40, box=(5, 5, 20, 20))
    gray.save(tmp_path / "map.png")
    loaded = load_control_image(tmp_path / "map.png")
    assert loaded.mode == "RGB" and loaded.size == (40, 40)  # never resized
    assert np.array_equal(np.asarray(loaded)[..., 1], np.asarray(gray))
    # white strokes on a transparent layer stay white strokes on black
    layer = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (10, 5, 20, 15))
    array = np.asarray(load_control_image(layer))
    assert array.shape == (20, 30, 3) and array[10, 15].tolist() == [255, 255, 255] and not array[0, 0].any()
    with pytest.raises(FileNotFoundError, match="control image"):
        load_control_image(tmp_path / "missing.png")


# ------------------------------------------------------------------ the CLI


def test_preprocess_canny_writes_the_map_with_its_recipe(tmp_path, capsys):
    source = tmp_path / "in.png"
    square("RGB", size=48, box=(8, 8, 40, 40), fg=(245, 140, 30), bg=(20, 20, 20)).save(source)
    out = tmp_path / "edges.png"
    assert main(["preprocess", "canny", str(source), "-o", str(out), "--low", "50", "--high", "150"]) == 0
    assert "wrote" in capsys.readouterr().out
    written = Image.open(out)
    assert written.size == (48, 48)
    assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(canny(source, low=50, high=150)))
    recipe = read_metadata(out)
    assert recipe["task"] == "preprocess" and recipe["preprocessor"] == "canny"
    assert (recipe["low_threshold"], recipe["high_threshold"]) == (50, 150)
    assert recipe["source_image"] == str(source.resolve())
    assert recipe["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()


def test_preprocess_canny_defaults_are_the_annotators(tmp_path):
    source = tmp_path / "in.png"
    square().save(source)
    assert main(["preprocess", "canny", str(source), "-o", str(tmp_path / "e.png")]) == 0
    recipe = read_metadata(tmp_path / "e.png")
    assert (recipe["low_threshold"], recipe["high_threshold"]) == (100, 200)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--low", "300"], "low threshold must be an int in 0..255, got 300"),
        (["--low", "150", "--high", "100"], "low threshold (150) must be <= high threshold (100)"),
        (["-o", "edges.jpg"], "--output must end in .png"),
    ],
)
def test_preprocess_canny_reports_bad_arguments(tmp_path, capsys, extra, message):
    source = tmp_path / "in.png"
    square().save(source)
    args = ["preprocess", "canny", str(source), "-o", str(tmp_path / "e.png"), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "e.png").exists()


def test_preprocess_canny_reports_a_missing_image(tmp_path, capsys):
    assert main(["preprocess", "canny", str(tmp_path / "nope.png"), "-o", str(tmp_path / "e.png")]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_preprocess_does_not_import_torch(tmp_path):
    square().save(tmp_path / "in.png")
    code = (
        "import sys\n"
        "from latentloom.cli import main\n"
        f"assert main(['preprocess', 'canny', {str(tmp_path / 'in.png')!r}, '-o', {str(tmp_path / 'e.png')!r}]) == 0\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


# ------------------------------------------------------------------ make-shapes --control-maps


def rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("size", [64, 128])
def test_make_shapes_control_maps_line_up_with_the_shapes(tmp_path, capsys, size):
    out = tmp_path / "maps"
    assert main(["make-shapes", "--out", str(out), "--n", "12", "--seed", "3", "--size", str(size),
                 "--control-maps"]) == 0
    assert "with control maps" in capsys.readouterr().out
    table = rows(out)
    assert {p.name for p in (out / "conditioning").iterdir()} == {r["file_name"] for r in table}
    for row in table:
        assert row["conditioning_file_name"] == f"conditioning/{row['file_name']}"
        control = Image.open(out / row["conditioning_file_name"])
        assert control.mode == "RGB" and control.size == (size, size)
        scene = ss.scene_from_dict(row["scene"])
        m = np.asarray(control, dtype=np.float64)[..., 0] / 255.0  # the shapes' coverage
        image = np.asarray(Image.open(out / row["file_name"]), dtype=np.float64)
        bg = np.array(ss.COLORS[scene.resolved_background()], dtype=np.float64)
        colors = [np.array(ss.COLORS[s.color], dtype=np.float64) for s in scene.shapes]
        assert np.all(image[m == 0] == bg)  # black in the map: background in the image
        full = image[m == 1]
        assert full.size and np.all(np.any([np.all(full == c, axis=1) for c in colors], axis=0))
        if len(scene.shapes) == 1:  # grey edge pixels are the shape's exact coverage of the pixel
            expected = bg + (colors[0] - bg) * m[..., None]
            # both files are rounded to 8 bits on their own: half a level each, scaled by |colour - bg| / 255
            assert np.abs(image - expected).max() <= 1.5


def test_make_shapes_without_the_flag_writes_what_it_always_wrote(tmp_path):
    plain = ss.write_dataset(tmp_path / "plain", 12, seed=3)
    # metadata.jsonl of (seed 3, n 12) as written before --control-maps existed
    digest = hashlib.sha256((plain / "metadata.jsonl").read_bytes()).hexdigest()
    assert digest == "bd64be2cce03082cb20bc3c6b44985e240605ff7480ae399597c4158031c0f68"
    assert not (plain / "conditioning").exists()
    maps = ss.write_dataset(tmp_path / "maps", 12, seed=3, control_maps=True)
    for a, b in zip(rows(plain), rows(maps)):
        assert {k: v for k, v in b.items() if k != "conditioning_file_name"} == a
        assert (maps / a["file_name"]).read_bytes() == (plain / a["file_name"]).read_bytes()


def test_conflict_captions_name_another_position_and_nothing_else_changes(tmp_path, capsys):
    n = 200
    assert main(["make-shapes", "--out", str(tmp_path / "c"), "--n", str(n), "--seed", "0", "--control-maps",
                 "--conflict-captions", "0.5"]) == 0
    assert "0.5 of the one-shape captions name another position" in capsys.readouterr().out
    plain, conflict = rows(ss.write_dataset(tmp_path / "p", n, seed=0, control_maps=True)), rows(tmp_path / "c")
    one_shape = changed = 0
    for a, b in zip(plain, conflict):
        assert {k: v for k, v in a.items() if k != "text"} == {k: v for k, v in b.items() if k != "text"}
        assert (tmp_path / "c" / b["file_name"]).read_bytes() == (tmp_path / "p" / a["file_name"]).read_bytes()
        scene = ss.scene_from_dict(a["scene"])
        one_shape += len(scene.shapes) == 1
        if a["text"] == b["text"]:
            continue
        changed += 1
        assert len(scene.shapes) == 1  # two-shape scenes keep their caption
        said, drawn = ss.parse_caption(b["text"]).shapes[0], scene.shapes[0]
        assert (said.color, said.shape, said.size) == (drawn.color, drawn.shape, drawn.size)
        assert said.position != drawn.position
        assert (said.color, said.shape, said.position) not in ss.HELDOUT_COMBOS  # eval captions stay unseen
    assert 0.35 * one_shape < changed < 0.65 * one_shape
    # the first 200 rows of the data the bundled ControlNet was trained on (weights/README.md): its
    # command must keep writing them
    digest = hashlib.sha256((tmp_path / "c" / "metadata.jsonl").read_bytes()).hexdigest()
    assert digest == "0d0db28e2e53026eb7d428a4e091129687c907bfbf87f47c330ae304f78ef004"
    # a longer dataset extends a shorter one, captions included
    shorter = rows(ss.write_dataset(tmp_path / "s", 50, seed=0, control_maps=True, conflict_captions=0.5))
    assert [r["text"] for r in shorter] == [r["text"] for r in conflict[:50]]


@pytest.mark.parametrize("fraction, control_maps, message", [
    (1.5, True, r"fraction in \[0, 1\], got 1.5"), (-0.1, True, "got -0.1"), (0.5, False, "needs control_maps"),
])
def test_conflict_captions_errors_name_the_value(tmp_path, fraction, control_maps, message):
    with pytest.raises(ValueError, match=message):
        ss.write_dataset(tmp_path / "x", 4, seed=0, control_maps=control_maps, conflict_captions=fraction)
# ------------------------------------------------------------------ the training dataset


@pytest.fixture
def shapes_with_maps(tmp_path):
    return ss.write_dataset(tmp_path / "data", 8, seed=1, control_maps=True)


def test_dataset_yields_the_map_with_the_images_flip(shapes_with_maps):
    plain = CaptionedImageDataset(shapes_with_maps, resolution=64, conditioning=True)
    flipped = CaptionedImageDataset(shapes_with_maps, resolution=64, conditioning=True, random_flip=True, seed=0)
    seen = set()
    for epoch in range(4):
        flipped.set_epoch(epoch)
        for i in range(len(flipped)):
            ref, item = plain[i], flipped[i]
            assert set(item) == {"pixel_values", "caption", "micro", "conditioning_pixel_values"}
            assert item["caption"] == ref["caption"]
            control = item["conditioning_pixel_values"]
            assert control.shape == (3, 64, 64) and control.min() >= 0 and control.max() <= 1
            image_flipped = torch.equal(item["pixel_values"], ref["pixel_values"].flip(-1))
            map_flipped = torch.equal(control, ref["conditioning_pixel_values"].flip(-1))
            if not image_flipped:
                assert torch.equal(item["pixel_values"], ref["pixel_values"])
            assert map_flipped == image_flipped or torch.equal(control, control.flip(-1))
            seen.add(image_flipped)
    assert seen == {True, False}
    # the map is the file's pixels, in [0, 1]
    row = rows(shapes_with_maps)[0]
    file = np.asarray(Image.open(shapes_with_maps / row["conditioning_file_name"]), dtype=np.float32) / 255.0
    assert torch.equal(plain[0]["conditioning_pixel_values"], torch.from_numpy(file).permute(2, 0, 1))


def test_the_map_gets_the_images_random_crop_and_resize(tmp_path):
    # A map that is a copy of its image must come out equal to the image, whatever the crop and flip.
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate([(80, 64), (64, 96), (50, 70)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    (tmp_path / "conditioning").mkdir()
    lines = []
    for k in range(3):
        (tmp_path / "conditioning" / f"{k}.png").write_bytes((tmp_path / f"{k}.png").read_bytes())
        row = {"file_name": f"{k}.png", "text": str(k), "conditioning_file_name": f"conditioning/{k}.png"}
        lines.append(json.dumps(row))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ds = CaptionedImageDataset(tmp_path, resolution=32, crop="random", random_flip=True, seed=3, conditioning=True)
    crops = set()
    for epoch in range(5):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert torch.allclose(item["conditioning_pixel_values"] * 2 - 1, item["pixel_values"], atol=1e-5)
            crops.add((i, *item["micro"][2:].tolist()))
    assert len(crops) > 3  # the crops did move
    # conditioning_values prepares the map as pixel_values prepares the image, draw for draw
    for flip in (False, True):
        a, b = ds.rng(0), ds.rng(0)
        b.setstate(a.getstate())
        assert torch.allclose(ds.conditioning_values(0, flip=flip, rng=a) * 2 - 1,
                              ds.pixel_values(0, flip=flip, rng=b), atol=1e-5)


def test_dataset_errors_name_the_row_and_the_file(tmp_path, shapes_with_maps):
    table = rows(shapes_with_maps)
    del table[2]["conditioning_file_name"]
    (shapes_with_maps / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table))
    with pytest.raises(ValueError, match=r"line 3 needs a string 'conditioning_file_name'.*got None"):
        CaptionedImageDataset(shapes_with_maps, resolution=64, conditioning=True)
    table[2]["conditioning_file_name"] = "conditioning/gone.png"
    (shapes_with_maps / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table))
    with pytest.raises(ValueError, match=r"line 3 names control map 'conditioning/gone.png', which is not a file"):
        CaptionedImageDataset(shapes_with_maps, resolution=64, conditioning=True)
    # a map of another size than its image is refused, not resized
    table[2]["conditioning_file_name"] = name = f"conditioning/{table[2]['file_name']}"
    (shapes_with_maps / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table))
    Image.new("RGB", (32, 32)).save(shapes_with_maps / name)
    ds = CaptionedImageDataset(shapes_with_maps, resolution=64, conditioning=True)
    with pytest.raises(ValueError, match=rf"control map .*{name}' is 32x32, but its image .* is 64x64"):
        ds[2]
    # caption .txt folders carry no maps
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(ValueError, match="conditioning=True needs a metadata.jsonl"):
        CaptionedImageDataset(tmp_path, resolution=8, conditioning=True)


def test_without_conditioning_the_maps_are_neither_read_nor_reported_as_left_out(shapes_with_maps):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # listed maps are not "images left out"
        ds = CaptionedImageDataset(shapes_with_maps, resolution=64)
    assert set(ds[0]) == {"pixel_values", "caption", "micro"}
    with pytest.raises(ValueError, match="made without conditioning=True"):
        ds.load_conditioning(0)


def test_latent_cache_serves_the_map_with_the_latents_flip(shapes_with_maps):
    def encode_image(pixels):  # (B, 3, R, R) -> (B, 3, R/8, R/8)
        return torch.nn.functional.avg_pool2d(pixels, 8)

    def encode_text(captions):
        from latentloom.text_encoders.embedding import TextEmbedding

        return TextEmbedding(torch.zeros(len(captions), 1, 4), torch.ones(len(captions), 1, dtype=torch.long), None)

    ds = CaptionedImageDataset(shapes_with_maps, resolution=64, random_flip=True, seed=2, conditioning=True)
    cache = LatentCache(ds, encode_image=encode_image, encode_text=encode_text)
    seen = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = cache[i]
            flipped = torch.equal(item["latents"], encode_image(ds.pixel_values(i, flip=True)[None])[0])
            expected = ds.conditioning_values(i, flip=flipped)
            assert torch.equal(item["conditioning_pixel_values"], expected)
            seen.add(flipped)
    assert seen == {True, False}
