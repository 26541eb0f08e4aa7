"""PSNR of token-merged (`token_merge_ratio=r`, ToMe) vs exact images on the bundled model, same held-out
prompts and seeds: `python benchmarks/token_merge_psnr.py 0.3 0.5`. The bundled model makes 64 px images
(8x8 latents; its first transformers are at 4x4 tokens), far too small for merging to save time: this
measures what merging costs in quality, not what it gains in speed (`latentloom bench unet
--token-merge-ratio 0.3,0.5` on SD-1.5 shapes does that)."""
import sys
import time

import numpy as np
import torch

import latentloom
from latentloom.evaluation.prompt_following import domain_prompts

torch.set_num_threads(1)
pipe = latentloom.load_pipeline()
prompts = [text for text, _ in domain_prompts(16, seed=1, split="heldout")]
ratios = [float(r) for r in sys.argv[1:]] or [0.3, 0.5]


def make(r: float):
    t0 = time.perf_counter()
    out = pipe(prompts, seed=0, token_merge_ratio=r, output_type="np", progress=False).images  # (16, H, W, 3)
    return out, time.perf_counter() - t0


exact, t_exact = make(0.0)
d = pipe.defaults
print(f"bundled model ({pipe.name}), {len(prompts)} held-out prompts, seeds 0..15, {d.sampler} "
      f"{d.num_inference_steps} steps, guidance {d.guidance_scale}, {exact.shape[1]}x{exact.shape[2]}; "
      f"exact: {t_exact:.1f} s")
for r in ratios:
    merged, t = make(r)
    mse = ((merged.astype(np.float64) - exact) ** 2).reshape(len(prompts), -1).mean(axis=1)
    psnr = 10 * np.log10(1.0 / np.maximum(mse, 1e-20))  # pixels in [0, 1]
    print(f"token_merge_ratio={r:g}: PSNR vs exact mean {psnr.mean():.1f} dB, min {psnr.min():.1f} dB, median "
          f"{np.median(psnr):.1f} dB; max |pixel diff| {np.abs(merged - exact).max():.3f}; {t:.1f} s "
          f"({t_exact / t:.2f}x)")
