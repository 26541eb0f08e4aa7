"""UNet forward, latentloom against diffusers, each library in its own fresh process (SDXL: two
SDXL UNets do not fit one 24 GiB process in fp32).

Both load the UNet of one random SDXL folder written once (`sdxl_random`). Per mode, the two
libraries' processes take turns (diffusers, latentloom, latentloom, diffusers, ...; `--runs`
rounds); each process loads the UNet, casts it, runs one warm-up forward (oneDNN primitives) and
one timed forward, and saves its output so the parent compares the two. Same inputs in both:
seeded latents, text context and SDXL's vector conditioning (pooled text + size / crop numbers).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from latentloom.benchmarking.measure import Table, median, run_child

MODULE = "latentloom.benchmarking.unet_bench_separate"


def run(args, modes: dict[str, tuple[str, bool]]) -> list[Table]:
    from latentloom.benchmarking.sdxl_random import saved_folder, unet_config

    preset, runs = args.preset, args.runs or 2
    t0 = time.perf_counter()
    folder = saved_folder(preset, root=getattr(args, "weights_dir", None))
    built = time.perf_counter() - t0
    cfg = unet_config(preset)
    table = Table(
        title=(f"UNet forward, {preset}, latents {args.batch}x{cfg.in_channels}x{args.size}x{args.size}, context "
               f"77x{cfg.context_dim}, y {cfg.adm_in_channels}, cpu, {args.threads or 'default'} thread(s), eager, "
               "each library in its own process"),
        header=["mode", "diffusers s", "latentloom s", "ratio", "paired ratio", "cpu ratio", "load diffusers s",
                "load latentloom s", "peak RSS diffusers GB", "peak RSS latentloom GB", "max rel. diff"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            results: dict[str, list[dict[str, Any]]] = {"diffusers": [], "latentloom": []}
            for r in range(runs):
                order = ("diffusers", "latentloom") if r % 2 == 0 else ("latentloom", "diffusers")
                for library in order:
                    spec = dict(library=library, folder=str(folder), mode=list(modes[mode]), size=args.size,
                                batch=args.batch, threads=args.threads, backend=args.backend,
                                output=str(Path(tmp) / f"{library}-{mode}.pt") if r == 0 else None)
                    result = run_child(MODULE, spec, threads=args.threads, timeout=7200.0)
                    results[library].append(result)
                    print(f"  {mode} round {r + 1}/{runs} {library}: forward {result['seconds']:.2f} s "
                          f"(load {result['load_seconds']:.1f} s)", flush=True)
            table.add_row(_row(mode, results, tmp))
    table.notes += [
        f"{runs} round(s) per mode, the libraries' processes alternating; each process: load, cast, one warm-up "
        f"forward, one timed forward; random weights written once in {built:.0f} s ({folder})",
        "s = median wall seconds per forward; ratio = median latentloom / median diffusers; paired ratio = median "
        "of per-round ratios; cpu ratio = ratio of median process CPU seconds of the forward",
        "load = seconds to read the UNet and cast it; peak RSS = the process's ru_maxrss; max rel. diff = largest "
        "output difference over the largest diffusers output",
    ]
    return [table]


def _row(mode: str, results: dict[str, list[dict[str, Any]]], tmp: str) -> list[Any]:
    import torch

    wall = {k: median([r["seconds"] for r in v]) for k, v in results.items()}
    cpu = {k: median([r["cpu_seconds"] for r in v]) for k, v in results.items()}
    load = {k: median([r["load_seconds"] for r in v]) for k, v in results.items()}
    peak = {k: max(r["max_rss"] for r in v) / 1e9 for k, v in results.items()}
    paired = median([a["seconds"] / b["seconds"] for a, b in zip(results["latentloom"], results["diffusers"])])
    ours = torch.load(Path(tmp) / f"latentloom-{mode}.pt")
    theirs = torch.load(Path(tmp) / f"diffusers-{mode}.pt")
    diff = float((ours - theirs).abs().max() / theirs.abs().max())
    return [mode, wall["diffusers"], wall["latentloom"], wall["latentloom"] / wall["diffusers"], paired,
            cpu["latentloom"] / cpu["diffusers"], load["diffusers"], load["latentloom"], peak["diffusers"],
            peak["latentloom"], diff]


# ---------------------------------------------------------------- inside the child process
def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one library's UNet from the folder, one warm-up and one timed forward."""
    import torch

    from latentloom.benchmarking.measure import max_rss_bytes

    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    dtype_name, channels_last = spec["mode"]
    dtype = getattr(torch, dtype_name)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unet_folder = Path(spec["folder"]) / "unet"
    t0 = time.perf_counter()
    if spec["library"] == "diffusers":
        from diffusers import UNet2DConditionModel

        from latentloom.benchmarking.sd_random import quiet_libraries

        quiet_libraries()
        model = UNet2DConditionModel.from_pretrained(unet_folder, torch_dtype=dtype).eval()
    else:
        from latentloom.unet import UNet

        model = UNet.from_diffusers(unet_folder, dtype=dtype).eval()
        model.set_attention_backend(spec["backend"])
    model.to(memory_format=fmt)
    load_seconds = time.perf_counter() - t0
    config = model.config
    batch, size = int(spec["batch"]), int(spec["size"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, size, size, generator=g).to(dtype).contiguous(memory_format=fmt)
    context = torch.randn(batch, 77, config.cross_attention_dim if spec["library"] == "diffusers"
                          else config.context_dim, generator=g).to(dtype)
    pooled_width = _pooled_width(spec["folder"])
    pooled = torch.randn(batch, pooled_width, generator=g).to(dtype)
    side = float(size * 8)
    numbers = torch.tensor([[side, side, 0.0, 0.0, side, side]]).expand(batch, 6)
    t = torch.full((batch,), 500.0)
    if spec["library"] == "diffusers":
        cond = {"text_embeds": pooled, "time_ids": numbers.to(dtype)}

        def forward():
            return model(x, t, context, added_cond_kwargs=cond).sample
    else:
        y = model.vector_conditioning(pooled, numbers.to(dtype))

        def forward():
            return model(x, t, context, y=y)

    with torch.no_grad():
        forward()  # warm-up
        t1, c1 = time.perf_counter(), time.process_time()
        out = forward()
        seconds, cpu_seconds = time.perf_counter() - t1, time.process_time() - c1
    if spec.get("output"):
        torch.save(out.float(), spec["output"])
    return dict(seconds=seconds, cpu_seconds=cpu_seconds, load_seconds=load_seconds, max_rss=max_rss_bytes())


def _pooled_width(folder: str) -> int:
    config = json.loads((Path(folder) / "text_encoder_2" / "config.json").read_text())
    return int(config["projection_dim"])


if __name__ == "__main__":
    if sys.argv[1:2] != ["--child"]:
        raise SystemExit("this module runs as a child of `latentloom bench unet --preset sdxl`")
    print(json.dumps(child(json.loads(sys.argv[2]))), flush=True)
