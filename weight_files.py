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


def load_safetensors(path: str | os.PathLike, *, device: str = "cpu",
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; ValueError naming the file when it is broken.

    dtype: cast floating-point tensors to it as each is read, so an fp32 file loaded in bf16 never
    holds the whole fp32 copy. Tensors are read with plain file reads rather than a memory map, so
    the file's pages stay in the page cache instead of in this process's resident memory."""
    import json

    path = check_safetensors(path)  # header and offsets checked by the safetensors library first
    out: dict[str, torch.Tensor] = {}
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
            start = 8 + header_len
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                stored = _SAFETENSORS_DTYPES.get(entry["dtype"])
                if stored is None:
                    raise ValueError(f"tensor {name!r} has dtype {entry['dtype']}, which latentloom does not read")
                begin, end = entry["data_offsets"]
                tensor = torch.empty(entry["shape"], dtype=stored)
                view = tensor.view(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
                if view.numel() != end - begin:
                    raise ValueError(f"tensor {name!r}: {end - begin} bytes for shape {entry['shape']}")
                f.seek(start + begin)
                if f.readinto(memoryview(view.numpy())) != end - begin:
                    raise ValueError(f"tensor {name!r} is cut short")
                if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                out[name] = tensor.to(device) if device != "cpu" else tensor
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable .safetensors file: {err}") from err
    return out


# safetensors' dtype names -> torch (every dtype a diffusion checkpoint holds)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if is_lfs_pointer(path):
        raise ValueError(f"{path} is a git-lfs pointer, not the weights: run `git lfs pull` in that clone "
                         "(or download the file itself)")
    return path
