"""Peak memory of one whole image, diffusers against latentloom, each at its defaults.

A process's peak RSS never goes down, so every (library, resolution) case runs in a fresh
child process (`python -m latentloom.benchmarking.memory_bench --child SPEC`) that builds only
its own library's model from SD-1.5-sized random weights (`sd_random`), makes one image
(text encoding, `--steps` denoising steps with classifier-free guidance, VAE decode: the peak
is reached within those) and reports two numbers:

peak RSS     getrusage's ru_maxrss at the end: the whole process, model building included.
image peak   RSS polled every 2 ms during the image call alone (building the latentloom UNet
             from a diffusers module briefly holds two copies; a loaded model does not).

diffusers' defaults: StableDiffusionPipeline as built (fp32, PNDM, no VAE tiling).
latentloom's defaults: `fast_dtype` + `optimize` (bf16 + channels_last on CPUs with native bf16)
and `vae_tiling=None` (automatic). Where the automatic choice tiles, a second latentloom row
with tiling off shows what tiling buys.

SDXL (--preset sdxl): both libraries load one random SDXL folder written once (`sdxl_random`), as
a user's download is loaded (`StableDiffusionXLPipeline.from_pretrained`, `latentloom.load_pipeline`),
at 1024 px by default; where latentloom's default dtype is not fp32, a row in fp32 shows the
machines whose default it is. A case whose RSS would pass --memory-limit-gb (default: 92% of this
machine's RAM) is stopped, and the table says it did not fit instead of giving a number.

The "attention" part checks that the UNet's default attention (SDPA) does not write out the
(tokens x tokens) score matrices at the largest resolution: one forward of the first level's
self-attention layer per fresh process, against the `chunked` backend and the `math` reference
(which does materialise them, so it runs one head of one image: all of them would not fit).

The "vae" part (not run by default) measures what the automatic VAE tiling rule in
`vae/codec.py` is based on: one fp32 decode of the preset's VAE per fresh process, untiled
at each resolution and tiled where the latents span more than one tile.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from latentloom.benchmarking.measure import MemoryLimitExceeded, Table, memory_total_bytes

PROMPT = "a photograph of an astronaut riding a horse"
LIBRARIES = ("diffusers", "latentloom")
PARTS = ("image", "attention", "vae")
# backend, dtype, (batch, heads) or None for (2 = CFG, the level's heads)
ATTENTION_CASES = (("sdpa", "float32", None), ("sdpa", "bfloat16", None), ("chunked", "float32", None),
                   ("math", "float32", (1, 1)), ("sdpa", "float32", (1, 1)))
TILING = {"auto": None, "on": True, "off": False}
GB = 1e9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", default="image,attention", help=f"comma list of {list(PARTS)}")
    parser.add_argument("--resolutions", default=None,
                        help="comma list of image sides in pixels, multiples of 64 (default 512,1024; 64,128 "
                             "with --preset tiny)")
    parser.add_argument("--steps", type=int, default=1,
                        help="denoising steps per image (default 1: the peak is the same at every step)")
    parser.add_argument("--no-untiled-rows", dest="untiled_rows", action="store_false",
                        help="skip the latentloom row with VAE tiling off where the automatic choice tiles")
    parser.add_argument("--child-timeout", type=float, default=3600.0,
                        help="seconds one child process may take (default 3600)")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="stop a case whose RSS passes this (default: 92%% of this machine's RAM)")
    parser.add_argument("--weights-dir", default=None,
                        help="SDXL presets: where the random SDXL folder is written once (default ~/.cache/latentloom/bench)")


def _preset(args: argparse.Namespace) -> str:
    from latentloom.benchmarking import sd_random, sdxl_random

    preset = getattr(args, "preset", None) or "sd15"
    if preset not in sd_random.PRESETS + sdxl_random.PRESETS:
        raise ValueError(f"preset must be one of {list(sd_random.PRESETS + sdxl_random.PRESETS)}, got {preset!r}")
    return preset


DEFAULT_RESOLUTIONS = {"sd15": "512,1024", "tiny": "64,128", "sdxl": "1024", "sdxl-tiny": "64"}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Checked settings; ValueError names the bad value and what is accepted."""
    from latentloom.benchmarking.sd_random import check_resolution

    preset = _preset(args)
    text = args.resolutions or DEFAULT_RESOLUTIONS[preset]
    try:
        sides = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--resolutions must be a comma list of integers such as 512,1024, got {text!r}") from None
    if not sides:
        raise ValueError(f"--resolutions must name at least one size, got {text!r}")
    for side in sides:
        check_resolution(side)
    if isinstance(args.steps, bool) or not isinstance(args.steps, int) or args.steps < 1:
        raise ValueError(f"--steps must be an int >= 1, got {args.steps!r}")
    if not args.child_timeout > 0:
        raise ValueError(f"--child-timeout must be > 0 seconds, got {args.child_timeout!r}")
    threads = getattr(args, "threads", 1)
    if threads is None or threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads!r}")
    parts = [p.strip() for p in str(getattr(args, "parts", "image")).split(",") if p.strip()]
    if not parts or any(p not in PARTS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"--parts must be a comma list of distinct names from {list(PARTS)}, got {args.parts!r}")
    sdxl = preset.startswith("sdxl")
    if sdxl:  # the attention and VAE parts measure SD 1.5's layers; SDXL shares its VAE
        parts = [p for p in parts if p == "image"]
        if not parts:
            raise ValueError(f"--preset {preset} measures the image part only (the attention and vae parts use "
                             "SD 1.5's layers: run them with --preset sd15)")
    limit = getattr(args, "memory_limit_gb", None)
    if limit is not None and not limit > 0:
        raise ValueError(f"--memory-limit-gb must be > 0, got {limit!r}")
    memory_limit = int(limit * GB) if limit is not None else int(0.92 * memory_total_bytes()) or None
    return dict(preset=preset, resolutions=sides, steps=args.steps, threads=threads, parts=parts,
                untiled_rows=bool(args.untiled_rows), timeout=float(args.child_timeout), sdxl=sdxl,
                memory_limit=memory_limit, weights_dir=getattr(args, "weights_dir", None))


def check_args(args: argparse.Namespace) -> None:
    settings(args)


def run(args: argparse.Namespace) -> list[Table]:
    s = settings(args)
    tables = [image_table(s)] if "image" in s["parts"] else []
    if "attention" in s["parts"]:
        tables.append(attention_table(s))
    if "vae" in s["parts"]:
        tables.append(vae_table(s))
    return tables


def image_table(s: dict[str, Any]) -> Table:
    folder = None
    if s["sdxl"]:
        from latentloom.benchmarking.sdxl_random import saved_folder

        folder = str(saved_folder(s["preset"], root=s["weights_dir"]))
    table = Table(
        title=f"Peak memory of one image ({s['preset']}, {s['steps']} denoising step(s) + text encoding + VAE "
              f"decode, CFG batch 2, CPU, {s['threads'] or 'default'} thread(s), each case in a fresh process)",
        header=["resolution", "library", "settings", "peak RSS GB", "image peak GB", "weights RSS GB", "s",
                "ratio latentloom/diffusers"],
    )
    common = dict(preset=s["preset"], steps=s["steps"], threads=s["threads"], timeout=s["timeout"],
                  memory_limit=s["memory_limit"], folder=folder)
    for side in s["resolutions"]:
        reference = measure_case(library="diffusers", resolution=side, tiling="auto", **common)
        table.add_row(_row(side, reference, None))
        ours = measure_case(library="latentloom", resolution=side, tiling="auto", **common)
        table.add_row(_row(side, ours, reference))
        if s["sdxl"] and not ours.get("too_big") and ours["dtype"] != "float32":
            table.add_row(_row(side, measure_case(library="latentloom", resolution=side, tiling="auto",
                                                  dtype="float32", **common), reference))
        if s["untiled_rows"] and ours.get("tiled"):
            untiled = measure_case(library="latentloom", resolution=side, tiling="off", **common)
            table.add_row(_row(side, untiled, reference))
    weights = "one random SDXL folder (sdxl_random, seed 0), loaded by each library" if s["sdxl"] else \
        "the same random weights (sd_random, seed 0)"
    pipeline = "StableDiffusionXLPipeline.from_pretrained: fp32, its Euler" if s["sdxl"] else \
        "StableDiffusionPipeline as built: fp32, PNDM, no VAE tiling"
    table.notes += [
        "peak RSS = the child process's ru_maxrss (model building included); image peak = RSS polled every 2 ms "
        "during the image call; weights RSS = RSS just before it; ratio = peak RSS latentloom / diffusers",
        f"diffusers at its defaults ({pipeline}); latentloom at its defaults (fast_dtype + optimize, vae_tiling "
        f"automatic); {weights}",
    ]
    if s["memory_limit"]:
        table.notes.append(f"a case is stopped when its RSS passes {s['memory_limit'] / GB:.1f} GB "
                           "(--memory-limit-gb): 'did not fit' rows")
    return table


def attention_table(s: dict[str, Any]) -> Table:
    from latentloom.benchmarking.sd_random import unet_config

    cfg = unet_config(s["preset"])
    side = max(s["resolutions"]) // 8
    tokens = side * side
    table = Table(
        title=f"One self-attention layer at {side}x{side} latents ({tokens} tokens, {cfg.channels[0]} wide, "
              f"{cfg.heads_at(0)} heads: the UNet's first level), latentloom backends, each in a fresh process",
        header=["backend", "dtype", "batch x heads", "RSS growth GB", "score matrices fp32 GB", "s"],
    )
    for backend, dtype, shape in ATTENTION_CASES:
        batch, heads = shape or (2, cfg.heads_at(0))
        spec = dict(kind="attention", backend=backend, dtype=dtype, batch=batch, heads=heads,
                    head_dim=cfg.channels[0] // cfg.heads_at(0), side=side, threads=s["threads"])
        result = run_child(spec, threads=s["threads"], timeout=s["timeout"])
        table.add_row([backend, dtype, f"{batch} x {heads}", result["growth"] / GB,
                       batch * heads * tokens * tokens * 4 / GB, result["seconds"]])
    table.notes += [
        "RSS growth = peak RSS during the forward (ru_maxrss and 2 ms polling, the larger) minus RSS before it; "
        "score matrices = what (batch, heads, tokens, tokens) fp32 scores would take if written out",
        "math runs one head of one image (its full-size scores would not fit in memory); sdpa at the same "
        "shape is the like-for-like comparison",
    ]
    return table


def _row(side: int, result: dict[str, Any], reference: dict[str, Any] | None) -> list[Any]:
    if result.get("too_big"):
        return [f"{side}x{side}", result["library"], result["settings"],
                f"did not fit (> {result['limit'] / GB:.1f})", None, None, None, None]
    ratio = None if reference is None or reference.get("too_big") else result["max_rss"] / reference["max_rss"]
    return [f"{side}x{side}", result["library"], result["settings"], result["max_rss"] / GB,
            result["image_peak"] / GB, result["before_image"] / GB, result["seconds"], ratio]


def vae_table(s: dict[str, Any]) -> Table:
    from latentloom.benchmarking.sd_random import vae_config

    tile = int(vae_config(s["preset"])["sample_size"])
    table = Table(
        title=f"One VAE decode ({s['preset']} VAE, float32, batch 1, tiles of {tile} px), each in a fresh process",
        header=["resolution", "tiling", "RSS growth GB", "untiled estimate GB", "s"],
    )
    for side in s["resolutions"]:
        for tiled in (False, True) if side > tile else (False,):
            spec = dict(kind="vae", preset=s["preset"], resolution=side, tiled=tiled, threads=s["threads"])
            result = run_child(spec, threads=s["threads"], timeout=s["timeout"])
            table.add_row([f"{side}x{side}", "on" if tiled else "off", result["growth"] / GB,
                           result["estimate"] / GB, result["seconds"]])
    table.notes.append("RSS growth = peak RSS during the decode minus RSS before it; untiled estimate = "
                       "latentloom.vae.codec.untiled_decode_bytes, what the automatic tiling rule compares "
                       "with its 1 GiB threshold")
    return table


def measure_case(*, library: str, preset: str, resolution: int, steps: int, tiling: str, threads: int,
                 timeout: float = 3600.0, memory_limit: int | None = None, folder: str | None = None,
                 dtype: str | None = None) -> dict[str, Any]:
    """Run one case in a fresh Python process and return what it measured (see `child`); a case
    stopped at `memory_limit` returns {"too_big": True, ...} instead."""
    if library not in LIBRARIES:
        raise ValueError(f"library must be one of {list(LIBRARIES)}, got {library!r}")
    if tiling not in TILING:
        raise ValueError(f"tiling must be one of {list(TILING)}, got {tiling!r}")
    spec = dict(kind="image", library=library, preset=preset, resolution=resolution, steps=steps, tiling=tiling,
                threads=threads, folder=folder, dtype=dtype)
    try:
        return run_child(spec, threads=threads, timeout=timeout, memory_limit=memory_limit)
    except MemoryLimitExceeded as err:
        settings = {"diffusers": "fp32 (its default)", "latentloom": dtype or "its defaults"}[library]
        return dict(library=library, settings=settings, too_big=True, limit=err.limit)


def run_child(spec: dict[str, Any], *, threads: int, timeout: float, memory_limit: int | None = None) -> dict[str, Any]:
    """`python -m latentloom.benchmarking.memory_bench --child SPEC` in a fresh process; its JSON result."""
    from latentloom.benchmarking.measure import run_child as run_module_child

    return run_module_child("latentloom.benchmarking.memory_bench", spec, threads=threads, timeout=timeout,
                            memory_limit=memory_limit)


# ---------------------------------------------------------------- inside the child process
def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one library's model, make one image, measure (called in a fresh process only)."""
    if spec.get("kind") == "attention":
        return attention_child(spec)
    if spec.get("kind") == "vae":
        return vae_child(spec)
    import gc

    import torch

    from latentloom.benchmarking.measure import PeakRSS, max_rss_bytes, rss_bytes
    from latentloom.benchmarking.sd_random import check_preset, check_resolution

    if not str(spec["preset"]).startswith("sdxl"):
        check_preset(spec["preset"])  # before the heavy imports: a bad spec fails fast
    check_resolution(int(spec["resolution"]))
    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    side = int(spec["resolution"])
    if spec.get("folder"):
        make, describe = (_diffusers_sdxl if spec["library"] == "diffusers" else _latentloom_sdxl)(spec)
    else:
        make, describe = (_diffusers if spec["library"] == "diffusers" else _latentloom)(spec)
    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    with torch.inference_mode(), PeakRSS() as mem:
        image = make()
    seconds = time.perf_counter() - t0
    if image.size != (side, side):
        raise RuntimeError(f"expected a {side}x{side} image, got {image.size}")
    return dict(library=spec["library"], settings=describe, max_rss=max_rss_bytes(), image_peak=mem.peak,
                before_image=before, seconds=seconds, tiled=bool(spec.get("tiled", False)),
                dtype=spec.get("used_dtype"))


def attention_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One forward of one latentloom self-attention layer on (side x side) latent tokens."""
    import torch

    from latentloom.benchmarking.measure import PeakRSS, max_rss_bytes
    from latentloom.unet.attention import check_backend
    from latentloom.unet.transformer import Attention

    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    dtype = getattr(torch, spec["dtype"])
    heads, dim = int(spec["heads"]), int(spec["heads"]) * int(spec["head_dim"])
    torch.manual_seed(0)
    layer = Attention(dim, heads=heads, context_dim=None, upcast=False, dropout=0.0).eval().to(dtype)
    layer.backend = check_backend(spec["backend"])
    x = torch.randn(int(spec["batch"]), int(spec["side"]) ** 2, dim, dtype=dtype)  # (B, N, C)
    t0 = time.perf_counter()
    with torch.inference_mode(), PeakRSS() as mem:
        layer(x)
    seconds = time.perf_counter() - t0
    return dict(growth=max(mem.peak, max_rss_bytes()) - mem.start, seconds=seconds)


def vae_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One fp32 decode of the preset's VAE at `resolution`, tiled or not (diffusers' own tiling)."""
    import torch

    from latentloom.benchmarking import sd_random
    from latentloom.benchmarking.measure import PeakRSS, max_rss_bytes
    from latentloom.vae.codec import decode_latents, untiled_decode_bytes

    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    vae = sd_random.vae(spec["preset"], seed=1)
    side = int(spec["resolution"]) // 8
    z = torch.randn(1, int(vae.config.latent_channels), side, side, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    with torch.inference_mode(), PeakRSS() as mem:
        decode_latents(vae, z, tiling=bool(spec["tiled"]))
    seconds = time.perf_counter() - t0
    return dict(growth=max(mem.peak, max_rss_bytes()) - mem.start, seconds=seconds,
                estimate=untiled_decode_bytes(vae, tuple(z.shape)))


def _diffusers(spec: dict[str, Any]):
    import diffusers
    import torch

    from latentloom.benchmarking import sd_random

    preset, side = spec["preset"], int(spec["resolution"])
    pipe = diffusers.StableDiffusionPipeline(
        vae=sd_random.vae(preset, seed=1), text_encoder=sd_random.text_model(preset, seed=2),
        tokenizer=sd_random.tokenizer(), unet=sd_random.diffusers_unet(preset, seed=0),
        scheduler=diffusers.PNDMScheduler(**sd_random.SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    spec["tiled"] = bool(pipe.vae.use_tiling)
    dtype = str(pipe.unet.dtype).removeprefix("torch.")

    def make():
        generator = torch.Generator().manual_seed(0)
        return pipe(PROMPT, height=side, width=side, num_inference_steps=int(spec["steps"]),
                    generator=generator).images[0]

    return make, f"{dtype}, PNDM, VAE tiling {'on' if spec['tiled'] else 'off'}"


def _latentloom(spec: dict[str, Any]):
    import diffusers
    import torch

    from latentloom.benchmarking import sd_random
    from latentloom.pipelines.defaults import CallDefaults
    from latentloom.pipelines.pipeline import Pipeline
    from latentloom.pipelines.runtime import fast_dtype, optimize
    from latentloom.vae.codec import auto_tiling
    from latentloom.samplers.schedules import ScheduleConfig
    from latentloom.text_encoders import CLIPEncoder
    from latentloom.unet import UNet

    preset, side = spec["preset"], int(spec["resolution"])
    device = torch.device("cpu")
    dtype = fast_dtype(device)
    reference = sd_random.diffusers_unet(preset, seed=0)
    # cast before converting: the conversion copies the weights, so at most two copies in `dtype`
    # exist at once instead of an fp32 one beside them
    reference.to(dtype)
    unet = UNet.from_diffusers(reference).eval()
    del reference
    scheduler = diffusers.PNDMScheduler(**sd_random.SD15_SCHEDULER)
    pipe = Pipeline(
        unet=unet, vae=sd_random.vae(preset, seed=1),
        text_encoder=CLIPEncoder(sd_random.text_model(preset, seed=2), sd_random.tokenizer()),
        schedule_config=ScheduleConfig.from_diffusers_config(dict(scheduler.config)),
        name=f"random:{preset}", use_context_mask=False, defaults=CallDefaults(height=side, width=side),
    )
    pipe.to(device=device, dtype=dtype)
    optimize(pipe)
    tiling = TILING[spec["tiling"]]
    f = pipe.vae_scale_factor
    chosen = auto_tiling(pipe.vae, (1, pipe.latent_channels, side // f, side // f)) if tiling is None else tiling
    spec["tiled"] = chosen

    def make():
        return pipe(PROMPT, height=side, width=side, num_inference_steps=int(spec["steps"]), seed=0,
                    vae_tiling=tiling, progress=False).images[0]

    conv = next(p for p in pipe.unet.parameters() if p.ndim == 4 and p.shape[-1] > 1)
    layout = "channels_last" if conv.is_contiguous(memory_format=torch.channels_last) else ""
    dtype_name = str(pipe.dtype).removeprefix("torch.") + (f" + {layout}" if layout else "")
    mode = f"{spec['tiling']} ({'on' if chosen else 'off'})" if tiling is None else spec["tiling"]
    return make, f"{dtype_name}, {pipe.defaults.sampler}, VAE tiling {mode}"


def _diffusers_sdxl(spec: dict[str, Any]):
    """diffusers' SDXL pipeline as a user loads it: from_pretrained at its defaults (fp32)."""
    import diffusers
    import torch

    from latentloom.benchmarking.sd_random import quiet_libraries

    quiet_libraries()
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(spec["folder"], add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    side = int(spec["resolution"])
    spec["tiled"] = bool(pipe.vae.use_tiling)
    spec["used_dtype"] = str(pipe.unet.dtype).removeprefix("torch.")

    def make():
        return pipe(PROMPT, height=side, width=side, num_inference_steps=int(spec["steps"]),
                    generator=torch.Generator().manual_seed(0)).images[0]

    return make, f"{spec['used_dtype']}, {type(pipe.scheduler).__name__}, VAE tiling {'on' if spec['tiled'] else 'off'}"


def _latentloom_sdxl(spec: dict[str, Any]):
    """latentloom.load_pipeline on the same folder, at its defaults (or `spec["dtype"]`)."""
    import latentloom
    from latentloom.vae.codec import auto_tiling

    pipe = latentloom.load_pipeline(spec["folder"], device="cpu", dtype=spec.get("dtype"))
    side = int(spec["resolution"])
    tiling = TILING[spec["tiling"]]
    f = pipe.vae_scale_factor
    chosen = auto_tiling(pipe.vae, (1, pipe.latent_channels, side // f, side // f)) if tiling is None else tiling
    spec["tiled"] = chosen
    spec["used_dtype"] = str(pipe.dtype).removeprefix("torch.")

    def make():
        return pipe(PROMPT, height=side, width=side, num_inference_steps=int(spec["steps"]), seed=0,
                    vae_tiling=tiling, progress=False).images[0]

    mode = f"{spec['tiling']} ({'on' if chosen else 'off'})" if tiling is None else spec["tiling"]
    chosen_dtype = "" if spec.get("dtype") is None else " (chosen)"
    return make, f"{spec['used_dtype']}{chosen_dtype}, {pipe.defaults.sampler}, VAE tiling {mode}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        result = child(json.loads(argv[1]))
        print(json.dumps(result), flush=True)
        return 0
    from latentloom.benchmarking.cli_bench import add_common_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        parser.error(str(err))
    command = f"python -m latentloom.benchmarking.memory_bench {' '.join(argv)}".rstrip()
    tables = run(args)
    from latentloom.benchmarking.measure import report

    report(tables, command=command, json_path=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
