"""End to end: diffusers' StableDiffusionPipeline vs latentloom's Pipeline on identical random weights.

The benchmark lives in `latentloom.benchmarking.pipeline_bench` (`latentloom bench pipeline`);
this script is the same command:

    .venv/bin/python benchmarks/pipeline.py --resolution 512            # same settings (bf16-cl) + defaults
    .venv/bin/python benchmarks/pipeline.py --preset tiny --modes fp32,bf16-cl
"""
from __future__ import annotations

import sys

from latentloom.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "pipeline", *sys.argv[1:]]))
