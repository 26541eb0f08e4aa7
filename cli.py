"""The `latentloom` command line: one entry point, one subcommand per job.

Each subcommand's arguments are declared by a ``register(subparsers)`` function in the
module that owns the work (listed in ``_SUBCOMMANDS``). Those modules must not import
torch at module level: the heavy imports happen inside the handler, so `latentloom
--help` and `--version` stay fast (tests/test_package.py checks this).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from latentloom import __version__

# Each subcommand is "module:function": the function takes the argparse subparsers object, adds one
# parser and sets `func` (args -> exit code); the module is imported only when the CLI is built.
_SUBCOMMANDS: list[str] = [
    "latentloom.pipelines.cli_generate:register",
    "latentloom.pipelines.cli_edit:register_img2img",
    "latentloom.pipelines.cli_edit:register_inpaint",
    "latentloom.pipelines.cli_edit:register_upscale",
    "latentloom.pipelines.cli_preprocess:register",
    "latentloom.training.cli_data:register",
    "latentloom.training.cli_train:register",
    "latentloom.evaluation.cli_eval:register",
    "latentloom.benchmarking.cli_bench:register",
    "latentloom.serve.cli_serve:register",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentloom",
        description="Text-to-image latent diffusion. Runs offline on the bundled model; "
        "loads Stable Diffusion weights (diffusers folder or single .safetensors).",
    )
    parser.add_argument("--version", action="version", version=f"latentloom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for target in _SUBCOMMANDS:
        module_name, func_name = target.split(":")
        getattr(importlib.import_module(module_name), func_name)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
