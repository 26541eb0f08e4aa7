"""`latentloom bench TARGET`: measure latentloom against diffusers on identical weights.

Each target is a module with `add_arguments(parser)` and `run(args) -> list[Table]`, imported
only when its target runs (so `latentloom --help` stays light: no torch here). The tables
print as markdown, ready for the README, each noting the command that made it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

# target -> module; a new target is one line here. A module serving two targets (startup_bench:
# bundled and startup) reads `args.target`.
TARGETS: dict[str, str] = {
    "unet": "latentloom.benchmarking.unet_bench",
    "pipeline": "latentloom.benchmarking.pipeline_bench",
    "memory": "latentloom.benchmarking.memory_bench",
    "bundled": "latentloom.benchmarking.startup_bench",
    "startup": "latentloom.benchmarking.startup_bench",
}
HELP = {
    "unet": "UNet forward: median s, ratio, peak RSS growth, max difference (eager or torch.compile)",
    "pipeline": "end to end: same settings (s/step, s/image, pixel difference) and each library's defaults",
    "memory": "peak memory at 512 and 1024 (VAE tiling, chunked attention) against diffusers",
    "bundled": "the bundled model end to end",
    "startup": "CLI cold start to the first bundled image",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="measure latentloom against diffusers on identical weights",
                                   description=__doc__.splitlines()[0])
    targets = parser.add_subparsers(dest="target", metavar="TARGET")
    for name, module_name in TARGETS.items():
        sub = targets.add_parser(name, help=HELP.get(name), description=HELP.get(name))
        add_common_arguments(sub)
        importlib.import_module(module_name).add_arguments(sub)
        sub.set_defaults(func=_run, bench_module=module_name, bench_parser=sub)
    parser.set_defaults(func=lambda args: _no_target(parser))


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the ratio then measures the work, not the scheduling; "
                             "0 leaves torch's default)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the tables to PATH as JSON")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per measurement (default: per target)")
    parser.add_argument("--preset", default=None, help="model size: sd15 (default) or tiny (seconds, for tests)")


def _no_target(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run: the target and every option not at its default."""
    parser: argparse.ArgumentParser = args.bench_parser
    words = ["latentloom", "bench", args.target]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        option = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            words.append(option)
        else:
            words += [option, str(value)]
    return shlex.join(words)


def _run(args: argparse.Namespace) -> int:
    from latentloom.benchmarking.measure import report

    if args.threads < 0:
        args.bench_parser.error(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    if args.json is not None:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            args.bench_parser.error(f"--json {args.json!r}: folder {folder!r} does not exist")
    module = importlib.import_module(args.bench_module)
    check = getattr(module, "check_args", None)
    if check is not None:  # bad values are usage errors, found before any model is built
        try:
            check(args)
        except ValueError as err:
            args.bench_parser.error(str(err))
    command = command_line(args)
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        tables = module.run(args)
    finally:  # an in-process caller (a test, a notebook) gets its thread count back
        torch.set_num_threads(threads)
    report(tables, command=command, json_path=args.json)
    if args.json is not None:
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
