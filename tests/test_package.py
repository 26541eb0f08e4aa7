"""The package installs, imports cheaply and offline, and ships only latentloom/ files."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import latentloom

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_version_is_a_string():
    assert isinstance(latentloom.__version__, str) and latentloom.__version__.count(".") == 2


def test_import_is_cheap_and_lazy():
    # torch / diffusers / transformers load only when a name that needs them is used.
    loaded = run_python(
        "import sys, latentloom, latentloom.cli; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    assert loaded == "[]"


def test_import_does_not_touch_the_network():
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise RuntimeError('network used at import')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "import latentloom, latentloom.cli\n"
        "for name in latentloom.__all__: getattr(latentloom, name)\n"
        "print('ok')\n"
    )
    assert run_python(code) == "ok"


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        latentloom.no_such_thing  # noqa: B018


def test_cli_version_and_help():
    version = subprocess.run(
        [sys.executable, "-m", "latentloom", "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.strip() == f"latentloom {latentloom.__version__}"
    helped = subprocess.run(
        [sys.executable, "-m", "latentloom", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: latentloom" in helped.stdout


def test_cli_help_does_not_import_torch():
    loaded = run_python(
        "import sys, contextlib, io\n"
        "from latentloom.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "print('torch' in sys.modules)"
    )
    assert loaded == "False"


DIFFUSERS_LOADED = "print(sorted(m for m in sys.modules if m == 'diffusers' or m.startswith('diffusers.')))"


def test_bundled_generate_does_not_import_diffusers(tmp_path):
    """The VAE is latentloom's own: the bundled model's whole generate path runs without diffusers."""
    out = tmp_path / "image.png"
    loaded = run_python(
        "import sys, contextlib, io\n"
        "from latentloom.cli import main\n"
        "with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):\n"
        f"    main(['generate', 'a red circle on a blue background', '--steps', '2', '-o', {str(out)!r}])\n"
        + DIFFUSERS_LOADED
    )
    assert out.is_file() and loaded == "[]"


def test_loading_a_diffusers_folder_does_not_import_diffusers(tmp_path):
    from builders import save_sd_folder, tiny_sd_pipeline

    folder = save_sd_folder(tiny_sd_pipeline(), tmp_path / "sd")
    loaded = run_python(
        "import sys, latentloom\n"
        f"pipe = latentloom.load_pipeline({str(folder)!r}, device='cpu')\n"
        "pipe('a red circle', num_inference_steps=2, height=16, width=16, seed=0, progress=False)\n"
        + DIFFUSERS_LOADED
    )
    assert loaded == "[]"


def test_wheel_contains_only_the_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(REPO)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = tmp_path.glob("latentloom-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    package_files = [n for n in names if ".dist-info/" not in n]
    assert package_files, names
    outside = [n for n in package_files if not n.startswith("latentloom/")]
    assert outside == []
    assert not any(n.startswith("latentloom/tests/") or n.startswith("latentloom/benchmarks/") for n in names)
    for sub in ("unet", "text_encoders", "samplers", "pipelines", "training", "weights"):
        assert f"latentloom/{sub}/__init__.py" in names
    # the bundled models (the ControlNet and the LCM-LoRA too) and the page ship: `generate` works offline
    shipped = [f"latentloom/{p.relative_to(REPO).as_posix()}" for p in sorted((REPO / "weights").rglob("*"))
               if p.suffix in (".safetensors", ".json")]
    assert "latentloom/weights/controlnet/diffusion_pytorch_model.safetensors" in shipped
    assert [n for n in shipped if n not in names] == []
    assert {"latentloom/serve/static/index.html", "latentloom/serve/static/app.js"} <= set(names)
