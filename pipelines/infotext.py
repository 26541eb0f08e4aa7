"""AUTOMATIC1111's infotext (a PNG's `parameters` text chunk), written and read.

A1111 writes the prompt, an optional `Negative prompt: ...` line, then one line of `Key: value` pairs:

    a lighthouse at dusk
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: ...

A value holding a comma, colon or newline is JSON-quoted (A1111's `quote()`). `infotext(recipe)` writes a
latentloom recipe that way, its own settings as extra pairs the way A1111 extensions add theirs;
`parse_infotext(text)` reads one written by A1111, Forge or latentloom back into a recipe.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

# latentloom sampler -> A1111's display name. A1111 itself has no DDPM (Forge does) and no TCD (the
# TCD extension and reForge call it so).
A1111_SAMPLERS = {
    "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "ddim": "DDIM", "ddpm": "DDPM", "unipc": "UniPC", "lcm": "LCM", "tcd": "TCD",
}
# Read back case-insensitively, with A1111's k_ aliases (`k_dpmpp_2m_ka` = DPM++ 2M Karras) and our own names
_SAMPLER_NAMES = {**{v.lower(): k for k, v in A1111_SAMPLERS.items()}, **{k: k for k in A1111_SAMPLERS},
                  "euler_ancestral": "euler_a"}

# A1111 >= 1.9's `Schedule type` labels; before 1.9 a schedule was part of the sampler's name ("DPM++ 2M Karras")
SCHEDULE_TYPES = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "SGMUniform",
                  "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")
# latentloom's timestep spacing <-> the A1111 schedule that spaces the steps alike: Uniform is k-diffusion's
# get_sigmas (diffusers' linspace); DDIM steps 1, 1 + 1000 // n, ... (leading, steps_offset 1); SGM Uniform
# drops the last of n + 1 evenly spaced timesteps (trailing, to within rounding)
SPACING_SCHEDULES = {"linspace": "Uniform", "leading": "DDIM", "trailing": "SGM Uniform"}
_SCHEDULE_SPACING = {**{v: k for k, v in SPACING_SCHEDULES.items()}, "SGMUniform": "trailing"}
# A1111 samplers whose `Schedule type: Automatic` means Karras (their default since 1.9)
_AUTOMATIC_KARRAS = {"dpmpp_2m"}

# latentloom-only settings: infotext key -> recipe key (read back into the recipe, never reported as unknown)
EXTRA_KEYS = {
    "Guidance rescale": "guidance_rescale", "CLIP guidance scale": "clip_guidance_scale", "TCD eta": "eta",
    "Timestep spacing": "timestep_spacing", "Timesteps": "timesteps", "Sigmas": "sigmas",
    "Cache interval": "cache_interval", "Prompt 2": "prompt_2", "Negative prompt 2": "negative_prompt_2",
    "Refiner": "refiner", "Refiner switch at": "refiner_start", "Noise level": "noise_level",
}
_FLOATS = {"guidance_rescale", "clip_guidance_scale", "eta", "refiner_start"}
_INTS = {"cache_interval", "noise_level"}
_LISTS = {"timesteps", "sigmas"}
_LABELS = {s.lower(): s for s in SCHEDULE_TYPES}

# `Key:` where A1111's parser finds one: a word character, then words, spaces, hyphens or slashes
_KEY = re.compile(r"\s*(\w[\w \-/]*):\s*")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_DECODER = json.JSONDecoder()


def quote(value: Any) -> str:
    """A1111's `quote()`: JSON-quoted when the text holds a comma, colon or newline, as is otherwise."""
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def _number(value: Any) -> str:
    # 7.0 -> "7": A1111's UI writes whole scales without the ".0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def schedule_type(recipe: dict[str, Any]) -> str | None:
    """A1111's `Schedule type` for a recipe; None where A1111 has none (a caller's own timesteps or sigmas, or
    a recipe that does not record its spacing)."""
    if recipe.get("timesteps") is not None or recipe.get("sigmas") is not None:
        return None
    if recipe.get("karras_sigmas"):
        return "Karras"
    spacing = (recipe.get("scheduler_config") or {}).get("timestep_spacing")
    return SPACING_SCHEDULES.get(spacing)


def infotext(recipe: dict[str, Any]) -> str:
    """The recipe as A1111's infotext: prompt, `Negative prompt: ...`, then the `Key: value` line."""
    sampler = recipe.get("sampler")
    pairs: list[tuple[str, Any]] = [
        ("Steps", recipe.get("num_inference_steps")),
        ("Sampler", A1111_SAMPLERS.get(sampler, sampler)),
        ("Schedule type", schedule_type(recipe)),
        ("CFG scale", recipe.get("guidance_scale")),
        ("Seed", recipe.get("seed")),
        ("Size", f"{recipe['width']}x{recipe['height']}" if recipe.get("width") and recipe.get("height") else None),
        ("Model hash", recipe.get("model_hash")),
        ("Model", recipe.get("model")),
        ("Denoising strength", recipe.get("strength") if recipe.get("task") in ("img2img", "inpaint") else None),
    ]
    spacing = (recipe.get("scheduler_config") or {}).get("timestep_spacing")
    for label, key in EXTRA_KEYS.items():
        value = spacing if key == "timestep_spacing" else recipe.get(key)
        if key in ("guidance_rescale", "clip_guidance_scale") and not value:
            value = None  # 0 is off: left out, as A1111 leaves out settings at their default
        if key in _LISTS and value is not None:
            value = json.dumps([float(v) if key == "sigmas" else int(v) for v in value])
        if key == "cache_interval" and value == 1:
            value = None
        pairs.append((label, value))
    for k, unit in enumerate(recipe.get("controlnets") or []):
        pairs.append((f"ControlNet {k}", controlnet_unit(unit)))
    if recipe.get("latentloom_version"):
        pairs.append(("Version", f"latentloom {recipe['latentloom_version']}"))
    settings = ", ".join(f"{k}: {quote(_number(v))}" for k, v in pairs if v is not None)
    negative = recipe.get("negative_prompt")
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    # A1111 strips the whole text, so an empty prompt leaves just the settings line
    return f"{recipe.get('prompt') or ''}{negative_line}\n{settings}".strip()


def controlnet_name(model: str, digest: str | None = None) -> str:
    """A ControlNet as A1111 names models: its file's or folder's stem ("bundled:controlnet" as it is) and
    " [8 hex]" of its weights' SHA-256 when known."""
    name = model if model.startswith("bundled:") or model == "in-memory" else Path(model).stem
    digest = (digest or "")[:8]
    return f"{name} [{digest}]" if digest and digest != "unknown" else name


def controlnet_unit(unit: dict[str, Any]) -> str:
    """A recipe's ControlNet as sd-webui-controlnet's unit text (no preprocessor ran on the map, so Module
    is none)."""
    label = controlnet_name(str(unit.get("model", "")), str(unit.get("model_hash", "")))
    return (f"Module: none, Model: {label}, Weight: {_number(unit.get('scale'))}, "
            f"Guidance Start: {_number(unit.get('start'))}, Guidance End: {_number(unit.get('end'))}")


def _value(line: str, pos: int) -> tuple[Any, int]:
    """The value that starts at `pos` and where it ends: a JSON-quoted string (unquoted), a JSON object or
    list as written (Civitai's `Hashes: {...}`), or the text up to the next comma."""
    if pos < len(line) and line[pos] in '"{[':
        try:
            decoded, end = _DECODER.raw_decode(line, pos)
        except json.JSONDecodeError:
            pass
        else:
            if re.match(r"\s*(,|$)", line[end:]):
                return (decoded if line[pos] == '"' else line[pos:end]), end
    end = line.find(",", pos)
    end = len(line) if end < 0 else end
    return line[pos:end].strip(), end


def settings_pairs(line: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """The `Key: value` pairs of a settings line, and the pieces of it that are no such pair."""
    pairs, leftovers, pos = [], [], 0
    while pos < len(line):
        match = _KEY.match(line, pos)
        if match is None:
            end = line.find(",", pos)
            end = len(line) if end < 0 else end
            if line[pos:end].strip():
                leftovers.append(line[pos:end].strip())
            pos = end + 1
            continue
        value, pos = _value(line, match.end())
        pairs.append((match.group(1).strip(), value))
        pos += 1  # past the comma
    return pairs, leftovers


def a1111_sampler(name: str) -> tuple[str | None, str | None]:
    """(latentloom's sampler for A1111's sampler `name` or None, the schedule its name carries or None):
    "DPM++ 2M Karras" -> ("dpmpp_2m", "Karras"), "k_euler_a" -> ("euler_a", None), "LMS" -> (None, None)."""
    text, schedule = name.strip(), None
    for label in sorted(SCHEDULE_TYPES, key=len, reverse=True):
        if text.lower().endswith(" " + label.lower()):
            text, schedule = text[: -len(label) - 1].strip(), label
            break
    key = text.lower()
    if key.startswith("k_"):
        key = key[2:]
        if key.endswith("_ka"):
            key, schedule = key[:-3], "Karras"
    return _SAMPLER_NAMES.get(key), schedule


def _number_list(value: Any) -> list:
    numbers = json.loads(value) if isinstance(value, str) else value
    if not isinstance(numbers, list) or not all(isinstance(v, (int, float)) for v in numbers):
        raise ValueError(value)
    return numbers


_number_list.__name__ = "list of numbers"


def split_prompts(lines: list[str]) -> tuple[str, str]:
    """(prompt, negative prompt) of an infotext's lines before its settings line, as A1111 reads them: each
    line stripped; from a `Negative prompt:` line on, the negative prompt."""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative)


def parse_infotext(text: str) -> dict[str, Any]:
    """A recipe from an infotext (A1111's, Forge's, or latentloom's own `parameters` chunk).

    Known keys fill latentloom's recipe keys; every other key is kept, as written, under `a1111_extra` and
    reported in one warning. The original text is kept as `a1111_infotext`. A sampler latentloom lacks is
    kept as `a1111_sampler` with `sampler` None (a warning says so; `generate --from` then asks for
    `--sampler`). Raises ValueError when the text has no settings line or no readable Steps.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the infotext is empty ({text!r}); expected a prompt, then a line like "
                         "`Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512`")
    *lines, last = text.strip().split("\n")
    pairs, leftovers = settings_pairs(last)
    if len(pairs) < 3:  # A1111's own test for a settings line
        raise ValueError(f"the infotext has no settings line (`Steps: 20, Sampler: Euler a, CFG scale: 7, ...`, "
                         f"at least 3 `Key: value` pairs) after its prompt; its last line is {last[:200]!r}")
    settings = dict(pairs)
    if "Steps" not in settings:
        raise ValueError(f"the infotext's settings name no Steps (the number of sampling steps); it has "
                         f"{list(settings)}")
    try:
        steps = int(settings.pop("Steps"))
        if steps < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"the infotext's Steps must be a whole number >= 1, got {dict(pairs)['Steps']!r}") from None
    prompt, negative = split_prompts(lines)
    recipe: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative or None, "num_inference_steps": steps,
                              "task": "txt2img"}
    extra: dict[str, Any] = {}
    notes: list[str] = []

    def convert(key: str, cast, recipe_key: str) -> None:
        value = settings.pop(key)
        try:
            recipe[recipe_key] = cast(value)
        except (TypeError, ValueError):  # json.JSONDecodeError is a ValueError
            extra[key] = value
            notes.append(f"{key} {value!r} is not a {cast.__name__}; kept under a1111_extra")

    for key, cast, recipe_key in (("CFG scale", float, "guidance_scale"), ("Seed", int, "seed")):
        if key in settings:
            convert(key, cast, recipe_key)
    if "Size" in settings:
        size = _SIZE.match(str(settings["Size"]))
        if size:
            settings.pop("Size")
            recipe["width"], recipe["height"] = int(size.group(1)), int(size.group(2))
    for key, recipe_key in (("Model", "model"), ("Model hash", "model_hash")):
        if key in settings:
            recipe[recipe_key] = str(settings.pop(key))
    version = settings.pop("Version", None)
    if version is not None:
        ours = str(version).startswith("latentloom ")
        recipe["latentloom_version" if ours else "a1111_version"] = str(version).removeprefix("latentloom ")
    hires = any(k.startswith("Hires ") for k in settings)
    if "Denoising strength" in settings and not hires:  # with Hires keys it is the hires pass's (kept as extra)
        recipe["task"] = "img2img"
        convert("Denoising strength", float, "strength")
    _read_sampler(recipe, settings, notes)
    for label, key in EXTRA_KEYS.items():
        if label in settings:
            cast = float if key in _FLOATS else int if key in _INTS else _number_list if key in _LISTS else str
            convert(label, cast, key)
    spacing = recipe.pop("timestep_spacing", None)
    if spacing is not None:  # latentloom's own record of the spacing is exact; it wins over the schedule type's
        recipe["scheduler_config"] = {"timestep_spacing": spacing}
    extra.update(settings)
    if extra:
        recipe["a1111_extra"] = extra
        notes.append(f"settings latentloom does not use, kept under a1111_extra: {', '.join(extra)}")
    units = [f"{key} ({value})" for key, value in extra.items() if re.fullmatch(r"ControlNet \d+", key)]
    if units:  # sd-webui-controlnet's units: no control image is recorded, so they cannot be replayed
        notes.append(f"made with ControlNet, which an infotext cannot replay (it records no control image): "
                     f"{'; '.join(units)}; give --controlnet PATH --control-image FILE to use one")
    if leftovers:
        notes.append(f"parts of the settings line that are no `Key: value` pair: {leftovers}")
    recipe["a1111_infotext"] = text
    for note in notes:
        warnings.warn(f"infotext: {note}", UserWarning, stacklevel=3)
    return recipe


def _read_sampler(recipe: dict[str, Any], settings: dict[str, Any], notes: list[str]) -> None:
    """Sampler and Schedule type -> recipe sampler, karras_sigmas and (for Uniform, DDIM, SGM Uniform) the
    timestep spacing."""
    name = settings.pop("Sampler", None)
    stated = settings.pop("Schedule type", None)
    ours, suffix = a1111_sampler(str(name)) if name is not None else (None, None)
    if name is not None:
        recipe["a1111_sampler"] = str(name)
        recipe["sampler"] = ours
        if ours is None:
            notes.append(f"latentloom has no sampler like A1111's {name!r} (it reads {list(A1111_SAMPLERS.values())}"
                         ", also with a schedule suffix like ' Karras'); the recipe's sampler is None: pass "
                         "--sampler to re-make the image")
    # A1111's API also takes the schedule's lower-case name ("sgm_uniform")
    schedule = _LABELS.get(str(stated).lower().replace("_", " "), str(stated)) if stated is not None else suffix
    if schedule is None:
        recipe["karras_sigmas"] = False  # before 1.9 a name without a schedule meant the sampler's plain one
        return
    recipe["a1111_schedule_type"] = schedule
    if schedule == "Automatic":
        recipe["karras_sigmas"] = ours in _AUTOMATIC_KARRAS
        if ours == "dpmpp_2m_sde":
            notes.append("A1111's DPM++ 2M SDE samples on its Exponential schedule, which latentloom lacks; "
                         "using the model's default spacing")
        return
    recipe["karras_sigmas"] = schedule == "Karras"
    if schedule in _SCHEDULE_SPACING:
        recipe["scheduler_config"] = {"timestep_spacing": _SCHEDULE_SPACING[schedule]}
    elif schedule != "Karras":
        notes.append(f"latentloom has no {schedule!r} schedule (it reads Karras, Automatic and the spacings "
                     f"{sorted(_SCHEDULE_SPACING)}); using the model's default spacing")
