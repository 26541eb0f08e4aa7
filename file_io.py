"""Files that survive a crash, and JSON that says what is wrong with it.

Every file latentloom writes that a later run or a user reads (weights, configs, model_index.json,
checkpoints, PNGs, caches) goes through `write_atomic`: written under a temporary name beside its
place, flushed to disk, then renamed over it, so a kill leaves the old file or the new one, never
half of one. Folders (model components, checkpoints) are built under a temporary name and swapped
in with `replace_folder`. A model part: imports nothing of latentloom.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def default_mode(path: Path, *, folder: bool = False) -> None:
    """Give `path` the permissions a plain open / mkdir would (the umask's), not the owner-only
    ones tempfile makes: exported models and images are read by other users and tools."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any], *, fsync: bool = True) -> Path:
    """Call `write(tmp)` for a temporary file beside `path`, flush it to disk (unless `fsync` is
    False: many small files of a data set), then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        default_mode(tmp)
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def write_json_atomic(path: str | os.PathLike, value: Any, *, sort_keys: bool = True, allow_nan: bool = True) -> Path:
    """`value` as indented JSON (keys sorted unless told otherwise) with a final newline."""

    def dump(tmp: Path) -> None:
        with open(tmp, "w") as handle:
            json.dump(value, handle, indent=2, sort_keys=sort_keys, allow_nan=allow_nan)
            handle.write("\n")

    return write_atomic(path, dump)


def replace_folder(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Swap a completely written folder `tmp` into `final` (same parent): a kill leaves the old
    folder or the new one whole. An old `final` is moved aside first, then removed."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".old-{final.name}-"))
        os.rename(final, old / final.name)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    return final


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under `folder` to disk (before it is renamed into place)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file holding an object; FileNotFoundError or ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
