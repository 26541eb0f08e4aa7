"""`latentloom train`: train or fine-tune the UNet, the VAE, the image-text model or the upscaler.

No torch at import time (the CLI's --help stays fast); the work happens in `run`.
`python -m latentloom.training ARGS` (hence `accelerate launch -m latentloom.training ARGS`)
takes the same arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from latentloom.training.config import (
    BETA_SCHEDULES, CROPS, LR_SCHEDULES, MIXED_PRECISION, MODELS, PREDICTION_TYPES, TrainConfig,
)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}

EPILOG = """\
The same OUT collects every stage of a model:
  latentloom train --model vae  --data DATA --output OUT          # OUT/vae (scaling factor from the data)
  latentloom train --model unet --data DATA --output OUT --ema    # uses OUT/vae; writes OUT/unet, scheduler, model_index.json
  latentloom train --model clip --data DATA --output OUT          # OUT/clip (image-text model for CLIP guidance)
  latentloom train --model upscaler --data DATA --output OUT --resolution 128 --low-resolution 64
Fine-tune: --pretrained MODEL_FOLDER (add --lora-rank 8 to train LoRA adapters only).
Few-step: --model lcm --pretrained TEACHER distils it into an LCM model (or, with --lora-rank, an LCM-LoRA).
ControlNet: --model controlnet --pretrained MODEL --data DATA (metadata.jsonl with conditioning_file_name,
  e.g. `latentloom make-shapes --control-maps`) trains a ControlNet for the frozen MODEL into OUT
  (a ControlNetModel folder: load_pipeline(MODEL, controlnet=OUT)).
Resume: --resume latest (or a checkpoint folder); checkpoints live in OUT/checkpoints/<model>/.
Several processes: accelerate launch [--cpu] --num_processes N -m latentloom.training ARGS
"""


def _add(parser: argparse.ArgumentParser, flag: str, *, help: str, **kwargs: Any) -> None:
    dest = flag.lstrip("-").replace("-", "_")
    dest = kwargs.pop("dest", dest)
    default = _DEFAULTS.get(dest)
    shown = f" (default: {default})" if default is not None and kwargs.get("action") not in ("store_true", "store_false") else ""
    # SUPPRESS: only what the user typed reaches TrainConfig, which owns the defaults.
    parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=help + shown, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what to train")
    _add(g, "--model", choices=MODELS, help="which network")
    _add(g, "--data", metavar="FOLDER", help="images + .txt captions, or images + metadata.jsonl")
    _add(g, "--output", metavar="OUT", help="model folder to write (checkpoints in OUT/checkpoints)")
    _add(g, "--config", dest="model_config", metavar="JSON",
         help="the model's architecture for training from scratch (UNetConfig / AutoencoderKL / ImageTextConfig JSON)")
    _add(g, "--pretrained", metavar="FOLDER",
         help="fine-tune this model folder instead (bundled:default and bundled:upscaler name the bundled ones)")
    _add(g, "--vae", metavar="FOLDER", help="a trained VAE folder (default: OUT/vae when it exists; else pixel space); upscaler: "
         "'pixel-shuffle' for pixel space, folded into latents by space-to-depth")
    _add(g, "--resolution", type=int, help="training image size")
    _add(g, "--crop", choices=CROPS, help="crop to a square")
    _add(g, "--random-flip", action=argparse.BooleanOptionalAction, help="mirror images at random (default: on)")
    _add(g, "--cache-latents", action="store_true",
         help="encode every image and caption once (needs --crop center and a VAE)")

    g = parser.add_argument_group("optimization")
    _add(g, "--steps", type=int, help="optimizer steps")
    _add(g, "--batch-size", type=int, help="images per process per micro-batch")
    _add(g, "--grad-accum", type=int, help="micro-batches per optimizer step")
    _add(g, "--lr", type=float, help="peak learning rate (AdamW)")
    _add(g, "--lr-schedule", choices=LR_SCHEDULES, help="after warmup")
    _add(g, "--lr-warmup-steps", type=int, help="linear warmup steps")
    _add(g, "--weight-decay", type=float, help="AdamW weight decay")
    _add(g, "--max-grad-norm", type=float, help="gradient clipping (0: off)")
    _add(g, "--mixed-precision", choices=MIXED_PRECISION, help="autocast dtype")
    _add(g, "--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    _add(g, "--ema", action="store_true", help="keep an EMA of the weights and export it")
    _add(g, "--ema-decay", type=float, help="largest EMA decay (warmed up from 0.1)")
    _add(g, "--num-workers", type=int, help="DataLoader worker processes")
    _add(g, "--threads", type=int, help="torch CPU threads per process (1 is often fastest on a busy machine)")

    g = parser.add_argument_group("diffusion objective (unet, upscaler, controlnet)")
    _add(g, "--caption-dropout", type=float, help="probability of the empty prompt (for guidance)")
    _add(g, "--min-snr-gamma", type=float, help="min-SNR loss weighting (e.g. 5; default: off)")
    _add(g, "--x0-weighting", action="store_true",
         help="v loss / (snr + 1): every noise level counts the same in x0 terms (upscalers; needs v targets)")
    _add(g, "--noise-offset", type=float, help="offset noise strength (e.g. 0.05)")
    _add(g, "--prediction-type", choices=PREDICTION_TYPES, help="network target")
    _add(g, "--beta-schedule", choices=BETA_SCHEDULES, help="training noise schedule")
    _add(g, "--num-train-timesteps", type=int, help="T")
    _add(g, "--rescale-zero-terminal-snr", action="store_true", help="zero SNR at t = T-1 (use with v)")
    _add(g, "--low-resolution", type=int, help="upscaler: the low-resolution side")
    _add(g, "--max-noise-level", type=int, help="upscaler: largest augmentation noise level")
    _add(g, "--residual", action="store_true",
         help="upscaler with --vae pixel-shuffle: learn the difference from bicubic enlargement")
    _add(g, "--kl-weight", type=float, help="vae: weight of the KL term")
    _add(g, "--lora-rank", type=int, help="train LoRA adapters of this rank on the attention projections")
    _add(g, "--lora-alpha", type=float, help="LoRA alpha (default: the rank)")

    g = parser.add_argument_group("consistency distillation (--model lcm --pretrained TEACHER)")
    _add(g, "--lcm-w-min", type=float, help="smallest guidance w the teacher steps with (w = scale - 1)")
    _add(g, "--lcm-w-max", type=float, help="largest guidance w")
    _add(g, "--lcm-num-ddim-timesteps", type=int, help="the teacher's DDIM grid (the lcm sampler's original steps)")
    _add(g, "--lcm-target-decay", type=float, help="EMA decay of the target network (full distillation)")
    _add(g, "--lcm-loss", choices=("huber", "l2"), help="pseudo-Huber or L2 between the consistency functions")
    g = parser.add_argument_group("run")
    _add(g, "--seed", type=int, help="seed of weights, data order, noise")
    _add(g, "--resume", metavar="CKPT", help="'latest' or a checkpoint folder")
    _add(g, "--checkpoint-every", type=int, help="steps between checkpoints")
    _add(g, "--checkpoints-total-limit", type=int, help="keep this many newest checkpoints")
    _add(g, "--stop-after", type=int, help="stop after this many steps of this run (resume later)")
    _add(g, "--log-every", type=int, help="steps between progress-bar updates of loss / lr / images/s")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                        help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if k in _DEFAULTS}
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"latentloom train: error: {e}", file=sys.stderr)
        return 2
    from latentloom.training.loop import train

    out = train(cfg)
    stats_file = out / "checkpoints" / f"{cfg.model}-train-stats.json"
    summary = ""
    if stats_file.is_file():
        import json

        stats = json.loads(stats_file.read_text())
        if stats.get("images_per_s"):
            summary = f" ({stats['steps']} steps, {stats['images_per_s']:.1f} images/s, loss {stats['final_loss_ema']:.4f})"
    print(f"latentloom train: {cfg.model} -> {out}{summary}")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train", help="train or fine-tune a model (UNet, VAE, image-text, upscaler) with accelerate",
        description=__doc__.splitlines()[0], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m latentloom.training", description=__doc__.splitlines()[0], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(sys.argv[1:] if argv is None else list(argv)))
