"""`latentloom make-shapes` writes the same files as write_dataset, and starts without torch."""
import subprocess
import sys

from latentloom.cli import main
from latentloom.training import synthetic_shapes as ss


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
