"""The bundled upscale stage: "bundled:upscaler" names weights/upscaler/ (and "bundled:default" the
base model); unknown or missing bundled models are clear errors."""
import pytest

import latentloom
import latentloom.pipelines.loading as loading
from latentloom.cli import main as cli_main


def test_unknown_bundled_name_is_refused():
    with pytest.raises(ValueError, match=r"unknown bundled model 'bundled:upscaler8'; expected one of "
                                         r"'bundled:default', 'bundled:upscaler'"):
        latentloom.load_pipeline("bundled:upscaler8", device="cpu")


@pytest.mark.parametrize("name", ["default", "upscaler"])
def test_missing_bundled_model_names_its_folder(monkeypatch, tmp_path, name):
    asked = []

    def fake_dir(n="default"):
        asked.append(n)
        return tmp_path / n

    monkeypatch.setattr(loading, "bundled_model_dir", fake_dir)
    with pytest.raises(FileNotFoundError, match=f"the bundled {name} model is not in this install yet "
                                                f"\\(expected {tmp_path / name}/model_index.json\\)"):
        latentloom.load_pipeline(f"bundled:{name}", device="cpu")
    assert asked == [name]


def test_cli_upscale_reports_an_unknown_bundled_model(tmp_path, capsys):
    image = tmp_path / "low.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (20, 20, 20)).save(image)
    rc = cli_main(["upscale", "a red circle", "--image", str(image), "--model", "bundled:nope",
                   "--no-progress", "-o", str(tmp_path / "big.png")])
    assert rc != 0
    assert "unknown bundled model 'bundled:nope'" in capsys.readouterr().err
