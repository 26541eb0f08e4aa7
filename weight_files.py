"""Reading weight files that may be hostile or broken: one place every loader goes through.

The safetensors library already refuses structurally broken files (truncated data, a header
length past the end, a huge header, overlapping or out-of-range offsets, trailing bytes),
but its messages name no file, a git-LFS pointer reads as "header too large", and its
error type is neither ValueError nor OSError. Here each becomes a ValueError that names the
file and says what to do; a missing file is a FileNotFoundError.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

# What a git-LFS pointer file starts with (a clone made without `git lfs pull`).
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
_LFS_POINTER_MAX_BYTES = 1024
# Real headers of SD-sized files are ~100 KB; the library's own cap is 100 MB.
_HEADER_LIMIT = 100_000_000


def is_lfs_pointer(path: str | os.PathLike) -> bool:
    """True when the file is a git-LFS pointer (a small text file) instead of the weights."""
    path = Path(path)
    try:
        if path.stat().st_size > _LFS_POINTER_MAX_BYTES:
            return False
        with open(path, "rb") as f:
            return f.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX
    except OSError:
        return False


def check_safetensors(path: str | os.PathLike) -> Path:
    """Validate a .safetensors file's header and layout without reading its tensors.

    For files that diffusers / transformers read themselves: a broken one fails here with a
    message naming it rather than deep inside the other library.
    """
    from safetensors import SafetensorError, safe_open

    path = _existing(path)
    size = path.stat().st_size
    if size >= 8:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
        if header_len > min(size - 8, _HEADER_LIMIT):
            raise ValueError(
                f"{path} is not a readable .safetensors file: its header claims {header_len} bytes but the "
                f"file has {size} (truncated, or not a safetensors file)"
            )
    try:
        with safe_open(str(path), framework="pt"):
            pass  # opening parses the header and checks that offsets tile the data exactly
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable .safetensors file: {err}") from err
    return path


def load_safetensors(path: str | os.PathLike, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; ValueError naming the file when it is broken."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = check_safetensors(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable .safetensors file: {err}") from err


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if is_lfs_pointer(path):
        raise ValueError(f"{path} is a git-lfs pointer, not the weights: run `git lfs pull` in that clone "
                         "(or download the file itself)")
    return path
