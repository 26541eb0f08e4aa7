"""How faithful an upscaler is on the shapes domain: its enlargements of unseen 64-px scenes
against the true render at the output size, beside nearest, bicubic and lanczos resampling.

    python -m latentloom.evaluation.upscaler_fidelity                   # the bundled upscaler
    python -m latentloom.evaluation.upscaler_fidelity --model OUT/upscaler --scenes 64 --noise-level 0 20
    python -m latentloom.evaluation.upscaler_fidelity --through-vae bundled:default   # as in the cascade

Columns: PSNR over the whole image; edge PSNR over the pixels within 2 px of an edge of the truth
(where enlargement errors live: flat regions are easy for every method); sharpness, the RMS
gradient magnitude in that band over the truth's (1 = as sharp as the truth, below 1 blurrier,
above 1 ringing or noise); shapes, the share of images whose main shape the procedural checker
reads as the caption's (color, shape, size, position all right). The scenes come from a seed the
bundled model never trained on (training used seed 0). With --through-vae the 64-px inputs first
go through a VAE's round trip, as the outputs of a latent base model look, and every method
(bicubic too) enlarges those softer images; the truth stays the sharp render.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

EDGE_THRESHOLD = 8.0  # gradient magnitude (0-255 scale) that marks an edge of the truth
EDGE_RADIUS = 2  # px around an edge counted in the band


def _gradient(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) -> (N, H, W): gradient magnitude of the channel mean."""
    gy, gx = np.gradient(images.mean(-1), axis=(1, 2))
    return np.hypot(gx, gy)


def edge_band(truth: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) -> (N, H, W) bool: pixels within EDGE_RADIUS px of an edge of `truth`."""
    band = _gradient(truth) > EDGE_THRESHOLD
    for _ in range(EDGE_RADIUS):
        grown = band.copy()
        for axis in (1, 2):
            for shift in (1, -1):
                grown |= np.roll(band, shift, axis=axis)
        band = grown
    return band


def _psnr(mse: float) -> float:
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def fidelity(images: np.ndarray, truth: np.ndarray, band: np.ndarray) -> dict[str, float]:
    """PSNR, edge PSNR and sharpness of `images` against `truth`, all (N, H, W, 3) on a 0-255 scale."""
    if images.shape != truth.shape:
        raise ValueError(f"images have shape {images.shape}, the truth {truth.shape}")
    x, t = images.astype(np.float64), truth.astype(np.float64)
    err = ((x - t) ** 2).mean(-1)  # (N, H, W)
    # RMS, not mean: blur keeps the summed gradient across an edge (the step height) but spreads it
    sharp = np.sqrt((_gradient(x)[band] ** 2).mean() / max((_gradient(t)[band] ** 2).mean(), 1e-12))
    return {"psnr": _psnr(float(err.mean())), "edge_psnr": _psnr(float(err[band].mean())),
            "sharpness": float(sharp)}


def scenes(n: int, *, seed: int, size: int) -> tuple[list, list[str], list, np.ndarray]:
    """n scenes: their 64-px renders (PIL), captions, specs and true renders at `size` (N, size, size, 3)."""
    from latentloom.synthetic import shapes as shapes

    items = [shapes.make_item(i, seed=seed, split="train") for i in range(n)]
    truth = np.stack([np.asarray(shapes.render(spec, size=size)) for _, _, spec in items])
    return [im for im, _, _ in items], [c for _, c, _ in items], [s for _, _, s in items], truth


def checker_accuracy(images: np.ndarray, specs: list) -> float:
    """Share of images whose main shape reads back with every attribute its scene states."""
    from latentloom.evaluation.shape_checker import score

    return float(np.mean([all(score(im, spec).values()) for im, spec in zip(images, specs)]))


def through_vae(lows: list, vae: Any) -> list:
    """The 64-px PIL images after `vae`'s encode/decode round trip (posterior mode): how a latent
    base model's outputs look (softer edges), which is what a cascade's upscaler is given."""
    import torch
    from PIL import Image

    from latentloom.vae.codec import decode_latents, encode_images

    low = torch.tensor(np.stack([np.asarray(im) for im in lows])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        trip = decode_latents(vae, encode_images(vae, low, sample=False)).clamp(-1, 1)
    pixels = ((trip / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


def load_low_res_vae(source: str) -> Any:
    """A VAE folder, a model folder holding vae/, or "bundled:default"."""
    from pathlib import Path

    from latentloom.model_folder import find_vae_folder
    from latentloom.vae.loading import load_vae
    from latentloom.weights import bundled_model_dir, bundled_name

    name = bundled_name(source)
    folder = bundled_model_dir(name) if name is not None else Path(source)
    return load_vae(find_vae_folder(folder)).eval()


def inputs(n: int, *, seed: int, size: int, low_res_vae: Any = None) -> tuple[list, list[str], list, np.ndarray]:
    """`scenes`, with the 64-px inputs passed through `low_res_vae` when one is given."""
    lows, captions, specs, truth = scenes(n, seed=seed, size=size)
    return (lows if low_res_vae is None else through_vae(lows, low_res_vae)), captions, specs, truth


def evaluate(pipe: Any, *, n: int, seed: int = 1, steps: int | None = None, guidance: list[float | None],
             noise_levels: list[int], sampler: str | None = None, low_res_vae: Any = None) -> list[dict[str, Any]]:
    """One row per method: the classical resamplings, then the upscaler at each setting.
    low_res_vae: score enlargements of the inputs after this VAE's round trip (see `through_vae`)."""
    from PIL import Image

    size = 64 * pipe.vae_scale_factor
    lows, captions, specs, truth = inputs(n, seed=seed, size=size, low_res_vae=low_res_vae)
    band = edge_band(truth)
    rows = [{"method": "truth", **fidelity(truth, truth, band), "shapes": checker_accuracy(truth, specs)}]
    for name, method in (("nearest", Image.Resampling.NEAREST), ("bicubic", Image.Resampling.BICUBIC),
                         ("lanczos", Image.Resampling.LANCZOS)):
        x = np.stack([np.asarray(im.resize((size, size), method)) for im in lows])
        rows.append({"method": name, **fidelity(x, truth, band), "shapes": checker_accuracy(x, specs)})
    x = _torch_bicubic(lows, size)
    rows.append({"method": "bicubic a=-0.75 (torch; a residual model's base)", **fidelity(x, truth, band),
                 "shapes": checker_accuracy(x, specs)})
    for g in guidance:
        for level in noise_levels:
            start = time.perf_counter()
            out = pipe.upscale(captions, image=lows, num_inference_steps=steps, guidance_scale=g, noise_level=level,
                               sampler=sampler, seed=0, progress=False)
            x = np.stack([np.asarray(im) for im in out.images])
            recipe = out.recipes[0]
            label = (f"upscaler: guidance {recipe['guidance_scale']:g}, noise level {level}, "
                     f"{recipe['num_inference_steps']} steps")
            rows.append({"method": label, **fidelity(x, truth, band), "shapes": checker_accuracy(x, specs),
                         "seconds": time.perf_counter() - start, "images": x})
    return rows


def _torch_bicubic(lows: list, size: int) -> np.ndarray:
    """PIL's bicubic has a = -0.5, torch's (`upscale_residual.residual_base`) a = -0.75: sharper."""
    import torch

    from latentloom.pipelines.upscale_residual import residual_base

    low = torch.tensor(np.stack([np.asarray(im) for im in lows])).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = residual_base(low, (size, size)).permute(0, 2, 3, 1).numpy()
    return ((x / 2 + 0.5).clip(0, 1) * 255).round()


def format_table(rows: list[dict[str, Any]], *, n: int, size: int, through: str | None = None) -> str:
    via = "" if through is None else f" (inputs through the VAE of {through})"
    lines = [f"{n} unseen scenes, 64 -> {size} px{via}, against the true {size}-px render",
             f"{'method':52s} {'PSNR dB':>8s} {'edge PSNR':>10s} {'sharpness':>10s} {'shapes':>7s}"]
    for r in rows:
        lines.append(f"{r['method']:52s} {r['psnr']:8.2f} {r['edge_psnr']:10.2f} {r['sharpness']:10.3f} "
                     f"{r['shapes'] * 100:6.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:upscaler", help="an upscaler model (default: bundled:upscaler)")
    parser.add_argument("--scenes", type=int, default=32, help="unseen scenes (default: 32)")
    parser.add_argument("--seed", type=int, default=1, help="scene seed (default: 1; the bundled data used 0)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[None], help="guidance scales (default: the model's)")
    parser.add_argument("--noise-level", type=int, nargs="+", default=[20], help="noise levels (default: 20)")
    parser.add_argument("--sampler", default=None, help="sampler (default: the model's)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="weights dtype")
    parser.add_argument("--save", default=None, metavar="PNG",
                        help="also write a comparison strip (nearest | bicubic | upscaler | truth) of the first scenes")
    parser.add_argument("--through-vae", default=None, metavar="VAE",
                        help="first pass the 64-px inputs through this VAE's round trip, as a cascade's base "
                             "stage outputs look (a VAE or model folder, or bundled:default)")
    parser.add_argument("--strip-scenes", type=int, default=4, help="scenes in the strip (default: 4)")
    parser.add_argument("--zoom", type=int, default=1, help="enlarge the strip by this factor, nearest (default: 1)")
    args = parser.parse_args(argv)
    for name in ("scenes", "strip_scenes", "zoom"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    from latentloom.pipelines.loading import load_pipeline

    pipe = load_pipeline(args.model, device="cpu", dtype=args.dtype)
    vae = None if args.through_vae is None else load_low_res_vae(args.through_vae)
    rows = evaluate(pipe, n=args.scenes, seed=args.seed, steps=args.steps, guidance=args.guidance,
                    noise_levels=args.noise_level, sampler=args.sampler, low_res_vae=vae)
    size = 64 * pipe.vae_scale_factor
    print(format_table(rows, n=args.scenes, size=size, through=args.through_vae))
    if args.save:
        _save_strip(args.save, rows, seed=args.seed, size=size, scenes_shown=args.strip_scenes, zoom=args.zoom,
                    low_res_vae=vae)
    return 0


def _save_strip(path: str, rows: list[dict[str, Any]], *, seed: int, size: int, scenes_shown: int = 4,
                zoom: int = 1, low_res_vae: Any = None) -> None:
    """Rows of scenes; columns: the 64-px input (nearest), bicubic, the first upscaler setting, the truth."""
    from PIL import Image

    k = min(scenes_shown, len(rows[-1]["images"]))
    lows, _, _, truth = inputs(k, seed=seed, size=size, low_res_vae=low_res_vae)
    columns = [[np.asarray(im.resize((size, size), Image.Resampling.NEAREST)) for im in lows],
               [np.asarray(im.resize((size, size), Image.Resampling.BICUBIC)) for im in lows],
               list(next(r for r in rows if "images" in r)["images"][:k]), list(truth)]
    strip = np.concatenate([np.concatenate([col[i] for col in columns], 1) for i in range(k)], 0)
    image = Image.fromarray(strip.astype(np.uint8))
    image.resize((image.width * zoom, image.height * zoom), Image.Resampling.NEAREST).save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
