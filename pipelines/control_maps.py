"""Control maps for ControlNet: the Canny edge preprocessor, and user-made maps loaded as they are.

A control map is an RGB image of the output's size that a ControlNet reads beside the prompt: white
edges on black (Canny), a white silhouette on black (`latentloom make-shapes --control-maps`), or
anything a user drew. Nothing here resizes: a map must already have the size of the image it steers.

Canny runs on OpenCV (`cv2.Canny`), not scikit-image: the released Canny ControlNets were trained on
maps from lllyasviel's annotator, which is `cv2.Canny(rgb_uint8, low, high)` with its defaults (3x3
Sobel, L1 gradient norm, no blur, the strongest channel's gradient for colour input), and
thresholds in its 0-255 units. scikit-image's `canny` blurs with a Gaussian first (sigma 1), works
on one gray channel and takes thresholds on another scale, so its maps are thicker, rounder and
differ from what those models saw. OpenCV is a large wheel (~170 MB installed), so it is an
optional extra: ``pip install 'latentloom[control]'`` (the Makefile installs it).

No torch here: `latentloom preprocess` starts fast.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PREPROCESSORS: tuple[str, ...] = ("canny",)
CANNY_DEFAULTS = (100, 200)  # the ControlNet annotator's and A1111 ControlNet's defaults
# PIL modes that convert to RGB without losing values; 16-bit and float images would be clipped to 8 bits
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "La")


def check_thresholds(low: object, high: object) -> tuple[int, int]:
    """(low, high) if both are ints in 0..255 with low <= high, else ValueError naming them.

    Ints, because OpenCV compares them with integer gradient magnitudes: a fraction adds nothing.
    low > high is refused rather than swapped (cv2.Canny swaps them without a word).
    """
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 255:
            raise ValueError(f"canny {name} threshold must be an int in 0..255, got {value!r}")
    if low > high:
        raise ValueError(f"canny low threshold ({low}) must be <= high threshold ({high})")
    return int(low), int(high)


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist (or is not a file)")
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {what} {str(path)!r}: {e}") from None


def _to_rgb(image: Any, what: str, *, background: tuple[int, int, int]) -> Image.Image:
    """An 8-bit RGB copy; transparent pixels are composited onto `background` (not dropped)."""
    if isinstance(image, (str, os.PathLike)):
        image = _open(image, what)
    if not isinstance(image, Image.Image):
        raise TypeError(f"{what} must be a PIL image or a path to an image file, got {type(image).__name__}")
    # Upright as viewers show it and as the training loader reads it, so a map lines up with its photo.
    image = ImageOps.exif_transpose(image)
    if image.mode not in _EIGHT_BIT_MODES:
        raise ValueError(f"{what} has PIL mode {image.mode!r} (16-bit or float); converting it would clip its "
                         "values: save it as 8-bit RGB or grayscale first")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def load_control_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """A user-made control map (path or PIL image) as an RGB PIL image, at its own size.

    Grayscale maps are repeated into three channels; transparent pixels become black (a map's
    "nothing here"), so white strokes drawn on a transparent layer stay white strokes on black.
    """
    return _to_rgb(image, "control image", background=(0, 0, 0))


def canny(image: str | os.PathLike | Image.Image, *, low: int = CANNY_DEFAULTS[0],
          high: int = CANNY_DEFAULTS[1]) -> Image.Image:
    """Canny edges of `image` (path or PIL image) as white on black RGB, the same size as the input.

    `low`, `high`: hysteresis thresholds on the gradient magnitude, ints in 0..255 (`check_thresholds`).
    Transparent pixels are composited onto white first, as the training data loader does.
    """
    low, high = check_thresholds(low, high)
    rgb = _to_rgb(image, "image", background=(255, 255, 255))
    try:
        import cv2
    except ImportError:
        raise ImportError(
            "the canny preprocessor needs OpenCV: pip install 'latentloom[control]' (or opencv-python-headless)"
        ) from None
    edges = cv2.Canny(np.asarray(rgb), low, high)  # (H, W) uint8, 0 or 255
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=2), "RGB")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (source images can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def control_recipe(preprocessor: str, source: str | os.PathLike, **settings: Any) -> dict[str, Any]:
    """What a preprocessed map records in its PNG: the preprocessor, its settings, and the source
    image's absolute path and SHA-256 (so a map can be traced to, and checked against, its input)."""
    import latentloom

    if preprocessor not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor {preprocessor!r}; expected one of {', '.join(PREPROCESSORS)}")
    source = Path(source)
    return {
        "task": "preprocess", "preprocessor": preprocessor, **settings,
        "source_image": str(source.resolve()), "source_sha256": file_sha256(source),
        "latentloom_version": latentloom.__version__,
    }
