"""`latentloom eval`: prompt following of a model on the synthetic shapes domain.

Generates several images for each held-out caption (color/shape/position triples never
seen in training) and scores color, shape, size, position and background with the
procedural checker. Each setting (guidance scale, CLIP guidance scale, step-cache interval, token
merge ratio) is one column of the printed table, so guidance 1 vs the model's default, CLIP guidance
on vs off, step caching and token merging on vs off are read side by side.

No torch import at module level: `latentloom --help` must stay fast.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

# CLIP guidance scale measured when the model's defaults name none: on the bundled model,
# 1000 raised color accuracy the most of 300 / 1000 / 3000 / 5000 (weights/README.md).
DEFAULT_CLIP_GUIDANCE = 1000.0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="measure prompt following on held-out synthetic captions",
        description="Prompt-following accuracy (color / shape / size / position / background) on captions "
                    "of the synthetic shapes domain held out of training, for several guidance settings.",
    )
    parser.add_argument("--model", default=None, help="a latentloom model folder (default: the bundled model)")
    parser.add_argument("--captions", type=int, default=40, help="held-out captions (default: 40)")
    parser.add_argument("--images-per-caption", type=int, default=4, help="images per caption (default: 4)")
    parser.add_argument("--split", default="heldout", help="caption split: heldout or train (default: heldout)")
    parser.add_argument("--caption-seed", type=int, default=1, help="seed of the caption list (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="image seeds start here (default: 0)")
    parser.add_argument("--guidance", type=float, nargs="+", default=None, metavar="SCALE",
                        help="classifier-free guidance scales to compare (default: 1 and the model's default)")
    parser.add_argument("--clip-guidance", type=float, nargs="+", default=None, metavar="SCALE",
                        help="CLIP guidance scales to compare (default: 0, and 1000 when the model has an "
                             "image-text model)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--sampler", default=None, help="sampler name (default: the model's)")
    parser.add_argument("--cache-interval", type=int, nargs="+", default=None, metavar="N",
                        help="step-caching intervals to compare (DeepCache: the whole UNet every N steps; "
                             "default: 1, no caching)")
    parser.add_argument("--token-merge-ratio", type=float, nargs="+", default=None, metavar="R",
                        help="token merge ratios to compare (ToMe: self-attention at the highest resolution on "
                             "(1 - R) of the tokens; default: 0, exact)")
    parser.add_argument("--batch-size", type=int, default=8, help="captions per pipeline call (default: 8)")
    parser.add_argument("--control", default=None, metavar="CONTROLNET",
                        help="measure this ControlNet (folder, .safetensors, or bundled:controlnet) instead: held-out scenes generated "
                             "with their control maps; mask IoU of the shape with the map (large and small shapes), "
                             "the attributes, and position when the prompt names another one (the map should win)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the full results as JSON")
    parser.set_defaults(func=run)


def settings_grid(*, guidance: list[float], clip_guidance: list[float]) -> list[tuple[float, float]]:
    """Every (guidance_scale, clip_guidance_scale) pair, in the order given."""
    return [(g, c) for c in clip_guidance for g in guidance]


def format_comparison(results: dict[str, dict[str, Any]]) -> str:
    """One row per attribute, one column per setting, accuracies in percent."""
    names = list(results)
    attributes: list[str] = []
    for res in results.values():
        attributes += [a for a in res["accuracy"] if a not in attributes]
    width = max(14, *(len(n) + 2 for n in names))
    lines = [f"{'attribute':<12}" + "".join(f"{n:>{width}}" for n in names)]
    for attr in attributes + ["all"]:
        cells = []
        for n in names:
            res = results[n]
            value = res["all_correct"] if attr == "all" else res["accuracy"].get(attr)
            cells.append(f"{'-':>{width}}" if value is None else f"{100 * value:>{width - 1}.1f}%")
        lines.append(f"{attr:<12}" + "".join(cells))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from latentloom.pipelines.cli_common import fail

    for name in ("captions", "images_per_caption", "batch_size"):
        if getattr(args, name) < 1:
            return fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.split not in ("heldout", "train"):
        return fail(f"--split must be 'heldout' or 'train', got {args.split!r}")
    for name in ("guidance", "clip_guidance"):
        values = getattr(args, name) or []
        if any(v < 0 for v in values):
            return fail(f"--{name.replace('_', '-')} scales must be >= 0, got {values}")
    intervals = args.cache_interval or [1]
    if any(n < 1 for n in intervals):
        return fail(f"--cache-interval values must be ints >= 1 (1: no caching), got {intervals}")
    ratios = args.token_merge_ratio or [0.0]
    if any(not 0.0 <= r < 1.0 for r in ratios):  # also refuses nan
        return fail(f"--token-merge-ratio values must be in [0, 1) (0: no merging), got {ratios}")

    if args.control is not None:
        if args.clip_guidance or args.cache_interval or args.token_merge_ratio:
            return fail("--control measures a ControlNet alone: leave out --clip-guidance, --cache-interval and "
                        "--token-merge-ratio")
        return run_control(args)

    from latentloom.evaluation.prompt_following import domain_prompts, evaluate
    from latentloom.pipelines.loading import load_pipeline

    try:
        pipe = load_pipeline(args.model)
    except (ValueError, TypeError, FileNotFoundError) as err:
        return fail(str(err))
    default_clip = float(getattr(pipe.defaults, "clip_guidance_scale", 0.0) or 0.0) or DEFAULT_CLIP_GUIDANCE
    guidance = args.guidance or sorted({1.0, float(pipe.defaults.guidance_scale)})
    if args.clip_guidance is not None:
        clip_guidance = args.clip_guidance
    else:
        clip_guidance = [0.0, default_clip] if getattr(pipe, "clip_model", None) is not None else [0.0]
    if any(c > 0 for c in clip_guidance) and getattr(pipe, "clip_model", None) is None:
        return fail(f"{pipe.name} has no image-text model, so CLIP guidance {clip_guidance} cannot be measured")

    prompts = domain_prompts(args.captions, seed=args.caption_seed, split=args.split)
    results: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    grid = [(g, c, n, r) for r in ratios for n in intervals
            for g, c in settings_grid(guidance=guidance, clip_guidance=clip_guidance)]
    for g, c, n, r in grid:
        name = (f"cfg {g:g}" + (f" clip {c:g}" if c > 0 else "") + (f" cache {n}" if n > 1 else "")
                + (f" tome {r:g}" if r > 0 else ""))
        calls = {"n": 0}

        def generate(captions: list[str], k: int, *, g: float = g, c: float = c, n: int = n,
                     r: float = r) -> list:
            # Seeds differ per call so no two captions share noise; fixed per setting so settings compare.
            seed = args.seed + 1000 * calls["n"]
            calls["n"] += 1
            out = pipe(captions, num_images_per_prompt=k, guidance_scale=g, clip_guidance_scale=c, seed=seed,
                       num_inference_steps=args.steps, sampler=args.sampler, progress=False, cache_interval=n,
                       token_merge_ratio=r)
            return out.images

        start = time.perf_counter()
        try:
            results[name] = evaluate(generate, prompts, images_per_caption=args.images_per_caption,
                                     batch_size=args.batch_size)
        except (ValueError, TypeError) as err:
            return fail(str(err))
        timings[name] = time.perf_counter() - start
        print(f"{name}: {results[name]['num_images']} images in {timings[name]:.0f} s", file=sys.stderr)

    print(f"model: {pipe.name}; {len(prompts)} {args.split} captions x {args.images_per_caption} images; "
          f"steps: {args.steps or pipe.defaults.num_inference_steps}; sampler: {args.sampler or pipe.defaults.sampler}")
    print(format_comparison(results))
    if args.json:
        from pathlib import Path

        summary = {name: {k: v for k, v in res.items() if k != "table"} for name, res in results.items()}
        Path(args.json).write_text(json.dumps({"settings": summary, "seconds": timings}, indent=2) + "\n")
    return 0


def run_control(args: argparse.Namespace) -> int:
    """`latentloom eval --control CONTROLNET`: per guidance scale, three columns: no map (the model alone,
    the baseline), the map with the scene's own caption, the map with a caption naming another position."""
    from latentloom.evaluation.control_following import control_cases, evaluate_control, format_control_table
    from latentloom.pipelines.cli_common import fail
    from latentloom.pipelines.loading import load_pipeline

    try:
        pipe = load_pipeline(args.model, controlnet=args.control)
    except (ValueError, TypeError, FileNotFoundError) as err:
        return fail(str(err))
    size = int(pipe.defaults.height or 64)
    cases = control_cases(args.captions, seed=args.caption_seed, split=args.split, size=size)
    # more images per scene: the scene list again, with other seeds (generate's seed moves every call)
    cases = cases * args.images_per_caption
    guidance = args.guidance or [float(pipe.defaults.guidance_scale)]
    results: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    # per guidance: the model alone (ControlNet scale 0: what the prompt gets without the map), the map
    # with the scene's own caption, and the map with a caption naming another position
    for g in guidance:
        for column, scale, conflicting in (("no map", 0.0, False), ("", 1.0, False), ("conflict", 1.0, True)):
            name = f"cfg {g:g}" + (f" {column}" if column else "")
            calls = {"n": 0}

            def generate(captions: list[str], maps: list, *, g: float = g, scale: float = scale) -> list:
                seed = args.seed + 1000 * calls["n"]  # the same seeds in every column
                calls["n"] += 1
                out = pipe(captions, control_image=maps, controlnet_conditioning_scale=scale, guidance_scale=g,
                           seed=seed, height=size, width=size, num_inference_steps=args.steps, sampler=args.sampler,
                           progress=False)
                return out.images

            start = time.perf_counter()
            try:
                results[name] = evaluate_control(generate, cases, conflicting=conflicting,
                                                 batch_size=args.batch_size)
            except (ValueError, TypeError) as err:
                return fail(str(err))
            timings[name] = time.perf_counter() - start
            print(f"{name}: {results[name]['num_images']} images in {timings[name]:.0f} s", file=sys.stderr)
    steps = args.steps or pipe.defaults.num_inference_steps
    print(f"model: {pipe.name}; controlnet: {args.control}; {len(cases) // args.images_per_caption} {args.split} "
          f"one-shape scenes x {args.images_per_caption} images; steps: {steps}; "
          f"sampler: {args.sampler or pipe.defaults.sampler}")
    print(format_control_table(results))
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps({"settings": results, "seconds": timings}, indent=2) + "\n")
    return 0
