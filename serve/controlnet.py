"""ControlNet in the A1111 API, as the sd-webui-controlnet extension takes it: the server's ControlNets (named
"stem [8 hex of the weights' SHA-256]", loaded lazily and kept) and the units of a request's
`alwayson_scripts.controlnet.args`, checked and mapped onto the pipelines' control arguments.

latentloom never resizes a control map: a unit's image (after its module) must have the output's size.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("latentloom.serve")

SCRIPT = "controlnet"  # the alwayson_scripts key; A1111 matches script titles case-insensitively ("ControlNet")
VERSION = 2  # what sd-webui-controlnet's /controlnet/version answers
CONTROL_MODES = {"balanced": 0, "my prompt is more important": 1, "controlnet is more important": 2}
_MODE_NAMES = ("Balanced", "My prompt is more important", "ControlNet is more important")

# the unit fields read here
_READ = {"enabled", "image", "input_image", "module", "model", "weight", "guidance_start", "guidance_end",
         "control_mode", "threshold_a", "threshold_b", "processor_res"}
# sd-webui-controlnet unit fields latentloom does not act on, with the values that ask for nothing there
# (None: no value asks for anything latentloom does differently)
_NEUTRAL: dict[str, tuple | None] = {
    "resize_mode": None,  # only matters for a map of another size, which is refused
    "pixel_perfect": None,  # the map is at the output's size: what pixel perfect asks for
    "hr_option": None,  # hires fix is off (enable_hr is warned about on its own)
    "save_detected_map": None, "is_ui": None, "input_mode": ("simple", "SIMPLE", None),
    "low_vram": (False, None), "guessmode": (False, None, 0), "loopback": (False, None),
    "mask": (None, ""), "mask_image": (None, ""), "mask_image_fg": (None, ""), "image_fg": (None, ""),
    "effective_region_mask": (None, ""), "advanced_weighting": (None, []), "ipadapter_input": (None, []),
    "generated_image": (None, ""), "use_preview_as_input": (False, None), "batch_images": (None, "", []),
    "batch_image_dir": (None, ""), "batch_mask_dir": (None, ""), "batch_input_gallery": (None, []),
    "batch_mask_gallery": (None, []), "output_dir": (None, ""), "union_control_type": (None, "", "Unknown"),
    "inpaint_crop_input_image": (False, None), "pulid_mode": (None, "Fidelity"),
}
_HASH_SUFFIX = re.compile(r"\s*\[([0-9a-fA-F]+)\]$")


# ---------------------------------------------------------------------- the server's ControlNets
def bundled_sources(models: list[str]) -> list[str]:
    """["bundled:controlnet"] when a model it fits is served (and it is installed), else []."""
    from latentloom.weights import BUNDLED_CONTROLNET, CONTROLNET_BASES, bundled_controlnet_dir

    fits = any(m in [f"bundled:{b}" for b in CONTROLNET_BASES] for m in models)
    return [BUNDLED_CONTROLNET] if fits and (bundled_controlnet_dir() / "config.json").is_file() else []


def check_source(source: str) -> tuple[Path, str]:
    """(folder or file, recipe name) of a --controlnet source, checked at start-up as `load_controlnet` will
    read it (ValueError naming the source and what is taken)."""
    from latentloom.pipelines.control import locate_controlnet

    try:
        return locate_controlnet(source)
    except (OSError, ValueError) as err:
        raise ValueError(f"--controlnet: {err}") from None


@dataclass
class ControlNetEntry:
    source: str  # what load_controlnet is given: the recipe name (an absolute path, or "bundled:controlnet")
    path: Path  # its folder or file
    stem: str  # the name without its hash: a file's or folder's stem, or "bundled:controlnet"
    name: str | None = None  # "stem [8 hex]", once hashed

    def matches(self, wanted: str) -> bool:
        """A1111 clients send "name [hash]"; the bare name is taken too."""
        if wanted == self.name:
            return True
        found = _HASH_SUFFIX.search(wanted)
        stem = wanted[: found.start()] if found else wanted
        return stem == self.stem and (found is None or bool(self.name and self.name.endswith(f"[{found[1]}]")))


class ControlNetRegistry:
    """The ControlNets a server offers. Names are hashed once, on first use; `load` reads a ControlNet at its
    first job and keeps it (only the worker thread loads)."""

    def __init__(self, sources: list[str]) -> None:
        from latentloom.pipelines.infotext import controlnet_name

        self.entries: list[ControlNetEntry] = []
        seen = set()
        for source in sources:
            path, key = check_source(source)
            if key in seen:
                continue
            seen.add(key)
            self.entries.append(ControlNetEntry(source=key, path=path, stem=controlnet_name(key)))
        self._lock = threading.Lock()
        self._loaded: dict[str, Any] = {}  # source -> AttachedControlNet

    def names(self) -> list[str]:
        with self._lock:
            for entry in self.entries:
                if entry.name is None:
                    entry.name = _name(entry)
        return [e.name for e in self.entries]

    def find(self, wanted: Any, *, field: str) -> ControlNetEntry:
        names = self.names()
        if not isinstance(wanted, (str, type(None))):
            raise ValueError(f"{field} must be a ControlNet name, one of {names}, got {wanted!r}")
        if wanted and wanted.strip() and wanted.strip() != "None":
            for entry in self.entries:
                if entry.matches(wanted.strip()):
                    return entry
            raise LookupError(f"{field}: unknown ControlNet {wanted!r}; this server has {names} "
                              "(GET /controlnet/model_list; start it with --controlnet PATH for more)")
        raise ValueError(f"{field} is {wanted!r}, but the unit is enabled; give one of {names} "
                         "(or enabled: false)")

    def load(self, entry: ControlNetEntry, pipe) -> Any:
        """The entry's ControlNet on the pipeline's device and dtype, checked against its model."""
        import torch

        from latentloom.pipelines.control import check_fits, load_controlnet

        attached = self._loaded.get(entry.source)
        if attached is None:
            log.info("loading ControlNet %s (%s)", entry.name or entry.stem, entry.source)
            attached = load_controlnet(entry.source, dtype=pipe.dtype)
            attached.model.to(memory_format=torch.channels_last)  # as load_pipeline lays out its ControlNets
            self._loaded[entry.source] = attached
        check_fits(pipe, attached)
        params = next(attached.model.parameters())
        if params.device != pipe.device or params.dtype != pipe.dtype:
            torch.nn.Module.to(attached.model, device=pipe.device, dtype=pipe.dtype)
        return attached


def _name(entry: ControlNetEntry) -> str:
    from latentloom.pipelines.control import weights_hash
    from latentloom.pipelines.infotext import controlnet_name

    try:
        digest = weights_hash(entry.path)  # the hash the images' recipes record
    except OSError as err:  # an unreadable file fails at its first use, with the loader's message
        log.warning("could not hash ControlNet %s: %s", entry.source, err)
        digest = None
    return controlnet_name(entry.source, digest)  # as the images' infotexts name it


def modules() -> list[str]:
    """The preprocessors there are: "none" (the image is the map) and "canny" where OpenCV is installed."""
    return ["none", "canny"] if importlib.util.find_spec("cv2") is not None else ["none"]


# ---------------------------------------------------------------------- a request's units
@dataclass
class Unit:
    """One enabled unit, checked: its ControlNet, its map (after its module) and its settings."""

    where: str  # "alwayson_scripts.controlnet.args[k]", for messages
    field: str  # where its image came from: "<where>.image", or img2img's "init_images[0]"
    entry: ControlNetEntry
    image: Any  # PIL RGB, the map the ControlNet reads
    module: str
    scale: float
    start: float
    end: float
    mode: int  # CONTROL_MODES' value


def read_scripts(scripts: dict[str, Any] | None, registry: ControlNetRegistry, *, max_pixels: int,
                 init_image: Any = None) -> tuple[list[Unit], list[str]]:
    """The enabled ControlNet units of `alwayson_scripts`, and warnings for what is not acted on (other
    scripts, unit fields latentloom does not implement)."""
    notes: list[str] = []
    units: list[Unit] = []
    keys = [k for k in (scripts or {}) if k.lower() == SCRIPT]
    for key in scripts or {}:
        if key not in keys:
            notes.append(f"alwayson_scripts.{key} is not supported by latentloom and was ignored")
    if len(keys) > 1:
        raise ValueError(f"alwayson_scripts names ControlNet {len(keys)} times ({keys}); send one")
    if not keys:
        return units, notes
    field = f"alwayson_scripts.{keys[0]}"
    value = scripts[keys[0]]
    args = value.get("args", []) if isinstance(value, dict) else None
    if not isinstance(args, list):
        raise ValueError(f"{field} must be {{\"args\": [unit, ...]}} with a list of unit objects, got {value!r:.100}")
    for k, unit in enumerate(args):
        where = f"{field}.args[{k}]"
        if not isinstance(unit, dict):
            raise ValueError(f"{where} must be a unit object ({{\"model\": ..., \"image\": ...}}), got "
                             f"{type(unit).__name__}")
        enabled = unit.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ValueError(f"{where}.enabled must be true or false, got {enabled!r}")
        if enabled:
            units.append(_read_unit(unit, where, registry, max_pixels=max_pixels, init_image=init_image,
                                    notes=notes))
    modes = {u.mode for u in units}
    if 2 in modes and len(modes) > 1:  # guess mode is one switch for the whole call in the pipelines
        raise ValueError(f"{field}: control_mode \"ControlNet is more important\" is set on some enabled units but "
                         "not all; latentloom applies it to every ControlNet of a request (guess mode), so give it "
                         "on all units or on none")
    return units, notes


def _read_unit(unit: dict[str, Any], where: str, registry: ControlNetRegistry, *, max_pixels: int,
               init_image: Any, notes: list[str]) -> Unit:
    from latentloom.pipelines.control_maps import CANNY_DEFAULTS, canny, check_thresholds, load_control_image

    entry = registry.find(unit.get("model"), field=f"{where}.model")
    module = unit.get("module", "none")
    accepted = modules()
    if not isinstance(module, str) or module.strip().lower() not in accepted:
        hint = "" if "canny" in accepted else " (canny needs OpenCV: pip install 'latentloom[control]')"
        raise ValueError(f"{where}.module {module!r} is not a preprocessor latentloom has; accepted: "
                         f"{accepted}{hint}")
    module = module.strip().lower()
    image, image_field = _image(unit, where, max_pixels=max_pixels, notes=notes)
    if image is None:
        if init_image is None:
            raise ValueError(f"{where} has no control image; send it base64-encoded in {where}.image")
        image, image_field = init_image, "init_images[0]"  # sd-webui-controlnet: img2img's image is the input
    try:
        if module == "canny":
            low = _threshold(unit, "threshold_a", CANNY_DEFAULTS[0], where)
            high = _threshold(unit, "threshold_b", CANNY_DEFAULTS[1], where)
            check_thresholds(low, high)
            image = canny(image, low=low, high=high)
            res = unit.get("processor_res")
            if res not in (None, -1) and not unit.get("pixel_perfect"):
                notes.append(f"{where}.processor_res={res!r} was ignored: canny runs on the control image at its "
                             "own size, which is the output's")
        else:
            image = load_control_image(image)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    scale = _number(unit, "weight", 1.0, where)
    start = _number(unit, "guidance_start", 0.0, where, low=0.0, high=1.0)
    end = _number(unit, "guidance_end", 1.0, where, low=0.0, high=1.0)
    if start >= end:
        raise ValueError(f"{where}.guidance_start ({start}) must be below guidance_end ({end})")
    mode = _mode(unit.get("control_mode", 0), where)
    if mode == 1:
        notes.append(f"{where}.control_mode \"My prompt is more important\" is not implemented by latentloom; "
                     "the unit ran as \"Balanced\"")
    for key, value in unit.items():
        if key in _READ:
            continue
        if key == "guessmode" and value:
            notes.append(f"{where}.guessmode={value!r} (deprecated) was ignored; send control_mode \"ControlNet is "
                         "more important\" for guess mode")
        elif key not in _NEUTRAL:
            notes.append(f"unknown field {where}.{key} was ignored")
        elif _NEUTRAL[key] is not None and value not in _NEUTRAL[key]:
            notes.append(f"{where}.{key}={value!r:.60} is not supported by latentloom and was ignored")
    return Unit(where=where, field=image_field if image_field == "init_images[0]" else f"{where}.{image_field}",
                entry=entry, image=image, module=module, scale=scale,
                start=start, end=end, mode=mode)


def _image(unit: dict[str, Any], where: str, *, max_pixels: int, notes: list[str]) -> tuple[Any, str]:
    """The unit's decoded image (None when it sends none) and the field it came in."""
    from latentloom.serve.images import decode_image

    for key in ("image", "input_image"):
        value = unit.get(key)
        field = key
        if isinstance(value, dict):  # the extension's older {"image": b64, "mask": b64}
            if value.get("mask"):
                notes.append(f"{where}.{key}.mask is not supported by latentloom and was ignored")
            value, field = value.get("image"), f"{key}.image"
        if value in (None, ""):
            continue
        return decode_image(value, field=f"{where}.{field}", max_pixels=max_pixels), field
    return None, "image"


def _number(unit: dict[str, Any], key: str, default: float, where: str, *, low: float | None = None,
            high: float | None = None) -> float:
    value = unit.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}.{key} must be a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{where}.{key} must be in [{low}, {high}], got {value!r}")
    return float(value)


def _threshold(unit: dict[str, Any], key: str, default: int, where: str) -> int:
    """sd-webui-controlnet's slider values (floats like 100.0); -1 or none: the preprocessor's default."""
    value = unit.get(key)
    if value is None or value == -1:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{where}.{key} (canny's {'low' if key.endswith('a') else 'high'} threshold) must be a "
                         f"whole number in 0..255 (or -1 for {default}), got {value!r}")
    return int(value)


def _mode(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1, 2):
        return value
    if isinstance(value, str) and value.strip().lower() in CONTROL_MODES:
        return CONTROL_MODES[value.strip().lower()]
    raise ValueError(f"{where}.control_mode must be one of {list(_MODE_NAMES)} (or 0, 1, 2), got {value!r}")


def check_sizes(units: list[Unit], width: int | None, height: int | None) -> None:
    """Every map must have the output's size (a side not known yet is not checked)."""
    for unit in units:
        w, h = unit.image.size
        if (width is not None and w != width) or (height is not None and h != height):
            raise ValueError(f"{unit.field} is {w}x{h} but the output is {width or '?'}x{height or '?'}; latentloom "
                             "does not resize control images (resize_mode is not applied): send a map of the output's "
                             "size")


def call_arguments(units: list[Unit]) -> dict[str, Any]:
    """The pipelines' control arguments for the units (none: {})."""
    if not units:
        return {}
    return dict(control_image=[u.image for u in units], controlnet_conditioning_scale=[u.scale for u in units],
                control_guidance_start=[u.start for u in units], control_guidance_end=[u.end for u in units],
                guess_mode=any(u.mode == 2 for u in units))


@contextlib.contextmanager
def attached(pipe, registry: ControlNetRegistry | None, units: list[Unit]):
    """The units' ControlNets on the pipeline for one job, and none after it (nor during a job without units):
    pipe.controlnets is set back to what it was, even when the job fails."""
    before = getattr(pipe, "controlnets", None)
    if not units and not before:  # nothing to attach, nothing to take off (an upscaler has none)
        yield
        return
    nets = []
    for unit in units:
        try:
            nets.append(registry.load(unit.entry, pipe))
        except ValueError as err:  # check_fits: made for another base model
            raise ValueError(f"{unit.where}.model {unit.entry.name or unit.entry.stem!r} does not fit the model "
                             f"in use: {err}") from None
    pipe.controlnets = nets
    try:
        yield
    finally:
        pipe.controlnets = before


def hide_images(parameters: dict[str, Any]) -> None:
    """The request as echoed in an answer: the units' uploaded images left out, as init_images are."""
    scripts = parameters.get("alwayson_scripts")
    if not isinstance(scripts, dict):
        return
    for key, value in scripts.items():
        if key.lower() == SCRIPT and isinstance(value, dict) and isinstance(value.get("args"), list):
            value["args"] = [{k: (None if k in ("image", "input_image") else v) for k, v in u.items()}
                             if isinstance(u, dict) else u for u in value["args"]]
