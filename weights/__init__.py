"""The bundled models, shipped as package data (safetensors + JSON configs), and their names.

`load_pipeline()` / `load_pipeline("bundled:NAME")` load them offline, and
`load_pipeline(controlnet="bundled:controlnet")` the default model's ControlNet; training and
evaluation refer to them by the same names.
"""
from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent
BUNDLED_NAME = "default"
# What ships here: the text-to-image model, its 64 -> 128 upscale stage, and "fast": the default model
# with its LCM-LoRA merged, sampled in a few consistency steps ("bundled:NAME").
BUNDLED_MODELS = ("default", "upscaler", "fast")
# bundled:fast = the default model + this LoRA (a file in its folder), with these call defaults
FAST_LORA = "lcm-lora.safetensors"
FAST_DEFAULTS = {"sampler": "lcm", "num_inference_steps": 4, "guidance_scale": 1.5}
# The default model's ControlNet (a diffusers ControlNetModel folder, fp16): it reads white-on-black shape
# silhouettes (`synthetic.shapes.render_control_map`) and puts the caption's shape where the map says.
BUNDLED_CONTROLNET = "bundled:controlnet"
# the bundled pipelines it fits: their CLI commands use it when given --control-image without --controlnet
CONTROLNET_BASES = ("default", "fast")


def bundled_controlnet_dir() -> Path:
    return WEIGHTS_DIR / "controlnet"


def bundled_model_dir(name: str = BUNDLED_NAME) -> Path:
    return WEIGHTS_DIR / ("default" if name == "fast" else name)


def bundled_name(path: str | os.PathLike | None) -> str | None:
    """None -> "default"; "bundled:NAME" -> NAME (checked); any other path -> None."""
    if path is None:
        return BUNDLED_NAME
    if not (isinstance(path, str) and path.startswith("bundled:")):
        return None
    name = path.removeprefix("bundled:")
    if name not in BUNDLED_MODELS:
        known = ", ".join(f"'bundled:{n}'" for n in BUNDLED_MODELS)
        raise ValueError(f"unknown bundled model {path!r}; expected one of {known}")
    return name
