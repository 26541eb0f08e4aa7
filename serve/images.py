"""Images in requests and answers: base64 (with or without a data: URL prefix) to PIL and back, with the
size limit checked from the header before any pixel is decoded (decompression bombs)."""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image

_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


class BadImage(ValueError):
    """An image field that is not a decodable image of an accepted size; `status` is the HTTP answer."""

    def __init__(self, message: str, *, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def set_pixel_limit(max_input_pixels: int) -> None:
    """PIL's own guard, process-wide: over MAX_IMAGE_PIXELS it warns (made an error here), over twice that it
    raises DecompressionBombError, both on open, before the pixels are decoded."""
    Image.MAX_IMAGE_PIXELS = max_input_pixels
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def decode_image(value: object, *, field: str, max_pixels: int) -> Image.Image:
    """A base64 PNG/JPEG/WebP (a data: URL too) -> a loaded RGB or RGBA/L PIL image."""
    if not isinstance(value, str) or not value:
        raise BadImage(f"{field} must be a base64-encoded image (PNG, JPEG, WebP; a data:image/...;base64, URL "
                       f"is accepted), got {type(value).__name__}")
    text = _DATA_URL.sub("", value.strip(), count=1)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadImage(f"{field} is not valid base64 ({err}); send the image file's bytes base64-encoded") from None
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"{field} is larger than {max_pixels} pixels, the most this server accepts "
                       "(--max-pixels)", status=413) from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL's ways of saying "not an image"
        raise BadImage(f"{field} is not an image PIL can read ({err}); send a PNG, JPEG or WebP") from None
    width, height = image.size
    if width * height > max_pixels:  # before load(): the header is all that has been read
        raise BadImage(f"{field} is {width}x{height} = {width * height} pixels; this server accepts at most "
                       f"{max_pixels} (--max-pixels)", status=413)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise BadImage(f"{field} could not be decoded ({err}); the file is truncated or corrupt") from None
    return image


def encode_png(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
