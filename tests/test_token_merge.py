"""Token merging (ToMe for SD, `token_merge_ratio=r`): the bipartite matching and its merge / unmerge,
exact when off, only the top level's self-attention merged, deterministic, composing with step caching,
checked arguments, and recipes that `generate --from` replays."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

from latentloom.cli import main as cli_main
from latentloom.pipelines.metadata import read_metadata
from latentloom.unet import DeepCache, UNet, UNetConfig
from latentloom.unet.token_merge import (
    TokenMerge, bipartite_soft_matching, check_token_merge_ratio, dst_positions,
)
from latentloom.unet.transformer import SpatialTransformer

ARGS = dict(height=16, width=16, guidance_scale=5.0, progress=False, output_type="np")


def matching(x, h, w, ratio, seed=0):
    return TokenMerge(ratio, seed).match(x, height=h, width=w)


# ---------------------------------------------------------------- the matching


@pytest.mark.parametrize("h, w", [(8, 8), (7, 9), (6, 5), (2, 2)])
def test_one_dst_in_every_2x2_window_and_none_outside(h, w):
    dst = dst_positions(h, w, torch.Generator().manual_seed(3))
    grid = torch.zeros(h * w, dtype=torch.long)
    grid[dst] += 1
    grid = grid.view(h, w)
    hs, ws = h // 2, w // 2
    windows = grid[:2 * hs, :2 * ws].reshape(hs, 2, ws, 2).sum(dim=(1, 3))
    assert (windows == 1).all() and grid.sum() == hs * ws  # odd sizes: the last row / column holds none


@pytest.mark.parametrize("h, w", [(8, 8), (7, 9), (5, 6), (1, 6)])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.75, 0.9])
def test_merged_count_is_ratio_times_tokens_capped_at_the_sources(h, w, ratio):
    x = torch.randn(2, h * w, 8, generator=torch.Generator().manual_seed(0))
    m = matching(x, h, w, ratio)
    n_src = h * w - (h // 2) * (w // 2)
    r = min(int(ratio * h * w), n_src) if (h // 2) * (w // 2) else 0  # no 2x2 window: nothing merges
    assert m.r == r and m.merge(x).shape == (2, h * w - r, 8) and m.unmerge(m.merge(x)).shape == x.shape
    if ratio <= 0.75 and h > 1:
        assert m.r == int(ratio * h * w)


def reference_matching(x, dst, r):
    """Brute force, one image: each src's most similar dst (cosine), the r most similar src merged."""
    n = x.shape[0]
    src = [p for p in range(n) if p not in set(dst.tolist())]
    unit = x / x.norm(dim=-1, keepdim=True)
    best = {}
    for p in src:
        sims = [(float(unit[p] @ unit[q]), q) for q in dst.tolist()]
        best[p] = max(sims)  # (similarity, dst)
    ranked = sorted(src, key=lambda p: -best[p][0])
    return {p: best[p][1] for p in ranked[:r]}  # merged src -> its dst


def test_matching_merges_the_most_similar_sources_into_their_best_destination():
    h, w, ratio = 6, 7, 0.4
    x = torch.randn(2, h * w, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = matching(x, h, w, ratio, seed=5)
    dst = dst_positions(h, w, torch.Generator().manual_seed(5))
    for b in range(2):
        expected = reference_matching(x[b], dst, int(ratio * h * w))
        moved = m.moved[b].tolist()
        into = m.keep[b][m.into[b]].tolist()  # the position of the dst each merged src joined
        assert dict(zip(moved, into)) == expected


def test_merge_then_unmerge_keeps_lone_tokens_and_averages_each_group():
    h, w = 8, 9
    x = torch.randn(3, h * w, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    m = matching(x, h, w, 0.5)
    merged = m.merge(x)
    back = m.unmerge(merged)  # an attention that returns its input unchanged
    for b in range(3):
        groups = {}  # dst position -> the positions averaged into it (itself included)
        for p, q in zip(m.moved[b].tolist(), m.keep[b][m.into[b]].tolist()):
            groups.setdefault(q, [q]).append(p)
        members = {p for g in groups.values() for p in g}
        for q, group in groups.items():
            mean = x[b, group].mean(dim=0)
            for p in group:  # the dst and every src merged into it come back as the group's mean
                torch.testing.assert_close(back[b, p], mean, rtol=0, atol=1e-12)
        lone = [p for p in range(h * w) if p not in members]  # unmerged src and dst nothing joined
        assert len(lone) == h * w - m.r - len(groups)
        assert torch.equal(back[b, lone], x[b, lone])
    # the merged sequence: the unmerged src as they were, then every dst (as its group's mean)
    n_unm = h * w - (h // 2) * (w // 2) - m.r
    assert torch.equal(merged[:, :n_unm], x.gather(1, m.keep[:, :n_unm, None].expand(-1, -1, 4)))


def test_the_dst_draw_is_deterministic_for_a_seed_and_changes_with_it():
    x = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0))
    a, b, c = matching(x, 8, 8, 0.5, seed=7), matching(x, 8, 8, 0.5, seed=7), matching(x, 8, 8, 0.5, seed=8)
    assert torch.equal(a.back, b.back) and torch.equal(a.moved, b.moved)
    assert not torch.equal(a.back, c.back)
    merge = TokenMerge(0.5, 7)
    assert merge.child(0) == TokenMerge(0.5, 7).child(0) and merge.child(0).seed != merge.child(1).seed


def test_zero_ratio_and_tiny_grids_are_the_identity():
    x = torch.randn(1, 12, 4)
    for m in (matching(x, 3, 4, 0.0), matching(x, 1, 12, 0.5), matching(x[:, :1], 1, 1, 0.5)):
        assert m.r == 0 and m.merge(x) is x and m.unmerge(x) is x
    with pytest.raises(ValueError, match=r"H\*W = 3\*5 = 15 tokens, got 12"):
        bipartite_soft_matching(x, height=3, width=5, r=2, generator=torch.Generator())


BAD = [(-0.1, ValueError), (1.0, ValueError), (1.5, ValueError), (float("nan"), ValueError),
       (True, TypeError), ("0.5", TypeError)]


@pytest.mark.parametrize("value, error", BAD)
def test_bad_ratios_are_refused_naming_the_value(value, error):
    with pytest.raises(error, match=r"token_merge_ratio must be a number in \[0, 1\).*got .*"
                                    + re.escape(str(value))):
        check_token_merge_ratio(value)
    unet = UNet(UNetConfig.tiny()).eval()
    with pytest.raises(error, match=re.escape(str(value))):
        unet(torch.randn(1, 4, 8, 8), 500, torch.randn(1, 5, 32), token_merge_ratio=value)


# ---------------------------------------------------------------- the UNet


CONFIGS = {
    # SD's first level: two ResBlocks with transformers (two blocks each)
    "sd-like": dict(channels=[16, 32, 32], layers_per_level=2, attention_levels=[True, True, False],
                    transformer_depth=[2, 1, 1]),
    # SDXL's: no transformer at the first level; the next one, which is also the middle block's resolution
    "sdxl-like": dict(channels=[16, 32], layers_per_level=[1, 2], attention_levels=[False, True]),
}


def tiny_unet(name):
    torch.manual_seed(0)
    return UNet(UNetConfig(num_heads=2, context_dim=32, norm_groups=8, **CONFIGS[name])).eval()


def spy_tokens(unet):
    """Hooks that log (transformer name, attn1 or attn2, tokens in, tokens of the grid)."""
    log, handles = [], []
    names = {id(m): n for n, m in unet.named_modules()}
    for module in unet.modules():
        if isinstance(module, SpatialTransformer):
            for block in module.transformer_blocks:
                for kind in ("attn1", "attn2"):
                    def pre(mod, inputs, kind=kind, owner=module):
                        log.append((names[id(owner)], kind, inputs[0].shape[1], owner.grid))
                    handles.append(getattr(block, kind).register_forward_pre_hook(pre))

            def grid(mod, inputs):
                mod.grid = inputs[0].shape[2] * inputs[0].shape[3]
            handles.append(module.register_forward_pre_hook(grid))
    return log, lambda: [h.remove() for h in handles]


@pytest.mark.parametrize("name, level", [("sd-like", 0), ("sdxl-like", 1)])
def test_only_self_attention_at_the_top_attention_level_is_merged(name, level):
    unet = tiny_unet(name)
    assert unet.merge_level == level
    x, context = torch.randn(2, 4, 12, 10), torch.randn(2, 5, 32)
    log, remove = spy_tokens(unet)
    with torch.no_grad():
        unet(x, 500, context, token_merge_ratio=0.5)
    remove()
    top = 12 * 10 // 2 ** (2 * level)  # tokens at the merge level
    merged = [(n, k) for n, k, tokens, grid in log if tokens != grid]
    assert merged and all(k == "attn1" for _, k in merged)
    for n, kind, tokens, grid in log:
        if kind == "attn1" and grid == top:
            assert tokens == top - int(0.5 * top), n
        else:
            assert tokens == grid, n  # cross-attention and the lower levels see every token
    # the middle block shares the merge level's resolution only in the SDXL-like UNet
    assert any(n.startswith("mid_block") for n, _ in merged) == (name == "sdxl-like")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_ratio_is_exact_and_merging_is_deterministic_and_changes_little(dtype):
    unet = tiny_unet("sd-like").to(dtype)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 9, 11, generator=g), torch.randn(2, 5, 32, generator=g)  # odd sizes
    with torch.no_grad():
        plain = unet(x, 321, context)
        for off in (0, 0.0, None):
            assert torch.equal(unet(x, 321, context, token_merge_ratio=off), plain)
        merged = unet(x, 321, context, token_merge_ratio=0.5)
        assert torch.equal(unet(x, 321, context, token_merge_ratio=0.5), merged)
        other_step = unet(x, 322, context, token_merge_ratio=0.5) - unet(x, 322, context)
    change = ((merged.float() - plain.float()).norm() / plain.float().norm()).item()
    assert 0 < change < 0.3 and torch.isfinite(merged).all() and merged.dtype == x.dtype
    assert other_step.abs().max() > 0


def test_a_batch_merges_each_image_as_alone():
    unet = tiny_unet("sd-like")
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 32, generator=g)
    with torch.no_grad():
        batch = unet(x, 400, context, token_merge_ratio=0.4)
        for i in range(3):
            alone = unet(x[i:i + 1], 400, context[i:i + 1], token_merge_ratio=0.4)
            torch.testing.assert_close(batch[i:i + 1], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_cache_and_merging_compose(name):
    """A cached call with merging equals the full call with merging when the deep features did not
    change: the shallow branch's top-level transformers merge as the full call's do."""
    unet = tiny_unet(name)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 12, 16, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        cache = DeepCache(3)
        full = unet(x, 321, context, cache=cache, token_merge_ratio=0.5)
        cache.step_done(0)
        cached = unet(x, 321, context, cache=cache, token_merge_ratio=0.5)
        plain = unet(x, 321, context, token_merge_ratio=0.5)
        exact = unet(x, 321, context)
    assert cache.full_calls == 1 and cache.cached_calls == 1
    assert torch.equal(full, plain)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-6)
    assert (full - exact).abs().max() > 1e-4


# ---------------------------------------------------------------- pipelines and the CLI


def test_pipeline_ratio_zero_is_exact_and_recipes_record_a_ratio(pipe):
    plain = pipe("a red circle", seed=3, num_inference_steps=4, **ARGS)
    for off in (None, 0, 0.0):
        same = pipe("a red circle", seed=3, num_inference_steps=4, token_merge_ratio=off, **ARGS)
        assert np.array_equal(plain.images, same.images) and plain.recipes == same.recipes
    assert "token_merge_ratio" not in plain.recipes[0]
    merged = pipe("a red circle", seed=3, num_inference_steps=4, token_merge_ratio=0.5, **ARGS)
    again = pipe("a red circle", seed=3, num_inference_steps=4, token_merge_ratio=0.5, **ARGS)
    assert np.array_equal(merged.images, again.images)  # deterministic for a seed
    diff = np.abs(merged.images - plain.images)
    assert 0 < diff.max() and diff.mean() < 0.1
    assert merged.recipes[0]["token_merge_ratio"] == 0.5


def test_pipeline_batch_equals_alone_with_merging(pipe):
    batch = pipe(["a red circle", "a green star"], seed=40, num_inference_steps=3, token_merge_ratio=0.5,
                 **ARGS).images
    alone = pipe("a green star", seed=41, num_inference_steps=3, token_merge_ratio=0.5, **ARGS).images[0]
    np.testing.assert_allclose(batch[1], alone, rtol=0, atol=1e-4)


@pytest.mark.parametrize("value, error", BAD)
def test_pipeline_refuses_bad_ratios_naming_the_value(pipe, value, error):
    with pytest.raises(error, match=re.escape(str(value))):
        pipe("a red circle", seed=0, num_inference_steps=2, token_merge_ratio=value, **ARGS)


def test_merging_with_step_caching_in_a_pipeline(pipe):
    common = dict(seed=3, num_inference_steps=5, sampler="euler", **ARGS)
    cached = pipe("a red circle", cache_interval=2, **common)
    both = pipe("a red circle", cache_interval=2, token_merge_ratio=0.5, **common)
    merged = pipe("a red circle", token_merge_ratio=0.5, **common)
    assert np.isfinite(both.images).all()
    assert not np.array_equal(both.images, cached.images) and not np.array_equal(both.images, merged.images)
    assert both.recipes[0]["cache_interval"] == 2 and both.recipes[0]["token_merge_ratio"] == 0.5


def test_img2img_and_inpaint_take_the_ratio(pipe):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    args = dict(image=image, num_inference_steps=3, guidance_scale=4.0, seed=1, progress=False, output_type="np")
    for method, extra in (("img2img", {"strength": 0.9}), ("inpaint", {"mask_image": Image.fromarray(mask)})):
        merged = getattr(pipe, method)("a red circle", token_merge_ratio=0.5, **args, **extra)
        exact = getattr(pipe, method)("a red circle", **args, **extra)
        assert merged.recipes[0]["token_merge_ratio"] == 0.5 and "token_merge_ratio" not in exact.recipes[0]
        assert not np.array_equal(merged.images, exact.images)


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_recipe_records_the_ratio_and_generate_from_replays_it(folder, tmp_path):
    common = ["--model", str(folder), "--seed", "4", "--steps", "3", "--height", "16", "--width", "16",
              "--dtype", "fp32", "--no-progress"]
    first, exact = tmp_path / "first.png", tmp_path / "exact.png"
    assert cli_main(["generate", "a red circle", *common, "--token-merge-ratio", "0.5", "-o", str(first)]) == 0
    assert cli_main(["generate", "a red circle", *common, "-o", str(exact)]) == 0
    assert read_metadata(first)["token_merge_ratio"] == 0.5
    assert "token_merge_ratio" not in read_metadata(exact)
    assert not np.array_equal(pixels(first), pixels(exact))
    again = tmp_path / "again.png"
    assert cli_main(["generate", "--from", str(first), "--no-progress", "-o", str(again)]) == 0
    assert again.read_bytes() == first.read_bytes()
    undone = tmp_path / "undone.png"  # the flag overrides the recipe's value
    assert cli_main(["generate", "--from", str(first), "--token-merge-ratio", "0", "--no-progress",
                     "-o", str(undone)]) == 0
    assert np.array_equal(pixels(undone), pixels(exact))


def test_cli_refuses_a_bad_ratio(folder, tmp_path, capsys):
    code = cli_main(["generate", "a red circle", "--model", str(folder), "--token-merge-ratio", "1", "--steps", "2",
                     "--height", "16", "--width", "16", "--no-progress", "-o", str(tmp_path / "x.png")])
    assert code == 2 and "token_merge_ratio must be a number in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_eval_compares_token_merge_ratios_side_by_side(tmp_path, capsys):
    import json

    out = tmp_path / "eval.json"
    assert cli_main(["eval", "--captions", "1", "--images-per-caption", "1", "--steps", "2", "--guidance", "3",
                     "--clip-guidance", "0", "--token-merge-ratio", "0", "0.5", "--json", str(out)]) == 0
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("attribute")][0]
    assert header.split() == ["attribute", "cfg", "3", "cfg", "3", "tome", "0.5"]
    assert set(json.loads(out.read_text())["settings"]) == {"cfg 3", "cfg 3 tome 0.5"}
    assert cli_main(["eval", "--token-merge-ratio", "1"]) == 2
    assert "--token-merge-ratio values must be in [0, 1)" in capsys.readouterr().err
