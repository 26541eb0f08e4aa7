"""PSNR of step-cached (`cache_interval=N`) vs exact images on the bundled model, same held-out prompts and
seeds: `python benchmarks/step_cache_psnr.py 2 3 5` (the README's step-caching table)."""
import sys
import time

import numpy as np
import torch

import latentloom
from latentloom.evaluation.prompt_following import domain_prompts

torch.set_num_threads(1)
pipe = latentloom.load_pipeline()
prompts = [text for text, _ in domain_prompts(16, seed=1, split="heldout")]
intervals = [int(n) for n in sys.argv[1:]] or [2, 3, 5]


def make(n):
    t0 = time.perf_counter()
    out = pipe(prompts, seed=0, cache_interval=n, output_type="np", progress=False).images  # (16, H, W, 3) in [0, 1]
    return out, time.perf_counter() - t0


exact, t_exact = make(1)
d = pipe.defaults
print(f"bundled model ({pipe.name}), {len(prompts)} held-out prompts, seeds 0..15, {d.sampler} {d.num_inference_steps} "
      f"steps, guidance {d.guidance_scale}, {exact.shape[1]}x{exact.shape[2]}; exact: {t_exact:.1f} s")
for n in intervals:
    cached, t = make(n)
    mse = ((cached.astype(np.float64) - exact) ** 2).reshape(len(prompts), -1).mean(axis=1)
    psnr = 10 * np.log10(1.0 / np.maximum(mse, 1e-20))
    print(f"cache_interval={n}: PSNR vs exact mean {psnr.mean():.1f} dB, min {psnr.min():.1f} dB, median "
          f"{np.median(psnr):.1f} dB; max |pixel diff| {np.abs(cached - exact).max():.3f}; {t:.1f} s "
          f"({t_exact / t:.2f}x)")
