"""CaptionedImageDataset: folder and metadata.jsonl layouts, resize/crop/flip, clear errors."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from latentloom.synthetic import shapes as ss
from latentloom.training.data import CaptionedImageDataset


def write(folder, name, image, caption=None):
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption + "\n")


def stripes(w, h):
    """Each column x has color (x, 255 - x, 7): crops and flips are easy to read back."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(w)[None] % 256
    arr[..., 1] = 255 - np.arange(w)[None] % 256
    arr[..., 2] = 7
    return Image.fromarray(arr)


def to_uint8(pixel_values):
    return ((pixel_values.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()


def test_folder_with_txt_captions(tmp_path):
    write(tmp_path, "b.png", Image.new("RGB", (40, 40), (255, 0, 0)), "red")
    write(tmp_path / "sub", "a.jpg", Image.new("RGB", (40, 40), (0, 0, 255)), "blue")
    ds = CaptionedImageDataset(tmp_path, resolution=32)
    assert len(ds) == 2
    assert [ds[i]["caption"] for i in range(2)] == ["red", "blue"]  # sorted by relative path
    item = ds[0]
    assert set(item) == {"pixel_values", "caption", "micro"}  # micro: original size and crop (SDXL)
    px = item["pixel_values"]
    assert px.shape == (3, 32, 32) and px.dtype == torch.float32
    assert px.min() >= -1 and px.max() <= 1
    assert torch.allclose(px[:, 5, 5], torch.tensor([1.0, -1.0, -1.0]))


def test_metadata_jsonl_from_the_synthetic_writer(tmp_path):
    ss.write_dataset(tmp_path, 5, seed=0)
    ds = CaptionedImageDataset(tmp_path, resolution=64)
    expected = ss.make_dataset(5, seed=0)
    for i, (image, text, _) in enumerate(expected):
        item = ds[i]
        assert item["caption"] == text
        assert np.array_equal(to_uint8(item["pixel_values"]), np.asarray(image))


def test_resize_shorter_side_then_center_crop(tmp_path):
    write(tmp_path, "wide.png", stripes(80, 64), "wide")
    ds = CaptionedImageDataset(tmp_path, resolution=32)
    got = to_uint8(ds[0]["pixel_values"])
    resized = stripes(80, 64).resize((40, 32), Image.Resampling.BICUBIC, reducing_gap=None)
    expected = np.asarray(resized.crop((4, 0, 36, 32)))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_random_crop_and_flip_are_seeded(tmp_path):
    write(tmp_path, "wide.png", stripes(128, 64), "wide")
    a = CaptionedImageDataset(tmp_path, resolution=64, crop="random", random_flip=True, seed=1)
    b = CaptionedImageDataset(tmp_path, resolution=64, crop="random", random_flip=True, seed=1)
    c = CaptionedImageDataset(tmp_path, resolution=64, crop="random", random_flip=True, seed=2)
    reads_a = [a[0]["pixel_values"] for _ in range(12)]
    reads_b = [b[0]["pixel_values"] for _ in range(12)]
    reads_c = [c[0]["pixel_values"] for _ in range(12)]
    assert all(torch.equal(x, y) for x, y in zip(reads_a, reads_b))
    assert not all(torch.equal(x, y) for x, y in zip(reads_a, reads_c))
    red = [to_uint8(x)[0, :, 0].astype(int) for x in reads_a]  # red channel = column index
    flipped = [r[0] > r[-1] for r in red]
    assert any(flipped) and not all(flipped)
    lefts = {min(r[0], r[-1]) for r in red}
    assert len(lefts) > 1  # different crop offsets
    for r in red:  # each read is a contiguous 64-column window, mirrored or not
        assert sorted(r.tolist()) == list(range(min(r), min(r) + 64))


def test_set_epoch_makes_augmentation_a_function_of_epoch(tmp_path):
    write(tmp_path, "wide.png", stripes(128, 64), "wide")
    ds = CaptionedImageDataset(tmp_path, resolution=64, crop="random", random_flip=True, seed=3)
    ds.set_epoch(4)
    first = ds[0]["pixel_values"]
    ds.set_epoch(5)
    ds[0]
    ds.set_epoch(4)
    assert torch.equal(ds[0]["pixel_values"], first)


def test_flip_mirrors_the_image(tmp_path):
    write(tmp_path, "s.png", stripes(64, 64), "s")
    ds = CaptionedImageDataset(tmp_path, resolution=64)
    assert torch.equal(ds.pixel_values(0, flip=True), ds.pixel_values(0).flip(-1))


def test_non_rgb_images_are_converted_and_transparency_warns_once(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red -> white
    write(tmp_path, "a.png", rgba, "transparent")
    write(tmp_path, "b.png", Image.new("RGBA", (16, 16), (0, 0, 0, 128)), "half")
    write(tmp_path, "c.png", Image.new("L", (16, 16), 0), "gray")
    write(tmp_path, "d.png", Image.new("RGBA", (16, 16), (0, 255, 0, 255)), "opaque")
    ds = CaptionedImageDataset(tmp_path, resolution=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i]["pixel_values"] for i in range(4)]
    alpha = [w for w in caught if "transparent" in str(w.message)]
    assert len(alpha) == 1 and "a.png" in str(alpha[0].message)
    assert torch.allclose(items[0][:, 0, 0], torch.ones(3))  # composited onto white
    assert torch.allclose(items[1][:, 0, 0], torch.full((3,), 127 / 127.5 - 1), atol=0.01)
    assert torch.allclose(items[2][:, 0, 0], -torch.ones(3))
    assert torch.allclose(items[3][:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))


def test_small_images_are_upscaled_with_a_warning(tmp_path):
    write(tmp_path, "tiny.png", Image.new("RGB", (8, 8), (0, 0, 0)), "tiny")
    ds = CaptionedImageDataset(tmp_path, resolution=32)
    with pytest.warns(UserWarning, match="tiny.png is 8x8, smaller than resolution 32"):
        assert ds[0]["pixel_values"].shape == (3, 32, 32)


def test_unlisted_images_warn_when_metadata_exists(tmp_path):
    ss.write_dataset(tmp_path, 2, seed=0)
    Image.new("RGB", (64, 64)).save(tmp_path / "extra.png")
    with pytest.warns(UserWarning, match="1 image.*not in metadata.jsonl.*extra.png"):
        ds = CaptionedImageDataset(tmp_path, resolution=64)
    assert len(ds) == 2


def test_dataloader_batches(tmp_path):
    ss.write_dataset(tmp_path, 6, seed=0)
    ds = CaptionedImageDataset(tmp_path, resolution=64, random_flip=True, seed=0)
    default = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert default["pixel_values"].shape == (3, 3, 64, 64) and len(default["caption"]) == 3


# ------------------------------------------------------------------ errors


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CaptionedImageDataset(tmp_path / "nope", resolution=64)


def test_no_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="no images in"):
        CaptionedImageDataset(tmp_path, resolution=64)


def test_image_without_caption_is_named(tmp_path):
    write(tmp_path, "ok.png", Image.new("RGB", (8, 8)), "fine")
    write(tmp_path, "lonely.png", Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError, match="'lonely.png' has no caption.*'lonely.txt'"):
        CaptionedImageDataset(tmp_path, resolution=64)


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"file_name": "a.png", "text": "x"}', "{not json"], "line 2 is not valid JSON"),
        (['{"file_name": "a.png", "text": "x"}', "", '["a.png", "x"]'], "line 3 must be a JSON object"),
        (['{"file_name": "a.png"}'], "line 1 needs a string 'text'"),
        (['{"text": "x"}'], "line 1 needs a string 'file_name'"),
        (['{"file_name": "missing.png", "text": "x"}'], "line 1 names 'missing.png', which is not a file"),
    ],
)
def test_bad_metadata_lines_name_the_line(tmp_path, lines, match):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        CaptionedImageDataset(tmp_path, resolution=64)


def test_empty_metadata_is_no_images(tmp_path):
    (tmp_path / "metadata.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no images"):
        CaptionedImageDataset(tmp_path, resolution=64)


@pytest.mark.parametrize("resolution", [0, 12, -64, 64.0, True, "64"])
def test_unsupported_resolution(tmp_path, resolution):
    write(tmp_path, "a.png", Image.new("RGB", (8, 8)), "a")
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 8"):
        CaptionedImageDataset(tmp_path, resolution=resolution)


def test_unknown_crop(tmp_path):
    write(tmp_path, "a.png", Image.new("RGB", (8, 8)), "a")
    with pytest.raises(ValueError, match="crop must be one of center, random, got 'left'"):
        CaptionedImageDataset(tmp_path, resolution=64, crop="left")


def test_unreadable_image_is_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.txt").write_text("x")
    ds = CaptionedImageDataset(tmp_path, resolution=64)
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        ds[0]


def test_metadata_rows_are_read_in_order(tmp_path):
    for name in ("x.png", "y.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    rows = [{"file_name": "y.png", "text": "why"}, {"file_name": "x.png", "text": "ex"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = CaptionedImageDataset(tmp_path, resolution=8)
    assert ds.captions == ["why", "ex"] and [f.name for f in ds.files] == ["y.png", "x.png"]


def test_exif_rotation_and_16_bit_images(tmp_path):
    tall = Image.new("RGB", (16, 32), (255, 0, 0))
    tall.paste((0, 0, 255), (0, 0, 16, 8))  # blue band on top
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the viewer rotates 90 degrees clockwise
    tall.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    (tmp_path / "rot.txt").write_text("rotated")
    gray16 = Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16))  # mid-gray in 16 bits
    gray16.save(tmp_path / "deep.png")
    (tmp_path / "deep.txt").write_text("gray")
    ds = CaptionedImageDataset(tmp_path, resolution=16)
    assert [f.name for f in ds.files] == ["deep.png", "rot.jpg"]
    assert ds.load_image(1).size == (32, 16)  # upright: wider than tall after the EXIF turn
    assert torch.allclose(ds[0]["pixel_values"], torch.full((3, 16, 16), 128 / 127.5 - 1), atol=1e-6)
