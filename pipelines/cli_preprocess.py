"""`latentloom preprocess KIND IMAGE -o MAP.png`: make a control map for ControlNet from an image.

No torch, at module level or in the handler: the preprocessors need only PIL, numpy and OpenCV.
"""
from __future__ import annotations

import argparse
import sys

from latentloom.pipelines.control_maps import CANNY_DEFAULTS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="make a ControlNet control map from an image (canny edges)",
        description="Write a control map (PNG, the input's size) with the preprocessor, its settings and the "
        "source image's absolute path and SHA-256 in its metadata.",
    )
    kinds = p.add_subparsers(dest="preprocessor", metavar="KIND", required=True)
    c = kinds.add_parser(
        "canny", help="Canny edges, white on black (OpenCV; pip install 'latentloom[control]')",
        description="Canny edges as the ControlNet annotator makes them (cv2.Canny on the RGB image).",
    )
    c.add_argument("image", metavar="IMAGE", help="the source image")
    c.add_argument("--output", "-o", required=True, help="the map's path, ending in .png (overwritten if it exists)")
    c.add_argument("--low", type=int, default=CANNY_DEFAULTS[0],
                   help=f"lower hysteresis threshold, 0..255 (default {CANNY_DEFAULTS[0]})")
    c.add_argument("--high", type=int, default=CANNY_DEFAULTS[1],
                   help=f"upper hysteresis threshold, 0..255, >= --low (default {CANNY_DEFAULTS[1]})")
    c.set_defaults(func=_canny)


def _fail(message: str) -> int:
    print(f"latentloom preprocess: error: {message}", file=sys.stderr)
    return 2


def _canny(args: argparse.Namespace) -> int:
    from latentloom.pipelines.control_maps import canny, check_thresholds, control_recipe
    from latentloom.pipelines.metadata import save_png

    if not args.output.lower().endswith(".png"):
        return _fail(f"--output must end in .png (the map carries its recipe in PNG text), got {args.output!r}")
    try:
        low, high = check_thresholds(args.low, args.high)
        edges = canny(args.image, low=low, high=high)
        recipe = control_recipe("canny", args.image, low_threshold=low, high_threshold=high)
    except (ValueError, FileNotFoundError, ImportError) as e:
        return _fail(str(e))
    save_png(edges, args.output, recipe)
    print(f"wrote {args.output} ({edges.width}x{edges.height}, canny {low}/{high})")
    return 0
