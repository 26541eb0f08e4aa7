"""End to end, diffusers' StableDiffusionPipeline vs latentloom's Pipeline on identical random weights.

Two comparisons, each pair alternated in one process:

same settings  both at one dtype/layout (a --modes entry), DPM-Solver++ 2M (diffusers'
               DPMSolverMultistepScheduler vs latentloom's "dpmpp_2m"), the same steps and
               seed: median seconds per denoising step (between the pipelines' per-step
               callbacks), seconds per whole image, and the largest pixel difference.
defaults       what each library does when asked for an image: diffusers' pipeline as built
               (fp32, contiguous, PNDM, 50 steps) against latentloom's fast defaults
               (`fast_dtype` + `optimize`, `CallDefaults`: dpmpp_2m, 30 steps). At SD size a
               whole fp32 image takes many minutes on one core, so with --measure-steps K the
               time per image is composed from measured parts: text encoding + denoiser calls
               x median step (K steps timed after one warm-up step) + VAE decode.
cache          step caching (`cache_interval=N`, DeepCache) in latentloom's defaults (fast dtype,
               channels_last, dpmpp_2m, 30 steps): the whole UNet forward and the shallow one
               (cache primed) timed alternately, and the time per image composed for each N:
               text encoding + full calls x full s + cached calls x shallow s + VAE decode.
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
}
PARTS = ("same", "defaults", "cache")
PROMPT = "a photograph of an astronaut riding a horse"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels, a multiple of 64 (default 512; 64 with --preset tiny); "
                             "latents are resolution/8")
    parser.add_argument("--parts", default="same,defaults", help=f"comma list of {list(PARTS)}")
    parser.add_argument("--modes", default="bf16-cl",
                        help=f"same-settings dtype/layout, comma list of {list(MODES)}")
    parser.add_argument("--steps", type=int, default=20, help="same-settings denoising steps")
    parser.add_argument("--measure-steps", type=int, default=None, metavar="K",
                        help="defaults: time K steps after one warm-up step and compose the time per image "
                             "(default 3 for sd15); 0 = time whole images (default for --preset tiny)")
    parser.add_argument("--cache-interval", default="2,3,5", metavar="N,N,...",
                        help="cache part: the step-caching intervals to compose (ints >= 2; default 2,3,5)")
    parser.add_argument("--prompt", default=PROMPT, help="the prompt (one, with classifier-free guidance)")
    parser.add_argument("--seed", type=int, default=0, help="weights and noise seed")


def _list(text: Any, choices, option: str) -> list[str]:
    items = [m.strip() for m in str(text).split(",") if m.strip()]
    bad = [m for m in items if m not in choices]
    if not items or bad or len(set(items)) != len(items):
        raise ValueError(f"{option} must be a comma list of distinct names from {list(choices)}, got {text!r}")
    return items


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The checked, defaulted settings of a run (ValueError names the bad value and what is accepted)."""
    from latentloom.benchmarking.sd_random import check_preset, check_resolution, default_resolution

    preset = check_preset(args.preset or "sd15")
    resolution = default_resolution(preset) if args.resolution is None else check_resolution(args.resolution)
    runs = (1 if preset == "sd15" else 3) if args.runs is None else args.runs
    if runs < 1:
        raise ValueError(f"--runs must be >= 1, got {runs}")
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2 (the warm-up call uses 2), got {args.steps}")
    k = (3 if preset == "sd15" else 0) if args.measure_steps is None else args.measure_steps
    if not 0 <= k <= 29:
        raise ValueError(f"--measure-steps must be in [0, 29] (0 = whole images; latentloom's default image "
                         f"has 30 steps), got {k}")
    if not args.prompt.strip():
        raise ValueError("--prompt must not be empty")
    return dict(preset=preset, resolution=resolution, runs=runs, measure_steps=k,
                parts=_list(args.parts, PARTS, "--parts"), modes=_list(args.modes, MODES, "--modes"),
                cache_intervals=_intervals(getattr(args, "cache_interval", "2,3,5")))


def _intervals(text: Any) -> list[int]:
    """--cache-interval: distinct ints >= 2 (1 is the baseline every table row is compared with)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 2 for v in values) or len(set(values)) != len(values):
        raise ValueError(f"--cache-interval must be a comma list of distinct ints >= 2, got {text!r}")
    return values


def check_args(args: argparse.Namespace) -> None:
    settings(args)


def run(args: argparse.Namespace) -> list[Table]:
    import torch

    from latentloom.benchmarking import sd_random

    s = settings(args)
    sd_random.quiet_libraries()
    t0 = time.perf_counter()
    pair = sd_random.build(preset=s["preset"], seed=args.seed, resolution=s["resolution"])
    built = time.perf_counter() - t0
    header = (f"{s['preset']} random weights, {s['resolution']}x{s['resolution']} (latents "
              f"{s['resolution'] // 8}x{s['resolution'] // 8}), 1 prompt + CFG (UNet batch 2), cpu, "
              f"{torch.get_num_threads()} thread(s)")
    # In-place casts are lossy downwards, so: fp32 same-settings modes first (exact weights),
    # then the defaults (diffusers must still be fp32), then the low-precision modes.
    same = [m for m in s["modes"] if MODES[m][0] == "float32"] if "same" in s["parts"] else []
    late = [m for m in s["modes"] if MODES[m][0] != "float32"] if "same" in s["parts"] else []
    tables: list[Table] = []
    same_table = Table(
        title=f"Pipeline, same settings (DPM-Solver++ 2M, {args.steps} steps, guidance 7.5): {header}",
        header=["mode", "diffusers s/step", "latentloom s/step", "step ratio", "diffusers s/image",
                "latentloom s/image", "image ratio", "cpu step ratio", "cpu image ratio", "max pixel diff"])
    for mode in same:
        same_table.add_row(measure_same(pair, mode, args=args, s=s))
    if "defaults" in s["parts"]:
        tables.append(measure_defaults(pair, args=args, s=s, header=header))
    if "cache" in s["parts"]:
        tables.append(measure_cache(pair, args=args, s=s, header=header))
    for mode in late:
        same_table.add_row(measure_same(pair, mode, args=args, s=s))
    if same_table.rows:
        same_table.notes += [
            f"whole images, {s['runs']} timed run(s) per library and mode after a 2-step warm-up call, alternated",
            "s/step = median time between consecutive per-step callbacks (diffusers callback_on_step_end, "
            "latentloom callback=); s/image = median wall time of the whole call (text encoding, sampling, VAE "
            "decode); ratio = latentloom / diffusers; cpu ratios = the same from process CPU seconds (with one "
            "thread, robust to other jobs on shared cores)",
            "max pixel diff = largest |difference| of the two images, pixels in [0, 1] (low-precision modes: "
            "diffusers draws the noise and keeps the latents in that dtype, latentloom samples in fp32)",
            f"weights built in {built:.0f} s; process peak RSS {max_rss_bytes() / 1e9:.1f} GB",
        ]
        tables.insert(0, same_table)
    return tables


# ------------------------------------------------------------------ same settings
def measure_same(pair, mode: str, *, args: argparse.Namespace, s: dict[str, Any]) -> list[Any]:
    import diffusers
    import torch

    from latentloom.pipelines.runtime import optimize

    dtype = getattr(torch, MODES[mode][0])
    fmt = torch.channels_last if MODES[mode][1] else torch.contiguous_format
    ref, ours = pair.diffusers, pair.latentloom
    ref.to(dtype=dtype)
    ref.unet.to(memory_format=fmt)
    ours.to(dtype=dtype)
    if MODES[mode][1]:
        optimize(ours, channels_last=True)
    else:
        ours.unet.to(memory_format=torch.contiguous_format)
    pndm = ref.scheduler
    # swapped the documented way: SD 1.5's config leaves timestep_spacing to each class's default
    # ("linspace" for DPM-Solver), and latentloom's dpmpp_2m resolves it the same way
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pndm.config, algorithm_type="dpmsolver++")
    try:
        side = s["resolution"]
        common = dict(height=side, width=side, guidance_scale=7.5)

        def run_diffusers(steps: int):
            stamps: list[float] = []
            images = ref(args.prompt, num_inference_steps=steps, output_type="np",
                         generator=torch.Generator().manual_seed(args.seed),
                         callback_on_step_end=_stamp_diffusers(stamps), **common).images
            return images, _deltas(stamps)

        def run_latentloom(steps: int):
            stamps: list[float] = []
            ours.text_encoder.clear_cache()  # every run encodes its prompt, as diffusers' does
            images = ours(args.prompt, num_inference_steps=steps, sampler="dpmpp_2m", output_type="np",
                          generator=torch.Generator().manual_seed(args.seed), progress=False,
                          callback=lambda *_: stamps.append(_now()), **common).images
            return images, _deltas(stamps)

        run_diffusers(2), run_latentloom(2)  # warm-up: oneDNN primitives for the UNet and the VAE
        samples = alternate({"diffusers": lambda: run_diffusers(args.steps),
                             "latentloom": lambda: run_latentloom(args.steps)}, runs=s["runs"], warmup=0)
    finally:
        ref.scheduler = pndm
    step, step_cpu = _step_medians(samples)
    image = {k: median(v) for k, v in samples.wall.items()}
    image_cpu = {k: median(v) for k, v in samples.cpu.items()}
    diff = float(abs(samples.results["latentloom"][0][0] - samples.results["diffusers"][0][0]).max())
    print(f"  same {mode}: s/image diffusers {samples.wall['diffusers']}, latentloom {samples.wall['latentloom']}",
          flush=True)
    return [mode, step["diffusers"], step["latentloom"], step["latentloom"] / step["diffusers"],
            image["diffusers"], image["latentloom"], image["latentloom"] / image["diffusers"],
            step_cpu["latentloom"] / step_cpu["diffusers"], image_cpu["latentloom"] / image_cpu["diffusers"], diff]


def _now() -> tuple[float, float]:
    """(wall, process CPU) seconds: one stamp per denoising step."""
    return time.perf_counter(), time.process_time()


def _step_medians(samples) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and CPU seconds per step over every timed run's consecutive-callback deltas."""
    wall = {k: median([d[0] for _, deltas in v for d in deltas]) for k, v in samples.results.items()}
    cpu = {k: median([d[1] for _, deltas in v for d in deltas]) for k, v in samples.results.items()}
    return wall, cpu


def _stamp_diffusers(stamps: list[float]):
    def callback(pipe, i, t, kwargs):
        stamps.append(_now())
        return {}

    return callback


def _deltas(stamps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(wall, CPU) seconds between consecutive step callbacks: one denoising step each."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]


# ------------------------------------------------------------------ defaults
class _Stop(Exception):
    """Raised from latentloom's step callback to end a composed run after K timed steps."""

    def __init__(self, x) -> None:
        super().__init__("stop after the timed steps")
        self.x = x


def measure_defaults(pair, *, args: argparse.Namespace, s: dict[str, Any], header: str) -> Table:
    import torch

    from latentloom.pipelines.runtime import fast_dtype, optimize

    ref, ours = pair.diffusers, pair.latentloom
    ref.to(dtype=torch.float32)  # diffusers as built: fp32, contiguous, PNDM
    ref.unet.to(memory_format=torch.contiguous_format)
    ours.to(dtype=fast_dtype(ours.device))
    optimize(ours)
    side, k = s["resolution"], s["measure_steps"]
    d_steps = 50  # StableDiffusionPipeline's default num_inference_steps
    l_steps = ours.defaults.num_inference_steps
    unet_calls = {"latentloom": 0}
    hook = ours.unet.register_forward_pre_hook(lambda *_: unet_calls.__setitem__("latentloom", unet_calls["latentloom"] + 1))
    callbacks = {"latentloom": 0}

    def run_diffusers():
        stamps: list[float] = []
        kept: dict[str, Any] = {}

        def callback(pipe, i, t, kwargs):
            stamps.append(_now())
            if k and i >= k:  # K timed steps after the warm-up step: skip the rest (diffusers' interrupt)
                pipe._interrupt = True
                kept["latents"] = kwargs["latents"]
            return {}

        out = ref(args.prompt, height=side, width=side, generator=torch.Generator().manual_seed(args.seed),
                  output_type="latent" if k else "pil", callback_on_step_end=callback)
        return kept.get("latents", out.images), _deltas(stamps)

    def run_latentloom():
        stamps: list[float] = []

        def callback(i, sigma, x, denoised):
            stamps.append(_now())
            callbacks["latentloom"] += 1
            if k and i >= k:
                raise _Stop(x)

        ours.text_encoder.clear_cache()
        try:
            out = ours(args.prompt, generator=torch.Generator().manual_seed(args.seed), progress=False,
                       output_type="latent" if k else "pil", callback=callback)
        except _Stop as stop:
            return stop.x, _deltas(stamps)
        return out.images, _deltas(stamps)

    try:
        steps = alternate({"diffusers": run_diffusers, "latentloom": run_latentloom}, runs=s["runs"],
                          warmup=0 if k else 1)
    finally:
        hook.remove()
    d_calls = len(ref.scheduler.timesteps)  # PNDM (PLMS) makes 51 UNet calls for 50 steps
    l_calls = l_steps * round(unet_calls["latentloom"] / max(callbacks["latentloom"], 1))
    step, step_cpu = _step_medians(steps)
    table = Table(
        title=f"Pipeline, each library's defaults: {header}",
        header=["library", "settings", "denoiser calls", "s/step", "encode s", "decode s", "s/image",
                "cpu s/image"])
    d_set = f"fp32, contiguous, PNDM, {d_steps} steps"
    l_set = f"{str(ours.dtype).removeprefix('torch.')}, channels_last, {ours.defaults.sampler}, {l_steps} steps"
    if k:
        (encode, encode_cpu), (decode, decode_cpu) = _encode_decode(ref, ours, steps, args=args, runs=s["runs"])
        calls = {"diffusers": d_calls, "latentloom": l_calls}
        image = {name: encode[name] + calls[name] * step[name] + decode[name] for name in calls}
        image_cpu = {name: encode_cpu[name] + calls[name] * step_cpu[name] + decode_cpu[name] for name in calls}
        how = (f"s/image composed from measured parts: encode + denoiser calls x s/step + decode; s/step = median "
               f"of {k} step(s) timed after one warm-up step per run, {s['runs']} run(s) per library, alternated")
    else:
        encode = decode = {"diffusers": None, "latentloom": None}
        image = {name: median(v) for name, v in steps.wall.items()}
        image_cpu = {name: median(v) for name, v in steps.cpu.items()}
        how = f"whole images: {s['runs']} timed run(s) per library after one warm-up image, alternated"
    for name, label, n in (("diffusers", d_set, d_calls), ("latentloom", l_set, l_calls)):
        table.add_row([name, label, n, step[name], encode[name], decode[name], image[name], image_cpu[name]])
    table.add_row(["ratio latentloom / diffusers", "", "", step["latentloom"] / step["diffusers"],
                   _ratio(encode), _ratio(decode), image["latentloom"] / image["diffusers"],
                   image_cpu["latentloom"] / image_cpu["diffusers"]])
    table.notes += [
        how,
        f"latentloom's defaults make an image {image['diffusers'] / image['latentloom']:.2f}x faster than "
        f"diffusers' defaults by wall time, {image_cpu['diffusers'] / image_cpu['latentloom']:.2f}x by CPU time "
        "(goal: >= 3x)",
        "cpu s/image = the same composition from process CPU seconds (with one thread, robust to other jobs on "
        "shared cores)",
        "encode = the prompt and the empty negative through CLIP (latentloom's prompt cache cleared first); "
        "decode = VAE decode and conversion to PIL, as each pipeline does it",
    ]
    return table


def _ratio(values: dict[str, float | None]) -> float | None:
    if values["diffusers"] is None or values["latentloom"] is None:
        return None
    return values["latentloom"] / values["diffusers"]


def _encode_decode(ref, ours, steps, *, args: argparse.Namespace, runs: int):
    """Median seconds of text encoding and of VAE decode + PIL conversion, alternated."""
    import torch

    from latentloom.pipelines.denoising import text_conditions
    from latentloom.pipelines.output import latents_to_output

    def encode_diffusers():
        return ref.encode_prompt(args.prompt, ref.device, 1, True, None)

    def encode_latentloom():
        ours.text_encoder.clear_cache()
        return text_conditions(ours, [args.prompt], [""], guided=True)

    d_latents = steps.results["diffusers"][0][0]  # (1, 4, h, w), the latents where the run stopped
    l_latents = steps.results["latentloom"][0][0]

    def decode_diffusers():
        with torch.no_grad():
            image = ref.vae.decode(d_latents / ref.vae.config.scaling_factor, return_dict=False)[0]
            return ref.image_processor.postprocess(image, output_type="pil", do_denormalize=[True])

    def decode_latentloom():
        with torch.no_grad():
            return latents_to_output(ours, l_latents, "pil")

    with torch.no_grad():
        enc = alternate({"diffusers": encode_diffusers, "latentloom": encode_latentloom}, runs=max(runs, 3))
    dec = alternate({"diffusers": decode_diffusers, "latentloom": decode_latentloom}, runs=runs)
    return tuple(({k: median(v) for k, v in m.wall.items()}, {k: median(v) for k, v in m.cpu.items()})
                 for m in (enc, dec))


# ------------------------------------------------------------------ step caching
def measure_cache(pair, *, args: argparse.Namespace, s: dict[str, Any], header: str) -> Table:
    """Full vs shallow (cached-step) UNet forward on latentloom's defaults, and the time per image each
    cache interval composes from them; ratios against N = 1 (no caching)."""
    import math

    import torch

    from latentloom.pipelines.denoising import text_conditions
    from latentloom.pipelines.output import latents_to_output
    from latentloom.pipelines.runtime import fast_dtype, optimize
    from latentloom.unet.step_cache import DeepCache

    ours = pair.latentloom
    ours.to(dtype=fast_dtype(ours.device))
    optimize(ours)
    unet, side, f = ours.unet, s["resolution"], ours.vae_scale_factor
    steps, sampler = ours.defaults.num_inference_steps, ours.defaults.sampler
    with torch.no_grad():
        cond, uncond = text_conditions(ours, [args.prompt], [""], guided=True)
        context = torch.cat([uncond["context"], cond["context"]]).to(unet.dtype)  # (2, L, D): one CFG step
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(2, ours.latent_channels, side // f, side // f, generator=g).to(unet.dtype)
        t = torch.tensor(500.0)
        cache = DeepCache(10**9)  # step 0 full (primes the feature); every later step cached

        def full():
            with torch.no_grad():
                return unet(x, t, context)

        def shallow():
            cache.step_done(0)  # each timed call is step 1 of the run
            with torch.no_grad():
                return unet(x, t, context, cache=cache)

        unet(x, t, context, cache=cache)  # primes the cache (and oneDNN's full-path primitives)
        runs = max(s["measure_steps"], s["runs"], 1)
        calls = alternate({"full": full, "shallow": shallow}, runs=runs, warmup=1)

        def encode():
            ours.text_encoder.clear_cache()
            return text_conditions(ours, [args.prompt], [""], guided=True)

        latents = torch.randn(1, ours.latent_channels, side // f, side // f, generator=g)

        def decode():
            return latents_to_output(ours, latents, "pil")

        parts = alternate({"encode": encode, "decode": decode}, runs=s["runs"], warmup=1)
    wall = {k: median(v) for k, v in {**calls.wall, **parts.wall}.items()}
    cpu = {k: median(v) for k, v in {**calls.cpu, **parts.cpu}.items()}

    def per_image(n: int, times: dict[str, float]) -> tuple[int, int, float, float]:
        full_calls = math.ceil(steps / n)  # steps 0, n, 2n, ...: one UNet call each (CFG batched)
        unet_s = full_calls * times["full"] + (steps - full_calls) * times["shallow"]
        return full_calls, steps - full_calls, unet_s, times["encode"] + unet_s + times["decode"]

    table = Table(
        title=f"Step caching (DeepCache) on latentloom's defaults ({sampler}, {steps} steps): {header}",
        header=["cache interval N", "full UNet calls", "shallow calls", "UNet s/image", "s/image",
                "speed-up vs N=1", "cpu speed-up vs N=1"])
    base, base_cpu = per_image(1, wall)[3], per_image(1, cpu)[3]
    for n in [1] + s["cache_intervals"]:
        full_calls, shallow_calls, unet_s, image = per_image(n, wall)
        table.add_row([n, full_calls, shallow_calls, unet_s, image, base / image, base_cpu / per_image(n, cpu)[3]])
    table.notes += [
        f"{str(unet.dtype).removeprefix('torch.')}, channels_last; UNet batch 2 (prompt + empty negative); measured: "
        f"full forward {wall['full']:.3f} s, shallow forward {wall['shallow']:.3f} s "
        f"(shallow / full = {wall['shallow'] / wall['full']:.3f}), text encoding {wall['encode']:.3f} s, VAE decode "
        f"+ PIL {wall['decode']:.3f} s (medians of {runs} alternated runs for the UNet, {s['runs']} for the rest)",
        "s/image composed: encode + full calls x full s + shallow calls x shallow s + decode; full calls on steps "
        "0, N, 2N, ... (ceil(steps / N)); cpu speed-up: the same from process CPU seconds",
    ]
    return table
