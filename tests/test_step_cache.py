"""Step caching (DeepCache, `cache_interval=N`): exact when off, the deep part of the UNet on exactly the
steps N says (a Heun step's two calls together), a shallow path that recomposes the network, checked
arguments and batches, and recipes that `generate --from` replays."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

import latentloom
from builders import save_sd_folder, tiny_lcm_pipeline, tiny_sdxl_pipeline
from latentloom.cli import main as cli_main
from latentloom.pipelines.metadata import read_metadata
from latentloom.samplers import SAMPLERS, calls_per_step
from latentloom.unet import DeepCache, UNet, UNetConfig

ARGS = dict(height=16, width=16, guidance_scale=5.0, progress=False, output_type="np")


def log_calls(unet):
    """Hooks that log "C" for every UNet call (conv_in runs on both paths), "F" when the deep part runs,
    and the batch each saw; returns (log, batches, remove)."""
    log, batches = [], {"C": set(), "F": set()}

    def hook(tag):
        def record(module, inputs, output):
            log.append(tag)
            batches[tag].add(inputs[0].shape[0])
        return record

    deep = unet.mid_block.resnets[0]  # the middle block's first ResBlock: only full calls reach it
    handles = [unet.conv_in.register_forward_hook(hook("C")), deep.register_forward_hook(hook("F"))]
    return log, batches, lambda: [h.remove() for h in handles]


def run_logged(pipe, **kwargs):
    """The call's images and its event log: "C" / "F" from the UNet hooks, step indices from the callback."""
    log, batches, remove = log_calls(pipe.unet)
    try:
        out = pipe("a red circle", seed=3, callback=lambda i, *_: log.append(i), **{**ARGS, **kwargs})
    finally:
        remove()
    return out, log, batches


def per_step(log):
    """[[full?] per call] per sampler step, from an event log. Callbacks split the calls into segments;
    a step's first call is the last of the segment before its callback, and its further calls (Heun's
    second) open the next segment, or fill the one after the last callback."""
    segments, calls = [], []
    for event in log:
        if event == "C":
            calls.append(False)
        elif event == "F":
            calls[-1] = True
        else:
            segments.append(calls)
            calls = []
    segments.append(calls)
    n = len(segments) - 1  # callbacks: one per step
    return [[segments[k][-1]] + (segments[k + 1][:-1] if k + 1 < n else segments[k + 1]) for k in range(n)]


@pytest.mark.parametrize("interval", [None, 1])
def test_interval_one_or_none_gives_bit_identical_images_and_recipes(pipe, interval):
    plain = pipe("a red circle", seed=3, num_inference_steps=6, **ARGS)
    same = pipe("a red circle", seed=3, num_inference_steps=6, cache_interval=interval, **ARGS)
    assert np.array_equal(plain.images, same.images)
    assert plain.recipes == same.recipes and "cache_interval" not in plain.recipes[0]
    cached = pipe("a red circle", seed=3, num_inference_steps=6, cache_interval=2, **ARGS)
    diff = np.abs(cached.images - plain.images)
    assert 0 < diff.max() and diff.mean() < 0.1  # reuse changes the image, a little
    assert cached.recipes[0]["cache_interval"] == 2


def test_first_order_sampler_runs_the_deep_part_every_n_steps(pipe):
    _, log, batches = run_logged(pipe, sampler="euler", num_inference_steps=5, cache_interval=2)
    assert log == ["C", "F", 0, "C", 1, "C", "F", 2, "C", 3, "C", "F", 4]
    assert batches == {"C": {2}, "F": {2}}  # cond + uncond: one batch, cached together
    _, log, batches = run_logged(pipe, sampler="euler", num_inference_steps=5, cache_interval=3,
                                 guidance_scale=1.0)
    assert log == ["C", "F", 0, "C", 1, "C", 2, "C", "F", 3, "C", 4]
    assert batches == {"C": {1}, "F": {1}}  # guidance <= 1: the conditional batch alone


def test_heun_caches_both_calls_of_a_step_together(pipe):
    _, log, _ = run_logged(pipe, sampler="heun", num_inference_steps=4, cache_interval=2)
    # a Heun step: its first call, the callback, its second call (the last step, to sigma 0, has one)
    assert log == ["C", "F", 0, "C", "F",
                   "C", 1, "C",
                   "C", "F", 2, "C", "F",
                   "C", 3]


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_the_deep_part_on_steps_divisible_by_n(pipe, sampler):
    plain, log, _ = run_logged(pipe, sampler=sampler, num_inference_steps=5)
    steps = per_step(log)
    assert len(steps) == 5 and all(all(full) for full in steps)
    # calls_per_step, which the cache relies on, is what the solver does (its last step may make fewer)
    assert [len(s) for s in steps[:-1]] == [calls_per_step(sampler)] * 4
    out, log, _ = run_logged(pipe, sampler=sampler, num_inference_steps=5, cache_interval=2)
    cached = per_step(log)
    assert [len(s) for s in cached] == [len(s) for s in steps]
    assert [set(s) for s in cached] == [{i % 2 == 0} for i in range(5)]
    assert np.isfinite(out.images).all() and not np.array_equal(out.images, plain.images)


CONFIGS = {
    # SD's first level: two ResBlocks with transformers, so the cache point is the middle one of three
    "sd-like": dict(channels=[16, 32, 32], layers_per_level=2, attention_levels=[True, True, False]),
    # SDXL's: no transformer at the first level, and the y vector
    "sdxl-like": dict(channels=[16, 32], layers_per_level=[1, 2], attention_levels=[False, True], adm_in_channels=24,
                      addition_time_embed_dim=4),
    # an LCM-distilled UNet's guidance embedding
    "lcm-like": dict(channels=[16, 32], layers_per_level=1, attention_levels=[True, True], time_cond_proj_dim=8),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_forward_equals_full_forward_when_deep_features_did_not_change(name):
    torch.manual_seed(0)
    unet = UNet(UNetConfig(num_heads=2, context_dim=32, norm_groups=8, **CONFIGS[name])).eval()
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 12, 16, generator=g), torch.randn(2, 5, 32, generator=g)
    kwargs = {}
    if unet.config.adm_in_channels is not None:
        kwargs["y"] = torch.randn(2, 24, generator=g)
    if unet.config.time_cond_proj_dim is not None:
        kwargs["guidance"] = torch.tensor([3.0, 7.5])
    log, _, remove = log_calls(unet)
    with torch.no_grad():
        cache = DeepCache(4)  # step 0 full, steps 1-3 cached
        full = unet(x, 321, context, cache=cache, **kwargs)
        cache.step_done(0)
        cached = unet(x, 321, context, cache=cache, **kwargs)
        plain = unet(x, 321, context, **kwargs)
        cache.step_done(1)
        moved = unet(x, 600, context, cache=cache, **kwargs)
        cache.step_done(2)
        if "guidance" in kwargs:
            kwargs["guidance"] = torch.tensor([1.0, 2.0])
        elif "y" in kwargs:
            kwargs["y"] = torch.randn(2, 24, generator=g)
        else:
            kwargs["context_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
        other = unet(x, 321, context, cache=cache, **kwargs)
    remove()
    assert log == ["C", "F", "C", "C", "F", "C", "C"]  # the cached calls skipped the deep part
    assert cache.full_calls == 1 and cache.cached_calls == 3
    torch.testing.assert_close(full, plain, rtol=0, atol=0)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-6)
    # the shallow path reads this call's timestep embedding and its vector / guidance / text conditioning
    assert (moved - cached).abs().max() > 1e-3
    assert (other - cached).abs().max() > 1e-4


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError), (2.5, TypeError), ("2", TypeError),
                                          (True, TypeError)])
def test_bad_intervals_are_refused_naming_the_value(pipe, value, error):
    with pytest.raises(error, match=f"cache_interval must be an int >= 1.*got .*{re.escape(repr(value))}"):
        pipe("a red circle", seed=0, num_inference_steps=2, cache_interval=value, **ARGS)
    with pytest.raises(error, match=re.escape(repr(value))):
        DeepCache(value)


def test_cli_refuses_a_bad_interval(folder, tmp_path, capsys):
    code = cli_main(["generate", "a red circle", "--model", str(folder), "--cache-interval", "0", "--steps", "2",
                     "--height", "16", "--width", "16", "--no-progress", "-o", str(tmp_path / "x.png")])
    assert code == 2 and "cache_interval must be an int >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_batch_that_does_not_match_the_cached_feature_is_refused():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        cache = DeepCache(3)
        unet(x, 500, context, cache=cache)
        cache.step_done(0)
        with pytest.raises(ValueError, match=r"batch 2 at 8x8 .* batch 1 at 8x8"):
            unet(x[:1], 500, context[:1], cache=cache)
        cache.step_done(1)
        with pytest.raises(ValueError, match=r"batch 2 at 8x8 .* batch 2 at 16x16"):
            unet(torch.randn(2, 4, 16, 16), 500, context, cache=cache)
        cache.step_done(2)
        unet(x[:1], 500, context[:1], cache=cache)  # a full step makes the feature anew
        assert cache.feature.shape[0] == 1


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_recipe_records_the_interval_and_generate_from_replays_it(folder, tmp_path):
    common = ["--model", str(folder), "--seed", "4", "--steps", "4", "--height", "16", "--width", "16",
              "--sampler", "dpmpp_2m", "--dtype", "fp32", "--no-progress"]
    first, exact = tmp_path / "first.png", tmp_path / "exact.png"
    assert cli_main(["generate", "a red circle", *common, "--cache-interval", "2", "-o", str(first)]) == 0
    assert cli_main(["generate", "a red circle", *common, "-o", str(exact)]) == 0
    assert read_metadata(first)["cache_interval"] == 2
    assert "cache_interval" not in read_metadata(exact)
    assert not np.array_equal(pixels(first), pixels(exact))
    again = tmp_path / "again.png"
    assert cli_main(["generate", "--from", str(first), "--no-progress", "-o", str(again)]) == 0
    assert again.read_bytes() == first.read_bytes()
    undone = tmp_path / "undone.png"  # the flag overrides the recipe's value
    assert cli_main(["generate", "--from", str(first), "--cache-interval", "1", "--no-progress",
                     "-o", str(undone)]) == 0
    assert np.array_equal(pixels(undone), pixels(exact))


def test_img2img_and_inpaint_take_the_interval(pipe):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    args = dict(image=image, num_inference_steps=4, guidance_scale=4.0, seed=1, progress=False, output_type="np")
    for method, extra in (("img2img", {"strength": 0.9}), ("inpaint", {"mask_image": Image.fromarray(mask)})):
        log, _, remove = log_calls(pipe.unet)
        try:
            cached = getattr(pipe, method)("a red circle", cache_interval=2, **args, **extra)
        finally:
            remove()
        exact = getattr(pipe, method)("a red circle", **args, **extra)
        assert cached.recipes[0]["cache_interval"] == 2 and "cache_interval" not in exact.recipes[0]
        assert log.count("F") < log.count("C") and not np.array_equal(cached.images, exact.images)


@pytest.mark.parametrize("kind", ["sdxl", "lcm"])
def test_sdxl_vector_and_lcm_guidance_embedding_pipelines(kind, tmp_path):
    reference = tiny_sdxl_pipeline() if kind == "sdxl" else tiny_lcm_pipeline()
    ours = latentloom.load_pipeline(save_sd_folder(reference, tmp_path / kind), device="cpu", dtype=torch.float32)
    args = dict(sampler="lcm", guidance_scale=6.0) if kind == "lcm" else dict(sampler="euler")
    plain, _, _ = run_logged(ours, num_inference_steps=4, **args)
    cached, log, batches = run_logged(ours, num_inference_steps=4, cache_interval=2, **args)
    assert [set(s) for s in per_step(log)] == [{True}, {False}, {True}, {False}]
    assert batches["F"] == ({1} if kind == "lcm" else {2})  # LCM: guidance embedded, one batch
    diff = np.abs(cached.images - plain.images)
    assert np.isfinite(cached.images).all() and 0 < diff.max() and diff.mean() < 0.1


def test_eval_compares_cache_intervals_side_by_side(tmp_path, capsys):
    import json

    out = tmp_path / "eval.json"
    assert cli_main(["eval", "--captions", "1", "--images-per-caption", "1", "--steps", "3", "--guidance", "3",
                     "--clip-guidance", "0", "--cache-interval", "1", "2", "--json", str(out)]) == 0
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("attribute")][0]
    assert header.split() == ["attribute", "cfg", "3", "cfg", "3", "cache", "2"]
    assert set(json.loads(out.read_text())["settings"]) == {"cfg 3", "cfg 3 cache 2"}
    assert cli_main(["eval", "--cache-interval", "0"]) == 2
    assert "--cache-interval values must be ints >= 1" in capsys.readouterr().err


def test_bench_pipeline_composes_the_time_per_image_of_each_interval(tmp_path, capsys):
    import json
    import math

    path = tmp_path / "tables.json"
    assert cli_main(["bench", "pipeline", "--preset", "tiny", "--runs", "1", "--parts", "cache",
                     "--cache-interval", "2,4", "--json", str(path)]) == 0
    (table,) = json.loads(path.read_text())["tables"]
    assert [row[:3] for row in table["rows"]] == [[1, 30, 0], [2, 15, 15], [4, 8, 22]]
    assert all(math.isfinite(v) and v > 0 for row in table["rows"] for v in row[3:])
    assert table["rows"][0][5] == 1.0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # a usage error, found before any model is built
        cli_main(["bench", "pipeline", "--parts", "cache", "--cache-interval", "1,2"])
    assert exc.value.code == 2
    assert "--cache-interval must be a comma list of distinct ints >= 2, got '1,2'" in capsys.readouterr().err


def test_a_call_made_again_in_float32_stays_in_its_step():
    """UNetCall remakes a call that overflowed on a float32 copy: the feature is dropped (low precision)
    and the call counts in the same step, so the next step is still told apart."""
    cache = DeepCache(2, calls_per_step=2)
    assert cache.begin_call() and cache.step == 0
    cache.store(torch.zeros(1))
    cache.step_done(0)
    assert cache.begin_call() and cache.step == 0  # Heun's second call of step 0
    cache.forget(redo=True)
    assert cache.begin_call() and cache.step == 0 and cache.full_calls == 2
    cache.store(torch.zeros(1))
    assert not cache.begin_call() and cache.step == 1 and cache.cached_calls == 1
