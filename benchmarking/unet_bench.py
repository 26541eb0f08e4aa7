"""latentloom UNet vs diffusers UNet2DConditionModel: same random SD-sized weights, one process
(SDXL presets: one process per library and round, see `unet_bench_separate`).

The two models run in alternation (shared cores make absolute seconds noise; the ratio is
the result): median seconds per forward, the ratio latentloom/diffusers, the peak RSS growth
during a forward and the largest output difference, per dtype/layout mode; with --compile,
both models go through torch.compile (inductor; weights frozen into the graph on CPU). With
--token-merge-ratio, latentloom with token merging (ToMe) at each ratio joins the alternation, and a
second table gives its speed-up over latentloom exact and how far its output moved.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from latentloom.benchmarking.measure import Table, alternate, max_rss_bytes, median

MODES = {  # name -> (dtype name, channels_last)
    "fp32": ("float32", False),
    "fp32-cl": ("float32", True),
    "bf16": ("bfloat16", False),
    "bf16-cl": ("bfloat16", True),
    "fp16": ("float16", False),
    "fp16-cl": ("float16", True),
}
PRESETS = ("sd15", "sd2", "tiny", "sdxl", "sdxl-tiny")
SEPARATE = ("sdxl", "sdxl-tiny")  # too big for two models in one process: unet_bench_separate
BACKENDS = ("sdpa", "xformers", "chunked", "math")  # latentloom.unet.attention.BACKENDS (no torch import here)
DEFAULT_RUNS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=64, help="latent height = width (64: a 512x512 image)")
    parser.add_argument("--batch", type=int, default=2, help="2 = one classifier-free-guidance step")
    parser.add_argument("--modes", default="fp32,bf16-cl", help=f"comma list of {list(MODES)}")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both UNets (inductor; options freezing=True on CPU)")
    parser.add_argument("--backend", default="sdpa", help="latentloom attention backend")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--profile", action="store_true", help="print both models' top ops (torch.profiler)")
    parser.add_argument("--roofline", action="store_true",
                        help="time, GFLOP and achieved/peak throughput per op kind (matmul, conv, attention, "
                             "norm, ...) for both models, against this CPU's measured GEMM, conv and copy peaks")
    parser.add_argument("--token-merge-ratio", default=None, metavar="R,R,...",
                        help="also time latentloom with token merging at these ratios in (0, 1), e.g. 0.3,0.5")
    parser.add_argument("--weights-dir", default=None,
                        help="SDXL presets: where the random SDXL folder is written once (default ~/.cache/latentloom/bench)")


def parse_modes(text: Any) -> list[str]:
    modes = [m.strip() for m in str(text).split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise ValueError(f"--modes must be a comma list of {list(MODES)}, got {text!r}")
    return modes


def parse_ratios(text: Any) -> list[float]:
    """--token-merge-ratio: a comma list of distinct ratios in (0, 1); None -> []."""
    if text is None:
        return []
    try:
        ratios = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        ratios = []
    if not ratios or len(set(ratios)) != len(ratios) or not all(0.0 < r < 1.0 for r in ratios):
        raise ValueError(f"--token-merge-ratio must be a comma list of distinct ratios in (0, 1), e.g. 0.3,0.5; "
                         f"got {text!r}")
    return ratios


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad values before minutes of model building (ValueError names value and choices)."""
    if (args.preset or "sd15") not in PRESETS:
        raise ValueError(f"--preset for the UNet benchmark must be one of {list(PRESETS)}, got {args.preset!r}")
    parse_modes(args.modes)
    ratios = parse_ratios(getattr(args, "token_merge_ratio", None))
    if ratios and (args.roofline or args.preset in SEPARATE):
        raise ValueError("--token-merge-ratio times latentloom beside diffusers in one process: it does not go "
                         "with --roofline or the SDXL presets")
    for name, low in (("size", 8), ("batch", 1)):
        value = getattr(args, name)
        if value < low or (name == "size" and value % 8):
            raise ValueError(f"--{name} must be {'a multiple of 8 and ' if name == 'size' else ''}>= {low}, got {value}")
    runs = DEFAULT_RUNS if args.runs is None else args.runs
    if runs < 1:
        raise ValueError(f"--runs must be >= 1, got {runs}")
    if args.backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {list(BACKENDS)}, got {args.backend!r}")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.preset in SEPARATE and (args.compile or args.profile or args.device != "cpu"):
        raise ValueError(f"--preset {args.preset} runs each library in its own process on the CPU: "
                         "--compile, --profile and --device are not supported with it")
    bad = [name for name, on in (("--compile", args.compile), ("--profile", args.profile),
                                 (f"--device {args.device}", args.device != "cpu"),
                                 (f"--preset {args.preset}", args.preset in SEPARATE)) if on]
    if args.roofline and bad:
        together = [p for p in PRESETS if p not in SEPARATE]
        raise ValueError(f"--roofline profiles eager aten ops on the CPU in one process: {', '.join(bad)} is not "
                         f"accepted with it (it takes --device cpu and --preset {'/'.join(together)})")


def build_models(preset: str, backend: str):
    """(diffusers UNet2DConditionModel, latentloom UNet with the same weights, config), fp32, eval."""
    from latentloom.benchmarking import sd_random
    from latentloom.unet import UNet, UNetConfig

    if preset == "sd2":
        import torch
        from diffusers import UNet2DConditionModel

        cfg = UNetConfig.sd2()
        torch.manual_seed(0)
        ref = UNet2DConditionModel(**cfg.to_diffusers_config()).eval()
    else:
        cfg = sd_random.unet_config(preset)
        ref = sd_random.diffusers_unet(preset, seed=0)
    ours = UNet.from_diffusers(ref).eval()
    ours.set_attention_backend(backend)
    return ref, ours, cfg


def run(args: argparse.Namespace) -> list[Table]:
    import torch

    from latentloom.benchmarking.sd_random import quiet_libraries

    check_args(args)
    if args.preset in SEPARATE:
        from latentloom.benchmarking import unet_bench_separate

        modes = sorted(parse_modes(args.modes), key=lambda m: MODES[m][0] != "float32")
        return unet_bench_separate.run(args, {m: MODES[m] for m in modes})
    quiet_libraries()
    preset, runs = args.preset or "sd15", DEFAULT_RUNS if args.runs is None else args.runs
    # fp32 modes first: later modes cast the same modules in place, and a cast back up to
    # fp32 would keep the bf16-rounded weights.
    modes = sorted(parse_modes(args.modes), key=lambda m: MODES[m][0] != "float32")
    device = torch.device(args.device)
    t0 = time.perf_counter()
    ref, ours, cfg = build_models(preset, args.backend)
    ref.to(device)
    ours.to(device)
    n_params = sum(p.numel() for p in ours.parameters())
    built = time.perf_counter() - t0

    g = torch.Generator().manual_seed(1)
    x32 = torch.randn(args.batch, cfg.in_channels, args.size, args.size, generator=g)  # (B, C, h, w)
    c32 = torch.randn(args.batch, 77, cfg.context_dim, generator=g)  # (B, 77, D)
    t = torch.full((args.batch,), 500.0, device=device)
    if args.roofline:
        from latentloom.benchmarking import unet_roofline

        return unet_roofline.run(args, ref, ours, cfg, x32, c32, t, {m: MODES[m] for m in modes}, runs)

    ratios = parse_ratios(getattr(args, "token_merge_ratio", None))
    tome = None
    if ratios:
        tome = Table(title="Token merging (ToMe, attn1 at the top level), same forwards as above",
                     header=["mode", "ratio", "latentloom s", "ToMe s", "speed-up", "paired speed-up",
                             "cpu speed-up", "rel. change"])
    extra = ["diffusers first call s", "latentloom first call s"] if args.compile else []
    table = Table(
        title=(f"UNet forward, {preset} ({n_params / 1e6:.1f} M params), latents {args.batch}x{cfg.in_channels}x"
               f"{args.size}x{args.size}, context 77x{cfg.context_dim}, {device.type}, {torch.get_num_threads()} "
               f"thread(s), {'torch.compile (inductor' + (', freezing)' if device.type == 'cpu' else ')') if args.compile else 'eager'}"),
        header=["mode", "diffusers s", "latentloom s", "ratio", "paired ratio", "cpu ratio",
                "dRSS diffusers GB", "dRSS latentloom GB", "max rel. diff", *extra],
    )
    for mode in modes:
        dtype_name, channels_last = MODES[mode]
        dtype = getattr(torch, dtype_name)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if args.compile:
            torch._dynamo.reset()  # compiled graphs hold the previous mode's frozen weights
        for model in (ref, ours):
            model.to(dtype=dtype, memory_format=fmt)
            if args.compile:
                model.compile(options={"freezing": True} if device.type == "cpu" else None)
        x = x32.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        c = c32.to(device=device, dtype=dtype)
        fns = {"diffusers": lambda: ref(x, t, c).sample, "latentloom": lambda: ours(x, t, c)}
        for r in ratios:
            fns[f"tome {r:g}"] = lambda r=r: ours(x, t, c, token_merge_ratio=r)
        # no_grad rather than inference_mode: inductor's freezing needs it, and eager runs the same way
        with torch.no_grad():
            first: dict[str, float] = {}
            outs: dict[str, Any] = {}
            for name, fn in fns.items():  # warm-up: oneDNN primitives, or the compilation
                t1 = time.perf_counter()
                outs[name] = fn().float()
                _sync(device)
                first[name] = time.perf_counter() - t1
            samples = alternate({k: _synced(f, device) for k, f in fns.items()}, runs=runs, warmup=0,
                                rss=device.type == "cpu")
            if args.profile:
                _profile(fns, mode)
        wall = {k: median(v) for k, v in samples.wall.items()}
        cpu = {k: median(v) for k, v in samples.cpu.items()}
        peak = {k: max(v) / 1e9 if v else None for k, v in samples.rss_growth.items()}
        diff = (outs["latentloom"] - outs["diffusers"]).abs().max().item()
        scale = outs["diffusers"].abs().max().item()
        row = [mode, wall["diffusers"], wall["latentloom"], wall["latentloom"] / wall["diffusers"],
               samples.paired_ratio("latentloom", "diffusers"), cpu["latentloom"] / cpu["diffusers"],
               peak["diffusers"], peak["latentloom"], diff / scale]
        table.add_row(row + ([first["diffusers"], first["latentloom"]] if args.compile else []))
        print(f"  {mode}: " + ", ".join(f"{k} {[round(v, 3) for v in samples.wall[k]]} s" for k in fns), flush=True)
        exact = outs["latentloom"]
        for r in ratios:
            k = f"tome {r:g}"
            change = ((outs[k] - exact).norm() / exact.norm()).item()
            tome.add_row([mode, r, wall["latentloom"], wall[k], wall["latentloom"] / wall[k],
                          1 / samples.paired_ratio(k, "latentloom"), cpu["latentloom"] / cpu[k], change])
    table.notes += [
        f"{runs} timed forwards per model and mode after one warm-up, alternated; models built in {built:.0f} s",
        "s = median wall seconds per forward; ratio = median latentloom / median diffusers; paired ratio = median "
        "of per-run ratios; cpu ratio = ratio of median process CPU seconds (robust to other jobs on shared cores)",
        "dRSS = peak RSS growth during one forward; max rel. diff = largest output difference over the largest "
        "diffusers output",
        f"process peak RSS {max_rss_bytes() / 1e9:.1f} GB",
    ]
    if args.compile:
        table.notes.append("first call = the warm-up forward, which compiles")
    if tome is not None:
        tome.notes += ["speed-up = median latentloom exact / median ToMe (merge and unmerge included); paired = "
                       "median of per-run ratios; rel. change = ||ToMe - exact|| / ||exact|| of the output"]
        return [table, tome]
    return [table]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _synced(fn, device):
    def call() -> None:  # the output is dropped: only the time is kept
        fn()
        _sync(device)

    return call


def _profile(fns, mode: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"--- {mode} {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
