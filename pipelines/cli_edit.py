"""`latentloom img2img | inpaint | upscale`: the editing pipelines on the command line.

Same model and sampling options as `generate`; every PNG carries its recipe (task, strength or
noise level, and a hash of the input image and mask). No torch import at module level.
"""
from __future__ import annotations

import argparse

from latentloom.pipelines.cli_common import (
    BUNDLED, SAMPLING_NAMES, SDXL_NAMES, add_control_arguments, add_model_arguments, add_sampling_arguments,
    add_sdxl_arguments, call_kwargs, control_kwargs, fail, load, report_saved,
)

_NAMES = tuple(n for n in SAMPLING_NAMES if n != "clip_guidance_scale")  # CLIP guidance: generate only


def _parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text + ". Writes PNGs with their recipe.")
    parser.add_argument("prompt", help="what the result should show")
    parser.add_argument("--image", required=True, metavar="IMAGE", help="the input image (any format PIL reads)")
    return parser


def _finish(parser: argparse.ArgumentParser, run, *, model: str = BUNDLED, sdxl: bool = True) -> None:
    add_model_arguments(parser, default=model)
    add_sampling_arguments(parser)
    if sdxl:  # img2img and inpaint take SDXL models' options and ControlNets; the upscaler neither
        add_sdxl_arguments(parser)
        add_control_arguments(parser)
    parser.set_defaults(func=run)


def register_img2img(subparsers) -> None:
    parser = _parser(subparsers, "img2img", "re-draw an image following a prompt")
    parser.add_argument("--strength", type=float, default=0.8,
                        help="0..1, how far the result may move from the image (default 0.8)")
    _finish(parser, run_img2img)


def register_inpaint(subparsers) -> None:
    parser = _parser(subparsers, "inpaint", "repaint the white part of a mask")
    parser.add_argument("--mask", required=True, metavar="MASK",
                        help="mask image of the image's size: white = repaint, black = keep")
    parser.add_argument("--strength", type=float, default=1.0, help="0..1 (default 1: from pure noise)")
    parser.add_argument("--no-paste-back", action="store_false", dest="paste_back",
                        help="return the decoded image as is instead of pasting the result onto the original")
    parser.add_argument("--feather", type=int, default=None,
                        help="pixels of blending inside the mask's edge (default: the VAE factor)")
    _finish(parser, run_inpaint)


def register_upscale(subparsers) -> None:
    parser = _parser(subparsers, "upscale", "enlarge an image with an x4-upscaler-style model")
    parser.add_argument("--noise-level", type=int, default=20,
                        help="noise added to the low-res image before the model sees it (default 20)")
    _finish(parser, run_upscale, model="bundled:upscaler", sdxl=False)


def _open(path: str, what: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise FileNotFoundError(f"no such {what}: {path}") from None
    except OSError as err:
        raise ValueError(f"{path} is not an image PIL can read: {err}") from err


def _run(args: argparse.Namespace, method: str, **task: object) -> int:
    if args.clip_guidance_scale:
        return fail(f"--clip-guidance is available for generate only, not {method}")
    try:
        kwargs = {**call_kwargs(args, _NAMES + SDXL_NAMES), **task, "image": _open(args.image, "image")}
        if "mask_image" in kwargs:
            kwargs["mask_image"] = _open(kwargs["mask_image"], "mask")
        pipe = load(args)
        kwargs.update(control_kwargs(args, pipe))
        out = getattr(pipe, method)(args.prompt, **kwargs, progress=not args.no_progress)
        report_saved(out.save(args.output))
    except (ValueError, TypeError, OSError) as err:  # OSError: a full disk, an output path that is a folder
        return fail(str(err))
    return 0


def run_img2img(args: argparse.Namespace) -> int:
    return _run(args, "img2img", strength=args.strength)


def run_inpaint(args: argparse.Namespace) -> int:
    return _run(args, "inpaint", mask_image=args.mask, strength=args.strength, paste_back=args.paste_back,
                **({"feather": args.feather} if args.feather is not None else {}))


def run_upscale(args: argparse.Namespace) -> int:
    return _run(args, "upscale", noise_level=args.noise_level)
