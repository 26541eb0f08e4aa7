"""`latentloom bench` and latentloom.benchmarking: tables, JSON, identical weights, argument errors.

Everything runs on the tiny preset (seconds). No timing is asserted: only that the tables have
their columns and finite positive numbers, and that both libraries compute the same thing.
"""
import json
import math
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from latentloom import cli
from latentloom.benchmarking import measure, sd_random

ONE_TORCH_THREAD = True  # tests/conftest.py: tiny models run faster on one thread

UNET_HEADER = ["mode", "diffusers s", "latentloom s", "ratio", "paired ratio", "cpu ratio",
               "dRSS diffusers GB", "dRSS latentloom GB", "max rel. diff"]
SAME_HEADER = ["mode", "diffusers s/step", "latentloom s/step", "step ratio", "diffusers s/image",
               "latentloom s/image", "image ratio", "cpu step ratio", "cpu image ratio", "max pixel diff"]
DEFAULTS_HEADER = ["library", "settings", "denoiser calls", "s/step", "encode s", "decode s", "s/image",
                   "cpu s/image"]


def bench(argv, tmp_path, capsys):
    """Run `latentloom bench ...` in-process with --json; return (stdout, the JSON)."""
    path = tmp_path / "tables.json"
    assert cli.main(["bench", *argv, "--json", str(path)]) == 0
    return capsys.readouterr().out, json.loads(path.read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# ------------------------------------------------------------------ the CLI targets
def test_bench_unet_sdxl_runs_each_library_in_its_own_process(tmp_path, capsys):
    out, data = bench(["unet", "--preset", "sdxl-tiny", "--runs", "2", "--size", "16", "--modes", "fp32",
                       "--weights-dir", str(tmp_path / "weights")], tmp_path, capsys)
    (table,) = data["tables"]
    assert "each library in its own process" in table["title"] and "y 160" in table["title"]
    (row,) = table["rows"]
    assert row[0] == "fp32" and len(row) == len(table["header"])
    assert all(positive(v) for v in row[1:10]), row
    assert row[10] < 1e-4  # the same weights and inputs: the same output
    assert out.count(" round ") == 4  # two rounds x two libraries


def test_bench_unet_tiny_table_and_json(tmp_path, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, data = bench(["unet", "--preset", "tiny", "--runs", "1", "--size", "16", "--modes", "fp32,bf16-cl"],
                          tmp_path, capsys)
        assert torch.get_num_threads() == 2  # measured with --threads 1 (the default), then given back
    finally:
        torch.set_num_threads(before)
    assert "1 thread(s)" in data["tables"][0]["title"]
    (table,) = data["tables"]
    assert table["header"] == UNET_HEADER
    assert [row[0] for row in table["rows"]] == ["fp32", "bf16-cl"]
    for row in table["rows"]:
        assert all(positive(v) for v in row[1:6]), row  # seconds and ratios
        assert all(v >= 0 for v in row[6:8]), row  # RSS growth may be 0 for a small model
        assert 0 <= row[8] < (1e-5 if row[0] == "fp32" else 5e-2), row  # same weights, same function
    # the noted command (options at their defaults left out) parses back to the same settings
    command = data["command"]
    assert f"- command: `{command}`" in out and command.startswith("latentloom bench unet ")
    again = cli.build_parser().parse_args(shlex.split(command)[1:])
    expected = cli.build_parser().parse_args(["bench", "unet", "--preset", "tiny", "--runs", "1", "--size", "16",
                                              "--modes", "fp32,bf16-cl", "--json", str(tmp_path / "tables.json")])
    settings = lambda ns: {k: v for k, v in vars(ns).items() if k not in ("func", "bench_parser")}  # noqa: E731
    assert settings(again) == settings(expected)
    assert "| mode | diffusers s | latentloom s | ratio |" in out


def test_bench_unet_roofline_tiny_kinds_flops_and_shares(tmp_path, capsys):
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from latentloom.benchmarking import unet_bench, unet_roofline

    out, data = bench(["unet", "--roofline", "--preset", "tiny", "--runs", "1", "--size", "16", "--modes", "fp32"],
                      tmp_path, capsys)
    kinds_table, peaks_table = data["tables"]
    assert kinds_table["header"] == unet_roofline.HEADER and "| op kind | library | ms | share % |" in out
    assert {row[1] for row in peaks_table["rows"]} >= {"matmul GEMM 2048^3", "copy 256 MiB"}
    assert all(positive(row[2]) for row in peaks_table["rows"])
    # the FLOPs of the same shapes, counted here: FlopCounterMode plus torch's own SDPA formula for the
    # CPU flash kernel it does not count
    ref, ours, cfg = unet_bench.build_models("tiny", "sdpa")
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, cfg.in_channels, 16, 16, generator=g), torch.randn(2, 77, cfg.context_dim, generator=g)
    cpu_flash = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                 lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
    for library, fn in (("latentloom", lambda: ours(x, torch.full((2,), 500.0), c)),
                        ("diffusers", lambda: ref(x, torch.full((2,), 500.0), c).sample)):
        rows = {row[0]: row for row in kinds_table["rows"] if row[1] == library}
        total = rows.pop("total")
        assert {"matmul/linear", "conv", "attention", "norm", "elementwise", "upsample", "copy/layout"} <= set(rows)
        assert sum(row[3] for row in rows.values()) == pytest.approx(100, abs=0.5)  # shares of the forward
        assert sum(row[2] for row in rows.values()) == pytest.approx(total[2], rel=1e-3)  # ms add up
        for kind in ("matmul/linear", "conv", "attention"):  # compute kinds: FLOPs, speed and a fraction of peak
            assert all(positive(v) for v in rows[kind][4:9]), rows[kind]
        for kind in ("norm", "elementwise", "copy/layout"):  # memory kinds: no FLOPs, bytes against bandwidth
            assert rows[kind][4] == 0 and positive(rows[kind][7]) and rows[kind][9].startswith("copy"), rows[kind]
        with torch.no_grad(), FlopCounterMode(display=False) as plain:
            fn()
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_flash) as full:
            fn()
        assert total[4] * 1e9 == pytest.approx(full.get_total_flops(), rel=1e-9)
        assert sum(row[4] for k, row in rows.items() if k != "attention") * 1e9 == pytest.approx(
            plain.get_total_flops(), rel=1e-9)


def test_roofline_op_kinds_read_profiler_and_dispatcher_names():
    from latentloom.benchmarking.unet_roofline import op_kind

    for names, kind in ((("aten::addmm", "aten::mm.default", "aten.bmm.default"), "matmul/linear"),
                        (("aten::mkldnn_convolution", "aten.convolution.default"), "conv"),
                        (("aten::_scaled_dot_product_flash_attention_for_cpu",), "attention"),
                        (("aten::native_group_norm", "aten::native_layer_norm.default"), "norm"),
                        (("aten::silu", "aten::add_.Tensor", "aten.mul.Tensor"), "elementwise"),
                        (("aten::upsample_nearest2d",), "upsample"),
                        (("aten::copy_", "aten.cat.default", "aten::contiguous"), "copy/layout"),
                        (("aten::arange", "prim::something"), "other ops")):
        assert [op_kind(n) for n in names] == [kind] * len(names)


def test_bench_pipeline_tiny_same_settings_and_composed_defaults(tmp_path, capsys):
    out, data = bench(["pipeline", "--preset", "tiny", "--runs", "1", "--modes", "fp32", "--steps", "3",
                       "--measure-steps", "2"], tmp_path, capsys)
    same, defaults = data["tables"]
    assert same["header"] == SAME_HEADER and defaults["header"] == DEFAULTS_HEADER
    (row,) = same["rows"]
    assert row[0] == "fp32" and all(positive(v) for v in row[1:9]), row
    assert 0 <= row[9] < 1e-3, row  # identical weights, sampler and seed: the same image
    diffusers, ours, ratio = defaults["rows"]
    assert diffusers[:3] == ["diffusers", "fp32, contiguous, PNDM, 50 steps", 51]  # PLMS: 51 UNet calls
    assert ours[0] == "latentloom" and "dpmpp_2m, 30 steps" in ours[1] and ours[2] == 30
    for r in (diffusers, ours, ratio):
        assert all(positive(v) for v in r[3:]), r
    # the composed time per image is exactly its parts
    for r in (diffusers, ours):
        assert r[6] == pytest.approx(r[4] + r[2] * r[3] + r[5])
    assert ratio[6] == pytest.approx(ours[6] / diffusers[6])
    assert "composed from measured parts" in out


def test_bench_pipeline_tiny_whole_image_defaults(tmp_path, capsys):
    _, data = bench(["pipeline", "--preset", "tiny", "--runs", "1", "--parts", "defaults"], tmp_path, capsys)
    (table,) = data["tables"]
    diffusers, ours, ratio = table["rows"]
    assert diffusers[4:6] == [None, None] and ours[4:6] == [None, None]  # whole images: no parts
    assert all(positive(v) for v in (diffusers[6], ours[6], ratio[3], ratio[6], ratio[7]))
    assert any("whole images" in note for note in table["notes"])


BAD_ARGS = [
    (["unet", "--modes", "fp64"], "fp64"),
    (["unet", "--modes", ""], "--modes"),
    (["unet", "--preset", "sd3"], "sd3"),
    (["unet", "--size", "12"], "--size"),
    (["unet", "--batch", "0"], "--batch"),
    (["unet", "--runs", "0"], "--runs"),
    (["unet", "--backend", "flash"], "flash"),
    (["unet", "--device", "tpu"], "tpu"),
    (["unet", "--threads", "-1"], "--threads"),
    (["unet", "--json", "/no/such/folder/t.json"], "/no/such/folder"),
    (["unet", "--roofline", "--compile"], "--compile"),
    (["unet", "--roofline", "--preset", "sdxl-tiny"], "sdxl-tiny"),
    (["pipeline", "--preset", "huge"], "huge"),
    (["pipeline", "--resolution", "100"], "100"),
    (["pipeline", "--modes", "bf16-cl,bf16-cl"], "distinct"),
    (["pipeline", "--modes", "fp16"], "fp16"),
    (["pipeline", "--parts", "same,speed"], "speed"),
    (["pipeline", "--steps", "1"], "--steps"),
    (["pipeline", "--measure-steps", "30"], "--measure-steps"),
    (["pipeline", "--runs", "0"], "--runs"),
    (["pipeline", "--prompt", "  "], "--prompt"),
]


@pytest.mark.parametrize("argv, names", BAD_ARGS)
def test_bad_arguments_are_usage_errors_naming_the_value(argv, names, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"latentloom bench {argv[0]}: error:" in err and names in err


def test_bench_without_target_prints_help(capsys):
    assert cli.main(["bench"]) == 2
    out = capsys.readouterr().out
    for target in ("unet", "pipeline", "memory", "bundled", "startup"):
        assert f"    {target} " in out
    parsed = cli.build_parser().parse_args(["bench", "startup"])
    assert parsed.target == "startup" and parsed.bench_module == "latentloom.benchmarking.startup_bench"


def test_bench_help_does_not_import_torch():
    code = ("import sys; from latentloom import cli; cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ the random SD builder
@pytest.fixture(scope="module")
def tiny_pair():
    return sd_random.build(preset="tiny", seed=0)


def test_random_sd_pipelines_make_the_same_image(tiny_pair):
    import diffusers

    ref, ours = tiny_pair.diffusers, tiny_pair.latentloom
    pndm = ref.scheduler
    # swapped the documented way; the config leaves timestep_spacing to each class, as latentloom resolves it
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pndm.config, algorithm_type="dpmsolver++")
    try:
        args = dict(num_inference_steps=4, height=64, width=64, guidance_scale=7.5, output_type="np")
        expected = ref("a red cube", generator=torch.Generator().manual_seed(5), **args).images
        got = ours("a red cube", sampler="dpmpp_2m", generator=torch.Generator().manual_seed(5), progress=False,
                   **args).images
    finally:
        ref.scheduler = pndm
    assert got.shape == expected.shape == (1, 64, 64, 3)
    assert expected.std() > 0.01  # a real image, not a constant
    assert np.abs(got - expected).max() < 1e-3


def test_random_sd_weights_are_identical_copies(tiny_pair):
    ref, ours = tiny_pair.diffusers, tiny_pair.latentloom
    assert ours.vae is not ref.vae and ours.text_encoder.model is not ref.text_encoder
    for a, b in zip(ref.vae.parameters(), ours.vae.parameters()):
        assert torch.equal(a, b)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)  # (B, C, h, w), (B, L, D)
    t = torch.full((2,), 300.0)
    with torch.no_grad():
        torch.testing.assert_close(ours.unet(x, t, c), ref.unet(x, t, c).sample, rtol=1e-5, atol=1e-5)
    assert ref.scheduler.config.skip_prk_steps and ref.scheduler.config.steps_offset == 1
    assert type(ref.scheduler).__name__ == "PNDMScheduler" and ref.safety_checker is None


def test_random_sd_same_seed_same_weights():
    a, b = sd_random.text_model("tiny", seed=3), sd_random.text_model("tiny", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_sd15_shapes_are_stable_diffusion_1_5():
    from latentloom.unet import UNetConfig

    assert sd_random.unet_config("sd15") == UNetConfig.sd15()
    vae = sd_random.vae_config("sd15")
    assert list(vae["block_out_channels"]) == [128, 256, 512, 512] and vae["scaling_factor"] == 0.18215
    assert vae["layers_per_block"] == 2 and vae["latent_channels"] == 4
    text = sd_random.text_config("sd15")
    assert (text.num_hidden_layers, text.hidden_size, text.max_position_embeddings) == (12, 768, 77)


def test_byte_tokenizer_covers_any_text():
    tok = sd_random.tokenizer()
    ids = tok("café 🚀 <b>", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in ids[1:ids.index(tok.eos_token_id)]  # every byte has a token
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "café🚀<b>"


@pytest.mark.parametrize("call, names", [
    (lambda: sd_random.build(preset="sd21"), "sd21"),
    (lambda: sd_random.build(preset="tiny", seed=1.5), "seed"),
    (lambda: sd_random.build(preset="tiny", resolution=96), "96"),
    (lambda: sd_random.check_resolution(True), "True"),
])
def test_random_sd_errors_name_the_value(call, names):
    with pytest.raises(ValueError, match=names):
        call()


# ------------------------------------------------------------------ measure helpers
def test_alternate_flips_the_order_and_keeps_results():
    calls = []
    fns = {"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}
    samples = measure.alternate(fns, runs=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert samples.results == {"a": [1, 1, 1], "b": [2, 2, 2]}
    assert samples.warmup_results == {"a": [1], "b": [2]}
    assert all(len(v) == 3 and min(v) >= 0 for v in samples.wall.values())
    assert samples.rss_growth == {"a": [], "b": []}


def test_alternate_with_rss_records_growth():
    samples = measure.alternate({"grow": lambda: bytearray(64 << 20)}, runs=1, warmup=0, rss=True)
    assert samples.rss_growth["grow"][0] >= 0


@pytest.mark.parametrize("kwargs, names", [
    (dict(fns={}, runs=1), "at least one"),
    (dict(fns={"a": int}, runs=0), "runs"),
    (dict(fns={"a": int}, runs=1, warmup=-1), "warmup"),
    (dict(fns={"a": int}, runs=True), "runs"),
])
def test_alternate_errors(kwargs, names):
    with pytest.raises(ValueError, match=names):
        measure.alternate(**kwargs)


def test_median_and_its_error():
    assert measure.median([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError, match="empty"):
        measure.median([])


def test_table_markdown_dict_and_json(tmp_path):
    table = measure.Table(title="T", header=["name", "s", "ratio"], notes=["a note"])
    table.add_row(["x", 1.23456, 0.000123])
    table.add_row(["y", None, float("nan")])
    text = table.to_markdown()
    assert text.splitlines()[:5] == ["### T", "", "| name | s | ratio |", "|---|---|---|", "| x | 1.23 | 1.23e-04 |"]
    assert "| y | n/a | nan |" in text and "- a note" in text
    with pytest.raises(ValueError, match="2 cells"):
        table.add_row(["z", 1.0])
    path = tmp_path / "t.json"
    measure.write_json([table], path, command="latentloom bench x")
    data = json.loads(path.read_text())  # strict JSON: the NaN became null
    assert data["tables"][0]["rows"][1] == ["y", None, None] and data["command"] == "latentloom bench x"
