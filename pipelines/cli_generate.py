"""`latentloom generate PROMPT` and `latentloom generate --from image.png`."""
from __future__ import annotations

import argparse

from latentloom.pipelines.cli_common import (
    SAMPLING_NAMES, add_model_arguments, add_sampling_arguments, call_kwargs, fail, load, report_saved,
)

# --vae-tiling choice -> the pipeline's vae_tiling argument
VAE_TILING = {"auto": None, "on": True, "off": False}

# recipe keys that `--from` passes back to the pipeline call
_REPLAYED = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "guidance_rescale", "sampler",
             "karras_sigmas", "seed", "clip_guidance_scale", "height", "width", "vae_tiling", "scheduler_config")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="make images from a prompt",
        description="Make images from a prompt, offline on the bundled model by default. Every PNG carries "
                    "its recipe; `--from IMAGE.png` makes the same image again.",
    )
    parser.add_argument("prompt", nargs="*", default=[],
                        help="what to draw; several prompts make one image each (NAME-0.png, NAME-1.png, ...)")
    parser.add_argument("--from", dest="from_image", default=None, metavar="IMAGE.png",
                        help="re-create an image from the recipe in its PNG metadata")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--vae-tiling", choices=sorted(VAE_TILING), default="auto",
                        help="decode the latents in overlapping VAE tiles: auto = only for images large enough "
                             "to need it (1024 px and up on Stable Diffusion; with --from, the recipe's choice), "
                             "on, off (default: auto)")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kwargs = call_kwargs(args, SAMPLING_NAMES + ("height", "width"))
    tiling = VAE_TILING[getattr(args, "vae_tiling", "auto")]
    legacy_schedule = False
    if tiling is not None:
        kwargs["vae_tiling"] = tiling
    if args.from_image is not None:
        from latentloom.pipelines.metadata import read_metadata

        try:
            recipe = read_metadata(args.from_image)
        except (FileNotFoundError, ValueError) as err:
            return fail(str(err))
        if recipe.get("task", "txt2img") != "txt2img":
            return fail(f"{args.from_image} was made by {recipe['task']}, not generate; use that command")
        if recipe.get("seed") is None:
            return fail(f"{args.from_image} was made with a caller's generator, so its seed is unknown")
        replay = {k: recipe[k] for k in _REPLAYED if recipe.get(k) is not None}
        if "sampler" in kwargs and kwargs["sampler"] != recipe.get("sampler"):
            # the recorded scheduler settings were resolved for the recipe's sampler; another takes its own
            replay.pop("scheduler_config", None)
        elif "scheduler_config" not in replay:
            # made before recipes recorded them: replay latentloom's old fill-ins (set once the model loads)
            legacy_schedule = True
        kwargs = {**replay, **{k: v for k, v in kwargs.items() if k != "num_images_per_prompt"}}
        if len(args.prompt) > 1:
            return fail("--from re-creates one image: give at most one prompt to replace its recipe's")
        if args.prompt:
            kwargs["prompt"] = args.prompt[0]
        if args.model is None:
            args.model = recipe.get("model")
        if args.dtype is None and recipe.get("dtype"):
            args.dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(recipe["dtype"])
    elif not args.prompt:
        return fail("give a prompt, or --from IMAGE.png")
    else:
        kwargs["prompt"] = args.prompt[0] if len(args.prompt) == 1 else list(args.prompt)
    try:
        pipe = load(args)
        if legacy_schedule:
            kwargs["scheduler_config"] = pipe.schedule_config.legacy_settings()
        out = pipe(**kwargs, progress=not args.no_progress)
        report_saved(out.save(args.output))
    except (ValueError, TypeError, OSError) as err:  # OSError: a full disk, an output path that is a folder
        return fail(str(err))
    return 0
