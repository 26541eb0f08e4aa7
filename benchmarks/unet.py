"""latentloom UNet vs diffusers UNet2DConditionModel: same random SD-sized weights, one process.

The benchmark lives in `latentloom.benchmarking.unet_bench` (so `latentloom bench unet`
works from an installed wheel); this script is the same command:

    .venv/bin/python benchmarks/unet.py                      # SD 1.5, 64x64, batch 2, fp32 and bf16-cl
    .venv/bin/python benchmarks/unet.py --modes bf16-cl --runs 5 --profile
    .venv/bin/python benchmarks/unet.py --modes bf16-cl --compile
"""
from __future__ import annotations

import sys

from latentloom.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "unet", *sys.argv[1:]]))
