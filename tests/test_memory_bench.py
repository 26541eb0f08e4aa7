"""`latentloom bench memory|bundled|startup` modules on tiny settings: the tables' shapes and sane
numbers (no timing or memory assertions), the child-process path, and every documented error."""
import argparse
import math

import pytest

from latentloom.benchmarking import memory_bench, startup_bench
from latentloom.benchmarking.measure import Table


def memory_args(**overrides):
    args = dict(preset="tiny", resolutions="64", steps=1, untiled_rows=True, child_timeout=600.0, threads=1,
                runs=None, json=None, parts="image")
    args.update(overrides)
    return argparse.Namespace(**args)


def startup_args(**overrides):
    args = dict(parts="bundled", steps=2, prompt="a red circle on a blue background", threads=1, runs=1,
                preset=None, json=None)
    args.update(overrides)
    return argparse.Namespace(**args)


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_memory_run_measures_each_case_in_its_own_process(monkeypatch):
    monkeypatch.setattr(memory_bench, "ATTENTION_CASES", (("sdpa", "float32", None),))  # one child is enough here
    image, attention, vae = memory_bench.run(memory_args(parts="image,attention,vae"))
    assert isinstance(image, Table) and len(image.header) == 8
    assert [row[:2] for row in image.rows] == [["64x64", "diffusers"], ["64x64", "latentloom"]]
    for row in image.rows:
        assert len(row) == len(image.header)
        peak, image_peak, weights, seconds = row[3:7]
        assert all(positive(v) for v in (peak, image_peak, weights, seconds)), row
        assert weights <= image_peak <= peak * 1.05  # polled RSS can read a page or two above ru_maxrss
    assert image.rows[0][7] is None and positive(image.rows[1][7])
    assert "float32" in image.rows[0][2] and "VAE tiling off" in image.rows[0][2]
    assert "VAE tiling auto (off)" in image.rows[1][2]  # the tiny VAE never tiles at 64 px
    assert "| 64x64 | latentloom |" in image.to_markdown()

    assert "8x8 latents (64 tokens" in attention.title
    (row,) = attention.rows
    assert row[:3] == ["sdpa", "float32", "2 x 2"] and len(row) == len(attention.header)
    growth, scores, seconds = row[3:]
    assert math.isfinite(growth) and growth >= 0 and positive(seconds)
    assert scores == 2 * 2 * 64 * 64 * 4 / 1e9

    (row,) = vae.rows  # 64 px is one tile: no tiled row
    assert row[:2] == ["64x64", "off"] and len(row) == len(vae.header)
    assert math.isfinite(row[2]) and row[2] >= 0 and positive(row[3]) and positive(row[4])


def test_memory_run_adds_an_untiled_row_where_the_automatic_choice_tiles(monkeypatch):
    calls = []

    def fake_case(*, library, resolution, tiling, **kwargs):
        calls.append((library, resolution, tiling))
        tiled = library == "latentloom" and tiling == "auto" and resolution == 128
        return dict(library=library, settings=f"{library} {tiling}", max_rss=2e9 if tiled else 4e9,
                    image_peak=1e9, before_image=5e8, seconds=1.0, tiled=tiled)

    monkeypatch.setattr(memory_bench, "measure_case", fake_case)
    (table,) = memory_bench.run(memory_args(resolutions="64,128"))
    assert calls == [("diffusers", 64, "auto"), ("latentloom", 64, "auto"),
                     ("diffusers", 128, "auto"), ("latentloom", 128, "auto"), ("latentloom", 128, "off")]
    assert [row[7] for row in table.rows] == [None, 1.0, None, 0.5, 1.0]
    calls.clear()
    (table,) = memory_bench.run(memory_args(resolutions="128", untiled_rows=False))
    assert len(table.rows) == 2 and ("latentloom", 128, "off") not in calls


def test_sdxl_memory_loads_one_saved_folder_in_each_process_and_stops_a_case_at_its_limit(tmp_path):
    """--preset sdxl-tiny: the random SDXL folder is written once; diffusers' from_pretrained and
    latentloom's load_pipeline read it; latentloom's fp32 row appears where its default dtype is not fp32."""
    from latentloom.pipelines.runtime import fast_dtype

    (table,) = memory_bench.run(memory_args(preset="sdxl-tiny", resolutions="64", weights_dir=str(tmp_path),
                                            memory_limit_gb=None))
    assert (tmp_path / "sdxl-tiny-seed0" / "model_index.json").is_file()
    libraries = [row[1] for row in table.rows]
    default_is_fp32 = str(fast_dtype("cpu")) == "torch.float32"
    assert libraries == ["diffusers", "latentloom"] + ([] if default_is_fp32 else ["latentloom"])
    assert "EulerDiscreteScheduler" in table.rows[0][2]
    if not default_is_fp32:
        assert table.rows[2][2].startswith("float32 (chosen)")
    for row in table.rows:
        assert all(positive(v) for v in row[3:7]), row
    stopped = memory_bench.measure_case(library="latentloom", preset="sdxl-tiny", resolution=64, steps=1,
                                        tiling="auto", threads=1, memory_limit=int(0.05e9),
                                        folder=str(tmp_path / "sdxl-tiny-seed0"))
    assert stopped["too_big"] and stopped["limit"] == int(0.05e9)
    assert memory_bench._row(64, stopped, None)[3] == "did not fit (> 0.1)"


@pytest.mark.parametrize("overrides, match", [
    (dict(parts="image,warp"), "--parts must be a comma list of distinct names"),
    (dict(resolutions="500"), "resolution must be a multiple of 64"),
    (dict(resolutions="64,abc"), "--resolutions must be a comma list of integers"),
    (dict(resolutions=" , "), "--resolutions must name at least one size"),
    (dict(steps=0), "--steps must be an int >= 1, got 0"),
    (dict(child_timeout=0.0), "--child-timeout must be > 0"),
    (dict(preset="sd3"), "preset must be one of"),
    (dict(threads=-1), "--threads must be >= 0, got -1"),
    (dict(preset="sdxl-tiny", parts="attention"), "measures the image part only"),
    (dict(memory_limit_gb=0.0), "--memory-limit-gb must be > 0"),
])
def test_memory_settings_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        memory_bench.check_args(memory_args(**overrides))


def test_measure_case_errors():
    with pytest.raises(ValueError, match="library must be one of .*got 'torch'"):
        memory_bench.measure_case(library="torch", preset="tiny", resolution=64, steps=1, tiling="auto", threads=1)
    with pytest.raises(ValueError, match="tiling must be one of .*got 'yes'"):
        memory_bench.measure_case(library="diffusers", preset="tiny", resolution=64, steps=1, tiling="yes",
                                  threads=1)
    # a child that fails reports its own error
    with pytest.raises(RuntimeError, match="(?s)failed \\(exit 1\\).*preset must be one of"):
        memory_bench.measure_case(library="diffusers", preset="huge", resolution=64, steps=1, tiling="auto",
                                  threads=1)


def test_main_writes_json(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(memory_bench, "ATTENTION_CASES", (("sdpa", "bfloat16", (1, 1)),))
    path = tmp_path / "attention.json"
    memory_bench.main(["--preset", "tiny", "--parts", "attention", "--resolutions", "64", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["command"].endswith(f"--json {path}") and data["tables"][0]["header"][0] == "backend"
    assert len(data["tables"][0]["rows"]) == len(memory_bench.ATTENTION_CASES)


def test_memory_main_refuses_bad_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        memory_bench.main(["--preset", "tiny", "--steps", "0"])
    assert exit_info.value.code == 2
    assert "--steps must be an int >= 1" in capsys.readouterr().err


def test_bundled_and_startup_tables():
    bundled, startup = startup_bench.run(startup_args(parts="bundled,startup"))
    assert [row[0] for row in bundled.rows] == ["diffusers", "latentloom", "latentloom bundled:fast"]
    for row in bundled.rows:
        assert len(row) == len(bundled.header)
        assert all(positive(v) for v in row[2:5]), row
    assert bundled.rows[0][5] is None and positive(bundled.rows[1][5]) and positive(bundled.rows[1][6])
    assert "4 lcm steps" in bundled.rows[2][1] and bundled.rows[2][7].endswith("the default's time")
    assert "2 steps" in bundled.title
    generate, torch_row, lazy = startup.rows
    assert generate[0].startswith("latentloom generate ")
    assert (torch_row[0], lazy[0]) == ('python -c "import torch"', 'python -c "import latentloom"')
    for row in startup.rows:
        assert len(row) == len(startup.header)
        assert positive(row[1]) and positive(row[2]) and len(row[3].split()) == 1
    # the cold start as a multiple of a bare `import torch`, against the 2.5x goal
    assert startup.header[4] == "x import torch" and torch_row[4] == "1.00x"
    assert generate[4] == f"{generate[1] / torch_row[1]:.2f}x"
    assert generate[5].startswith(f"<= {startup_bench.GOALS['startup_ratio']:g}x import torch: ")


def test_startup_parts_default_to_the_bench_target():
    assert startup_bench.settings(startup_args(parts=None, target="bundled"))["parts"] == ["bundled"]
    assert startup_bench.settings(startup_args(parts=None, target="startup"))["parts"] == ["startup"]
    assert startup_bench.settings(startup_args(parts=None))["parts"] == ["bundled", "startup"]


def test_time_command_reports_a_failing_command():
    import sys

    with pytest.raises(RuntimeError, match="(?s)failed \\(exit 3\\).*boom"):
        startup_bench.time_command([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"],
                                   env={})


@pytest.mark.parametrize("overrides, match", [
    (dict(parts="bundled,warp"), "--parts must be a comma list of distinct names"),
    (dict(parts="startup,startup"), "--parts must be a comma list of distinct names"),
    (dict(runs=0), "--runs must be an int >= 1, got 0"),
    (dict(steps=0), "--steps must be an int >= 1, got 0"),
    (dict(prompt="  "), "--prompt must not be empty"),
    (dict(preset="sd15"), "--preset does not apply here"),
    (dict(threads=-2), "--threads must be >= 0, got -2"),
])
def test_startup_settings_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        startup_bench.check_args(startup_args(**overrides))
