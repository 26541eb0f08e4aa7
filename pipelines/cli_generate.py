"""`latentloom generate PROMPT` and `latentloom generate --from image.png`."""
from __future__ import annotations

import argparse

from pathlib import Path

from latentloom.pipelines.cli_common import (
    CONTROL_FLAGS, SAMPLING_NAMES, SDXL_NAMES, add_control_arguments, add_model_arguments, add_sampling_arguments,
    add_sdxl_arguments, call_kwargs, control_kwargs, fail, load, load_model, report_saved,
)

# --vae-tiling choice -> the pipeline's vae_tiling argument
VAE_TILING = {"auto": None, "on": True, "off": False}

# recipe keys that `--from` passes back to the pipeline call
_REPLAYED = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "guidance_rescale", "sampler",
             "karras_sigmas", "seed", "clip_guidance_scale", "height", "width", "vae_tiling", "scheduler_config",
             "eta", "timesteps", "sigmas", "cache_interval", "token_merge_ratio", *SDXL_NAMES)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="make images from a prompt",
        description="Make images from a prompt, offline on the bundled model by default. Every PNG carries "
                    "its recipe; `--from IMAGE.png` makes the same image again. `--prompts FILE --output-dir DIR` "
                    "makes one image per prompt of a file (resumable; split across processes under "
                    "`accelerate launch --num_processes N -m latentloom generate ...`).",
    )
    parser.add_argument("prompt", nargs="*", default=[],
                        help="what to draw; several prompts make one image each (NAME-0.png, NAME-1.png, ...)")
    parser.add_argument("--from", dest="from_image", default=None, metavar="IMAGE.png",
                        help="re-create an image from the recipe in its PNG metadata (an AUTOMATIC1111 / Forge PNG: "
                             "the settings of its infotext; give --model)")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="a file of prompts: plain text, one per line (blank lines and # comments skipped), or "
                             ".jsonl with \"prompt\" and per-line negative_prompt, seed, num_inference_steps, "
                             "guidance_scale, height, width, sampler; needs --output-dir")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help="with --prompts: DIR/000042.png is the image of prompt 42 (000042-1.png its second "
                             "with --num-images 2); a rerun skips the images already there")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --prompts: make every image again, even where DIR holds it (or holds one "
                             "made with other options)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (per process)")
    parser.add_argument("--fast", action="store_true",
                        help="the bundled model in 4 consistency steps (bundled:fast: its distilled LCM-LoRA, "
                             "sampler lcm, guidance 1.5)")
    sdxl = add_sdxl_arguments(parser)
    sdxl.add_argument("--refiner", default=None, metavar="MODEL",
                      help="hand the last part of the schedule to this refiner (SDXL's ensemble of experts)")
    sdxl.add_argument("--refiner-start", type=float, default=None, metavar="F",
                      help="where the refiner takes over, as a fraction of the schedule (default: 0.8)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--vae-tiling", choices=sorted(VAE_TILING), default="auto",
                        help="decode the latents in overlapping VAE tiles: auto = only for images large enough "
                             "to need it (1024 px and up on Stable Diffusion; with --from, the recipe's choice), "
                             "on, off (default: auto)")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    add_control_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.fast:
        if args.model is not None:
            return fail(f"--fast is the bundled model's few-step variant (bundled:fast); it does not go with "
                        f"--model {args.model}")
        args.model = "bundled:fast"
    sdxl = call_kwargs(args, SDXL_NAMES)
    if args.threads is not None:
        if args.threads < 1:
            return fail(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.prompts is not None or args.output_dir is not None:
        if args.controlnet or args.control_image:
            return fail("--controlnet / --control-image make one image (or one prompt's); not with --prompts")
        return run_prompts_file(args)
    if args.overwrite:
        return fail("--overwrite goes with --prompts FILE --output-dir DIR")
    kwargs = {**call_kwargs(args, SAMPLING_NAMES + ("height", "width")), **sdxl}
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
        # a recipe read from an infotext (an A1111 / Forge PNG, or ours without its JSON chunk)
        from_infotext = "a1111_infotext" in recipe
        if from_infotext and recipe.get("sampler") is None and recipe.get("a1111_sampler") and "sampler" not in kwargs:
            from latentloom.samplers import SAMPLERS

            return fail(f"{args.from_image} was made with sampler {recipe['a1111_sampler']!r}, which latentloom "
                        f"does not have; pass --sampler, one of {sorted(SAMPLERS)}")
        if from_infotext and args.model is None and not recipe.get("latentloom_version"):
            return fail(f"{args.from_image} was made by AUTOMATIC1111 with model {recipe.get('model')!r} (hash "
                        f"{recipe.get('model_hash')!r}), which latentloom cannot find by name; pass --model with "
                        "that checkpoint's file or folder")
        replay = {k: recipe[k] for k in _REPLAYED if recipe.get(k) is not None}
        if "sampler" in kwargs and kwargs["sampler"] != recipe.get("sampler"):
            # the recorded scheduler settings were resolved for the recipe's sampler; another takes its own
            replay.pop("scheduler_config", None)
        elif "scheduler_config" not in replay and not from_infotext:
            # made before recipes recorded them: replay latentloom's old fill-ins (set once the model loads)
            legacy_schedule = True
        kwargs = {**replay, **{k: v for k, v in kwargs.items() if k != "num_images_per_prompt"}}
        if len(args.prompt) > 1:
            return fail("--from re-creates one image: give at most one prompt to replace its recipe's")
        if args.prompt:
            kwargs["prompt"] = args.prompt[0]
        if args.model is None:
            args.model = recipe.get("model")
        if args.refiner is None and recipe.get("refiner"):
            args.refiner = recipe["refiner"]
            if args.refiner_start is None:
                args.refiner_start = recipe.get("refiner_start")
        if args.dtype is None and recipe.get("dtype"):
            args.dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(recipe["dtype"])
        if recipe.get("controlnets"):
            problem = replay_control(recipe, args, args.from_image)
            if problem:
                return fail(problem)
    elif not args.prompt:
        return fail("give a prompt, or --from IMAGE.png")
    else:
        kwargs["prompt"] = args.prompt[0] if len(args.prompt) == 1 else list(args.prompt)
    try:
        pipe = load(args)
        kwargs.update(control_kwargs(args, pipe))
        if args.refiner is not None:
            from latentloom.pipelines.handoff import generate_with_refiner
            from latentloom.pipelines.loading import load_pipeline

            refiner = load_pipeline(args.refiner, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
            prompt, seed = kwargs.pop("prompt"), kwargs.pop("seed", None)
            out = generate_with_refiner(pipe, refiner, prompt, refiner_start=args.refiner_start or 0.8, seed=seed,
                                        progress=not args.no_progress, **kwargs)
            report_saved(out.save(args.output))
            return 0
        if legacy_schedule:
            kwargs["scheduler_config"] = pipe.schedule_config.legacy_settings()
        out = pipe(**kwargs, progress=not args.no_progress)
        report_saved(out.save(args.output))
    except (ValueError, TypeError, OSError) as err:  # OSError: a full disk, an output path that is a folder
        return fail(str(err))
    return 0


def run_prompts_file(args: argparse.Namespace) -> int:
    """--prompts FILE --output-dir DIR: the batch run of `pipelines.batch`, checked whole before any image."""
    if args.prompts is None or args.output_dir is None:
        return fail("--prompts FILE and --output-dir DIR go together")
    if args.prompt or args.from_image is not None:
        return fail("--prompts takes its prompts from the file: give no PROMPT and no --from")
    if args.output is not None:
        return fail("--output names one image; with --prompts the images go to --output-dir")
    if args.num_images_per_prompt < 1:
        return fail(f"--num-images must be >= 1, got {args.num_images_per_prompt}")
    from latentloom.pipelines import batch
    from latentloom.pipelines.prompts_file import read_prompts
    from latentloom.samplers import SAMPLERS

    out = Path(args.output_dir)
    try:
        entries = read_prompts(args.prompts)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--output-dir {str(out)!r} is a file, not a folder")
        names = [e.overrides.get("sampler", args.sampler) for e in entries]
        unknown = [(e, n) for e, n in zip(entries, names) if n is not None and n not in SAMPLERS]
        if unknown:
            entry, name = unknown[0]
            raise ValueError(f"{args.prompts}, line {entry.line}: unknown sampler {name!r}; expected one of "
                             f"{sorted(SAMPLERS)}")
        state = batch.process_state()
        if state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            batch.remove_stale_temporaries(out)
        state.wait_for_everyone()
        seed = batch.run_seed(out, args.seed, state)
        options = {**call_kwargs(args, SAMPLING_NAMES + ("height", "width")), **call_kwargs(args, SDXL_NAMES)}
        options = {k: v for k, v in options.items() if k not in ("seed", "num_images_per_prompt")}
        if args.refiner_start is not None:
            if args.refiner is None:
                raise ValueError("--refiner-start goes with --refiner MODEL")
            options["refiner_start"] = args.refiner_start
        tiling = VAE_TILING[getattr(args, "vae_tiling", "auto")]
        if tiling is not None:
            options["vae_tiling"] = tiling
        jobs = batch.plan(entries, seed=seed, per_prompt=args.num_images_per_prompt, options=options)
        pipe = load_model(args, device=getattr(state, "device", None))
        refiner = None
        if args.refiner is not None:
            from latentloom.pipelines.loading import load_pipeline

            refiner = load_pipeline(args.refiner, device=args.device or getattr(state, "device", None),
                                    dtype=args.dtype, tokenizer=args.tokenizer)
            options["refiner"] = refiner.name
        if state.is_main_process:
            batch.write_run_file(out, {"seed": seed, "prompts": str(args.prompts), "num_images": args.num_images_per_prompt,
                                        "options": options, "model": pipe.name, "model_hash": pipe.model_hash()})
        batch.generate_batch(pipe, jobs, out, state=state, progress=not args.no_progress, options=options,
                             overwrite=args.overwrite, refiner=refiner)
    except (ValueError, TypeError, OSError) as err:
        return fail(str(err))
    return 0


def replay_control(recipe: dict, args: argparse.Namespace, image: str) -> str | None:
    """Set the --controlnet / --control-* flags the user left out from the recipe's ControlNets; the
    message of what is missing (a control image gone or changed), else None."""
    from latentloom.pipelines.control_maps import file_sha256

    entries = recipe["controlnets"]
    if args.controlnet is None:
        args.controlnet = [e["model"] for e in entries]
    if args.control_image is None:
        args.control_image = []
        for k, e in enumerate(entries):
            path = e.get("image")
            if not path:
                return (f"{image} was made with control image {k} given in memory (no path recorded); pass "
                        "--control-image for each ControlNet")
            if not Path(path).is_file():
                return f"{image} needs its control image {path}, which is missing; pass --control-image FILE"
            if e.get("image_sha256") and file_sha256(path) != e["image_sha256"]:
                return (f"control image {path} changed since {image} was made (sha256 {file_sha256(path)[:12]}..., "
                        f"recorded {e['image_sha256'][:12]}...); pass --control-image to use it anyway")
            args.control_image.append(path)
    for flag, key in zip((f for f, _ in CONTROL_FLAGS), ("scale", "start", "end")):
        if getattr(args, flag) is None:
            setattr(args, flag, [float(e[key]) for e in entries])
    if args.guess_mode is None and recipe.get("guess_mode"):
        args.guess_mode = True
    return None
