"""`latentloom make-shapes` writes the same files as write_dataset, and starts without torch."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from latentloom.cli import main
from latentloom.synthetic import shapes as ss


def test_make_shapes_writes_the_dataset(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["make-shapes", "--out", str(out), "--n", "7", "--seed", "3", "--split", "heldout"]) == 0
    assert "wrote 7 heldout images" in capsys.readouterr().out
    ref = ss.write_dataset(tmp_path / "ref", 7, seed=3, split="heldout")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    for p in ref.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes()


def test_make_shapes_reports_errors(tmp_path, capsys):
    assert main(["make-shapes", "--out", str(tmp_path), "--n", "0"]) == 2
    assert "n must be a positive int, got 0" in capsys.readouterr().err
    assert main(["make-shapes", "--out", str(tmp_path), "--n", "1"]) == 0
    assert main(["make-shapes", "--out", str(tmp_path), "--n", "1"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_make_shapes_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from latentloom.cli import main\n"
        f"main(['make-shapes', '--out', {str(tmp_path / 'o')!r}, '--n', '2'])\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_make_shapes_size_renders_the_same_scenes_and_captions(tmp_path, capsys):
    out = tmp_path / "big"
    assert main(["make-shapes", "--out", str(out), "--n", "3", "--seed", "4", "--size", "128"]) == 0
    assert "wrote 3 train images (128x128)" in capsys.readouterr().out
    small = ss.write_dataset(tmp_path / "small", 3, seed=4)  # default size 64
    big_rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    small_rows = [json.loads(line) for line in (small / "metadata.jsonl").read_text().splitlines()]
    assert big_rows == small_rows  # same file names, captions and scenes
    for row in big_rows:
        big = Image.open(out / row["file_name"])
        assert big.size == (128, 128)
        # The same scene rendered at 128 px, and, box-filtered to 64 px, the 64-px file.
        scene = ss.scene_from_dict(row["scene"])
        assert np.array_equal(np.asarray(big), np.asarray(ss.render(scene, size=128)))
        down = np.asarray(big.resize((64, 64), Image.Resampling.BOX), dtype=np.float64)
        ref = np.asarray(Image.open(small / row["file_name"]), dtype=np.float64)
        assert np.abs(down - ref).mean() < 2.0


def test_write_dataset_default_size_is_64(tmp_path):
    out = ss.write_dataset(tmp_path / "d", 2, seed=0)
    assert {Image.open(p).size for p in out.glob("*.png")} == {(64, 64)}


@pytest.mark.parametrize("size", [0, 32, 100, 65, 1088, 2048, 64.0, "64", True])
def test_write_dataset_rejects_bad_sizes(tmp_path, size):
    with pytest.raises(ValueError, match=rf"size must be a multiple of 64 in \[64, 1024\].*got {re.escape(repr(size))}"):
        ss.write_dataset(tmp_path / "d", 1, seed=0, size=size)
    assert not (tmp_path / "d").exists()  # checked before anything is written


@pytest.mark.parametrize("size", ["32", "100", "1088"])
def test_make_shapes_reports_bad_sizes(tmp_path, capsys, size):
    assert main(["make-shapes", "--out", str(tmp_path / "o"), "--n", "1", "--size", size]) == 2
    err = capsys.readouterr().err
    assert "size must be a multiple of 64 in [64, 1024]" in err and f"got {size}" in err
    assert not (tmp_path / "o").exists()
