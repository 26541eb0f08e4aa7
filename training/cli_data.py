"""`latentloom make-shapes`: write the bundled synthetic shapes dataset to a folder.

No torch here: the generator needs only PIL, so the command starts fast.
"""
from __future__ import annotations

import argparse
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-shapes",
        help="write the synthetic shapes dataset (64x64 PNGs by default + metadata.jsonl)",
        description="Write N captioned images of simple shapes (PNG + metadata.jsonl; 64x64 unless --size), "
        "deterministic in (seed, split). The heldout split holds color/shape/position "
        "combinations that the train split never shows.",
    )
    p.add_argument("--out", required=True, help="folder to write into (must not already hold a metadata.jsonl)")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--split", choices=("train", "heldout"), default="train", help="which split (default train)")
    p.add_argument(
        "--size", type=int, default=64,
        help="image side in pixels, a multiple of 64 in [64, 1024] (default 64); the same seed "
        "gives the same scenes and captions at every size",
    )
    p.add_argument(
        "--control-maps", action="store_true",
        help="also write a ControlNet control map per image: the shapes' silhouettes in white on black, "
        "in conditioning/NAME.png, named by each row's conditioning_file_name (diffusers' train_controlnet layout)",
    )
    p.add_argument(
        "--conflict-captions", type=float, default=0.0, metavar="FRACTION",
        help="with --control-maps: re-caption this fraction of the one-shape images with another position than "
        "the map's, so a ControlNet trained on it learns that the map wins (default 0: every caption matches)",
    )
    p.set_defaults(func=_make_shapes)


def _make_shapes(args: argparse.Namespace) -> int:
    from latentloom.synthetic.shapes import write_dataset

    start = time.perf_counter()
    try:
        out = write_dataset(args.out, args.n, seed=args.seed, split=args.split, size=args.size,
                            control_maps=args.control_maps, conflict_captions=args.conflict_captions)
    except (ValueError, FileExistsError) as e:
        print(f"latentloom make-shapes: error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    maps = " with control maps" if args.control_maps else ""
    if args.conflict_captions:
        maps += f" ({args.conflict_captions:g} of the one-shape captions name another position)"
    rate = args.n / max(seconds, 1e-9)
    print(f"wrote {args.n} {args.split} images ({args.size}x{args.size}){maps} to {out} in {seconds:.1f} s "
          f"({rate:.0f} images/s)")
    return 0
