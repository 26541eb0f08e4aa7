"""The recipe of an image, stored in its PNG so that it can be read back and re-made.

Each PNG latentloom writes carries one tEXt chunk, key ``latentloom``, holding a JSON
object (prompt, negative prompt, seed, steps, sampler, guidance, size, model name and
weights hash, dtype, latentloom version): the source of truth for `generate --from`. A
second chunk, ``parameters``, holds the same as AUTOMATIC1111's infotext (`infotext.py`),
which A1111, Civitai and metadata readers display; a PNG that carries only that chunk (made
by A1111 or Forge) is read from it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from latentloom.file_io import write_atomic
from latentloom.pipelines.infotext import infotext, parse_infotext

METADATA_KEY = "latentloom"
INFOTEXT_KEY = "parameters"  # A1111's chunk

# Fields every recipe carries; `generate --from` needs them to re-create an image.
RECIPE_FIELDS = (
    "prompt", "negative_prompt", "seed", "num_inference_steps", "sampler", "guidance_scale",
    "guidance_rescale", "height", "width", "model", "model_hash", "dtype", "latentloom_version",
)


def human_readable(recipe: dict[str, Any]) -> str:
    """The recipe as AUTOMATIC1111's infotext (prompt, `Negative prompt: ...`, `Steps: 20, Sampler: ...`)."""
    return infotext(recipe)


def save_png(image: Image.Image, path: str | os.PathLike, recipe: dict[str, Any]) -> Path:
    """Write `image` as PNG with its recipe; atomic, so a crash never leaves half a file."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(recipe, sort_keys=True, ensure_ascii=False))
    text = human_readable(recipe)
    if text:  # a recipe that is no generation (a preprocessed control map) has no A1111 infotext
        info.add_text(INFOTEXT_KEY, text)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)

    write_atomic(path, write)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Return the recipe stored in a PNG written by latentloom, or read from the infotext of a PNG
    written by AUTOMATIC1111 or Forge (`infotext.parse_infotext`: its unknown settings are kept under
    `a1111_extra` and reported in a warning).

    Raises FileNotFoundError for a missing file and ValueError for a file that is not a PNG, carries
    neither a latentloom recipe nor an infotext, or whose infotext names no steps.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image: {path}")
    try:
        with Image.open(path) as image:
            fmt = image.format
            text = dict(getattr(image, "text", {}) or {})
    except Exception as err:  # PIL raises several types for non-images
        raise ValueError(f"{path} is not an image PIL can read: {err}") from err
    if fmt != "PNG" or (METADATA_KEY not in text and INFOTEXT_KEY not in text):
        raise ValueError(f"{path} carries no latentloom metadata (expected a PNG written by latentloom, or by "
                         f"AUTOMATIC1111 with its {INFOTEXT_KEY!r} text)")
    if METADATA_KEY not in text:
        try:
            return parse_infotext(text[INFOTEXT_KEY])
        except ValueError as err:
            raise ValueError(f"{path}: its {INFOTEXT_KEY!r} text is no A1111 infotext: {err}") from err
    try:
        recipe = json.loads(text[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the latentloom metadata chunk is not valid JSON: {err}") from err
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: the latentloom metadata is not a JSON object")
    return recipe


def call_recipes(pipe, call, *, height: int, width: int, task: str, **fields: Any) -> list[dict]:
    """One recipe per image: the shared settings, the task's own `fields`, the prompt and seed."""
    import latentloom

    shared = {
        "num_inference_steps": call.steps, "sampler": call.sampler, "karras_sigmas": call.karras,
        "guidance_scale": call.scale, "guidance_rescale": call.rescale, "guidance_mode": call.guidance_mode,
        "clip_guidance_scale": 0.0,
        "height": height, "width": width, "model": pipe.name, "model_hash": pipe.model_hash(),
        "dtype": str(pipe.dtype).removeprefix("torch."), "latentloom_version": latentloom.__version__,
        "scheduler_config": call.schedule.settings(), "task": task, **fields,
    }
    if call.eta is not None:
        shared["eta"] = call.eta
    if call.cache_interval > 1:  # step caching; left out when off, so exact recipes stay as they were
        shared["cache_interval"] = call.cache_interval
    if call.token_merge_ratio > 0:  # token merging; left out when off, like cache_interval
        shared["token_merge_ratio"] = call.token_merge_ratio
    for key in ("timesteps", "sigmas"):  # a caller's own schedule (num_inference_steps is its length)
        if getattr(call, key) is not None:
            shared[key] = list(getattr(call, key))
    n = call.per_prompt
    second = {}
    if call.prompts_2 is not None or call.negatives_2 is not None:
        second = {"prompt_2": call.prompts_2, "negative_prompt_2": call.negatives_2}
    control = getattr(call, "control", None)  # ControlNets: models, this prompt's control images, settings
    return [
        {**shared, "prompt": call.prompts[i // n], "seed": call.seeds[i],
         "negative_prompt": call.negatives[i // n] if call.negatives else None,
         **{k: (v[i // n] if v else None) for k, v in second.items()},
         **(control.recipe(i // n) if control is not None else {})}
        for i in range(call.batch)
    ]
