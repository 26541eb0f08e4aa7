"""The server's model list: named sources loaded lazily, one resident at a time (the worker thread loads them)."""
from __future__ import annotations

import gc
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("latentloom.serve")


@dataclass
class ModelEntry:
    source: str  # what load_pipeline is given
    title: str  # the name clients see and switch with (A1111's sd_model_checkpoint)
    filename: str
    hash: str | None = None  # the weights' short hash, known once loaded
    scale: int | None = None  # an upscaler's enlargement, known once loaded

    def a1111(self) -> dict[str, Any]:
        """One item of A1111's /sdapi/v1/sd-models."""
        return {"title": self.title, "model_name": self.title, "hash": self.hash, "sha256": None,
                "filename": self.filename, "config": None}


def model_title(source: str) -> str:
    if source.startswith("bundled:"):
        return source
    path = Path(source)
    return path.name or str(path)


class ModelRegistry:
    """The models a server can switch between. `pipeline()` returns the resident one, loading the current
    model first when needed; `select(name)` makes another current and drops the resident one, so only
    one model's weights are in memory. Only the worker thread calls `pipeline()`."""

    def __init__(self, sources: list[str], *, loader: Callable[[str], Any] | None = None) -> None:
        self.entries: list[ModelEntry] = []
        for source in sources:
            title = model_title(source)
            if any(e.title == title for e in self.entries):  # two folders of one name: number them
                title = f"{title}-{len(self.entries)}"
            filename = source if source.startswith("bundled:") else str(Path(source).resolve())
            self.entries.append(ModelEntry(source=source, title=title, filename=filename))
        self._loader = loader or _load
        self._lock = threading.Lock()
        self.current = self.entries[0]
        self._resident: tuple[ModelEntry, Any] | None = None

    def titles(self) -> list[str]:
        return [e.title for e in self.entries]

    def find(self, name: Any) -> ModelEntry:
        """An entry by title, file name or hash; A1111 clients send "title [hash]"."""
        if not isinstance(name, str) or not name.strip():
            raise LookupError(f"sd_model_checkpoint must be a model title, one of {self.titles()}, got {name!r}")
        wanted = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", name.strip())
        for entry in self.entries:
            if wanted in (entry.title, entry.filename, entry.source) or (entry.hash and wanted == entry.hash):
                return entry
        raise LookupError(f"unknown model {name!r} for sd_model_checkpoint; this server has {self.titles()}")

    def select(self, name: Any) -> ModelEntry:
        """Make a model current (loaded at the next `pipeline()`)."""
        entry = self.find(name)
        with self._lock:
            self.current = entry
        return entry

    def is_loaded(self) -> bool:
        resident = self._resident
        return resident is not None and resident[0] is self.current

    def pipeline(self) -> Any:
        with self._lock:
            entry, resident = self.current, self._resident
        if resident is not None and resident[0] is entry:
            return resident[1]
        if resident is not None:  # free the old weights before reading the new ones
            self._resident = None
            del resident
            gc.collect()
        log.info("loading model %s (%s)", entry.title, entry.source)
        pipe = self._loader(entry.source)
        entry.hash = _hash_of(pipe)
        if getattr(pipe, "upscaler", None) is not None:
            entry.scale = pipe.vae_scale_factor
        self._resident = (entry, pipe)
        return pipe


def _load(source: str):
    from latentloom.pipelines.loading import load_pipeline

    return load_pipeline(source)


def _hash_of(pipe) -> str | None:
    try:
        value = pipe.model_hash()
    except (AttributeError, OSError):
        return None
    return None if value == "unknown" else value
