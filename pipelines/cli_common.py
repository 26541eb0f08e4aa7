"""Command-line arguments shared by generate / img2img / inpaint / upscale.

No torch import at module level: `latentloom --help` must stay fast.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

BUNDLED = "bundled:default"
DEFAULT_OUTPUT = "latentloom.png"


def add_model_arguments(parser: argparse.ArgumentParser, *, default: str = BUNDLED) -> None:
    group = parser.add_argument_group("model")
    # --model stays None when not given (generate --from then reads the recipe's model)
    parser.set_defaults(default_model=default)
    group.add_argument("--model", default=None,
                       help="a diffusers or latentloom folder, a .safetensors SD checkpoint, a hub id "
                            f"(online only), or bundled:default / bundled:upscaler / bundled:fast (default: {default})")
    group.add_argument("--tokenizer", default=None,
                       help="folder with CLIP's vocab.json + merges.txt, for single-file checkpoints")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    group.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                       help="weights dtype (default: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the UNet: faster steps after a slow first call (worth it for many images)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--negative-prompt", default=None)
    group.add_argument("--steps", type=int, default=None, dest="num_inference_steps",
                       help="denoising steps (default: the model's)")
    group.add_argument("--guidance", type=float, default=None, dest="guidance_scale",
                       help="classifier-free guidance scale (default: the model's)")
    # None, not 0.0: an unset flag must not override the value `generate --from` reads from a recipe
    group.add_argument("--guidance-rescale", type=float, default=None,
                       help="rescale guided predictions toward the conditional one's std, 0..1 (default: 0)")
    group.add_argument("--sampler", default=None,
                       help="ddpm, ddim, euler, euler_a, heun, dpmpp_2m, dpmpp_2m_sde, unipc, lcm (LCM models and "
                            "LoRAs), tcd (TCD LoRAs)")
    group.add_argument("--karras", action="store_true", default=None, dest="karras_sigmas",
                       help="Karras noise levels")
    group.add_argument("--timestep-spacing", default=None, choices=("leading", "trailing", "linspace"),
                       help="override the model's spacing of the steps (Turbo-style models: trailing)")
    group.add_argument("--timesteps", type=_numbers(int), default=None, metavar="T1,T2,...",
                       help="your own descending step timesteps, e.g. 999,759,499,259 (sets --steps)")
    group.add_argument("--sigmas", type=_numbers(float), default=None, metavar="S1,S2,...",
                       help="your own descending noise levels (sets --steps)")
    group.add_argument("--eta", type=float, default=None, help="tcd: its gamma, 0..1 (default 0.3)")
    group.add_argument("--cache-interval", type=int, default=None, metavar="N",
                       help="step caching (DeepCache): the whole UNet every N sampler steps, its shallow branch "
                            "in between; faster, slightly different images (default: 1, exact)")
    group.add_argument("--token-merge-ratio", type=float, default=None, metavar="R",
                       help="token merging (ToMe): self-attention at the highest resolution on (1 - R) of the "
                            "tokens, R in [0, 1); pays at large sizes (768 px and up), slightly different images "
                            "(default: 0, exact)")
    group.add_argument("--seed", type=int, default=None, help="image i uses seed + i (default: random)")
    group.add_argument("--num-images", type=int, default=1, dest="num_images_per_prompt")
    group.add_argument("--clip-guidance", type=float, default=None, dest="clip_guidance_scale",
                       help="CLIP guidance scale (needs a model with an image-text model; default: 0)")
    group.add_argument("--output", "-o", default=None,
                       help=f"PNG path; several images become NAME-0.png, NAME-1.png, ... (default: {DEFAULT_OUTPUT})")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def _numbers(kind: type):
    """argparse type: a comma-separated list of `kind` numbers."""
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}")
        return values
    return parse


# SDXL's second prompts and micro-conditioning (pipeline arguments, recorded in recipes)
SDXL_NAMES = ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size",
              "negative_original_size", "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score",
              "negative_aesthetic_score")


def add_sdxl_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--prompt-2 / --negative-prompt-2 and the micro-conditioning, for SDXL models (others refuse them)."""
    group = parser.add_argument_group("SDXL")
    group.add_argument("--prompt-2", default=None, help="the prompt for the second text encoder (default: PROMPT)")
    group.add_argument("--negative-prompt-2", default=None)
    for name, meaning in (("original-size", "H W"), ("crops-coords-top-left", "TOP LEFT"), ("target-size", "H W")):
        group.add_argument(f"--{name}", type=int, nargs=2, default=None, metavar=tuple(meaning.split()),
                           help="micro-conditioning (default: the output size; crops 0 0)")
        group.add_argument(f"--negative-{name}", type=int, nargs=2, default=None, metavar=tuple(meaning.split()))
    group.add_argument("--aesthetic-score", type=float, default=None, help="refiners: the score asked for (default 6)")
    group.add_argument("--negative-aesthetic-score", type=float, default=None, help="refiners (default 2.5)")
    return group


def add_control_arguments(parser: argparse.ArgumentParser) -> None:
    """--controlnet PATH --control-image FILE [--control-scale S --control-start A --control-end B], repeated
    once per ControlNet in order, and --guess-mode (generate, img2img, inpaint)."""
    group = parser.add_argument_group("ControlNet (repeat the set once per ControlNet, in order)")
    group.add_argument("--controlnet", action="append", default=None, metavar="PATH",
                       help="a diffusers ControlNetModel folder, an original .safetensors file, or "
                            "bundled:controlnet (the bundled model's, for silhouette maps; used by default when the "
                            "bundled model gets --control-image); a model folder saved with its ControlNet brings it "
                            "along")
    group.add_argument("--control-image", action="append", default=None, metavar="FILE",
                       help="the control map for that ControlNet, of the output's size (not resized)")
    group.add_argument("--control-scale", action="append", type=float, default=None, metavar="S",
                       help="how strongly it steers (one value for all, or one per ControlNet; default as diffusers': "
                            "1.0 for generate, 0.8 for img2img, 0.5 for inpaint)")
    group.add_argument("--control-start", action="append", type=float, default=None, metavar="A",
                       help="fraction of the steps where it starts acting (default 0.0)")
    group.add_argument("--control-end", action="append", type=float, default=None, metavar="B",
                       help="fraction of the steps where it stops acting (default 1.0)")
    group.add_argument("--guess-mode", action="store_true", default=None,
                       help="the ControlNets steer the conditional half only (for prompts that say little)")


# --control-* flag -> the pipeline argument it sets
CONTROL_FLAGS = (("control_scale", "controlnet_conditioning_scale"), ("control_start", "control_guidance_start"),
                 ("control_end", "control_guidance_end"))


def control_kwargs(args: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    """The pipeline's control arguments from the --control-* flags, checked against its ControlNets."""
    n = len(getattr(pipe, "controlnets", []))
    images = getattr(args, "control_image", None) or []
    given = [f"--{flag.replace('_', '-')}" for flag, _ in CONTROL_FLAGS if getattr(args, flag, None)]
    given += ["--control-image"] * bool(images) + ["--guess-mode"] * bool(getattr(args, "guess_mode", None))
    if not n:
        if given:
            raise ValueError(f"{given[0]} needs a ControlNet: give --controlnet PATH (or a model folder saved with "
                             "one)")
        return {}
    if len(images) != n:
        raise ValueError(f"got {len(images)} --control-image for {n} ControlNet(s); give one per ControlNet, in order")
    out: dict[str, Any] = {"control_image": images[0] if n == 1 else list(images)}
    for flag, name in CONTROL_FLAGS:
        values = getattr(args, flag, None)
        if values is None:
            continue
        if len(values) not in (1, n):
            raise ValueError(f"got {len(values)} --{flag.replace('_', '-')} for {n} ControlNet(s); give one for all, "
                             "or one per ControlNet")
        out[name] = values[0] if len(values) == 1 else list(values)
    if getattr(args, "guess_mode", None):
        out["guess_mode"] = True
    return out


def call_kwargs(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The pipeline keyword arguments the user set (None means: the model's default)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


SAMPLING_NAMES = ("negative_prompt", "num_inference_steps", "guidance_scale", "guidance_rescale", "sampler",
                  "karras_sigmas", "seed", "num_images_per_prompt", "clip_guidance_scale", "timestep_spacing",
                  "timesteps", "sigmas", "eta", "cache_interval", "token_merge_ratio")


def check_output(path: str) -> None:
    """The output must be a .png file path: checked before the model loads, so a typo does not
    cost a whole generation."""
    from pathlib import Path

    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"images are written as PNG; give an --output ending in .png, not {path!r}")
    if Path(path).is_dir():
        raise ValueError(f"--output {path!r} is a folder; give a file name ending in .png")


def load(args: argparse.Namespace):
    """The model for a command that writes args.output (checked first: a typo must not cost a generation)."""
    if args.output is None:
        args.output = DEFAULT_OUTPUT
    check_output(args.output)
    return load_model(args)


def load_model(args: argparse.Namespace, *, device: Any = None):
    from latentloom.pipelines.loading import load_pipeline
    from latentloom.weights import BUNDLED_CONTROLNET, CONTROLNET_BASES

    model = args.model if args.model is not None else getattr(args, "default_model", BUNDLED)
    if (getattr(args, "control_image", None) and getattr(args, "controlnet", None) is None
            and model in {f"bundled:{name}" for name in CONTROLNET_BASES}):
        args.controlnet = [BUNDLED_CONTROLNET]  # the bundled model's own ControlNet (the recipe names it)
    return load_pipeline(model, device=args.device or device, dtype=args.dtype, tokenizer=args.tokenizer,
                         compile=getattr(args, "compile", False), controlnet=getattr(args, "controlnet", None))


def report_saved(paths) -> None:
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)


def fail(message: str) -> int:
    print(f"latentloom: error: {message}", file=sys.stderr)
    return 2
