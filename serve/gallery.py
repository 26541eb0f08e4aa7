"""The outputs folder as a gallery: every finished image is written there (atomically, with its recipe)
before its request is answered; the listing reads the folder, so a restarted server shows earlier images."""
from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from latentloom.pipelines.metadata import read_metadata, save_png

# names this server writes, and the only ones /outputs/{name} serves
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.png$")


class Gallery:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._root = self.folder.resolve()
        self._recipes: dict[str, tuple[float, Any]] = {}  # name -> (mtime, recipe): the folder is re-read often
        self._lock = threading.Lock()

    def save(self, image, recipe: dict[str, Any], *, seed: int | None = None) -> str:
        """Write one image with its recipe; returns its gallery name."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{stamp}-{uuid.uuid4().hex[:8]}" + (f"-{seed}" if seed is not None else "") + ".png"
        save_png(image, self.folder / name, recipe)
        return name

    def path(self, name: str) -> Path | None:
        """The file of a gallery name, or None for anything that is not a PNG directly inside the folder
        (other folders, `..`, absolute paths, symlinks out)."""
        if not isinstance(name, str) or not _NAME.match(name):
            return None
        path = self.folder / name
        try:
            if path.is_symlink() or not path.is_file() or path.resolve().parent != self._root:
                return None
        except OSError:
            return None
        return path

    def recipe(self, name: str) -> Any:
        path = self.path(name)
        if path is None:
            raise FileNotFoundError(name)
        return self._recipe(path)

    def _recipe(self, path: Path) -> Any:
        mtime = path.stat().st_mtime
        with self._lock:
            cached = self._recipes.get(path.name)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            recipe = read_metadata(path)
        except (ValueError, FileNotFoundError):
            recipe = None  # a PNG someone else put there: listed, without a recipe
        with self._lock:
            self._recipes[path.name] = (mtime, recipe)
        return recipe

    def items(self) -> list[dict[str, Any]]:
        """[{name, url, recipe, created}], newest first."""
        found = []
        for entry in self.folder.iterdir():
            path = self.path(entry.name)
            if path is None:
                continue
            try:
                found.append((path.stat().st_mtime, path))
            except OSError:  # removed meanwhile
                continue
        found.sort(key=lambda item: (item[0], item[1].name), reverse=True)
        return [{"name": p.name, "url": f"/outputs/{p.name}", "recipe": self._recipe(p), "created": mtime}
                for mtime, p in found]
