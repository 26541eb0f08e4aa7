"""Captioned image folders for training, and a cache of their VAE latents and text embeddings.

A dataset folder is either
- images with a caption file of the same name next to each (``cat.png`` + ``cat.txt``),
  searched recursively; or
- images plus a ``metadata.jsonl`` at the top, one JSON object a line with ``file_name``
  (relative to the folder) and ``text`` (the Hugging Face imagefolder convention). When
  it exists, ``metadata.jsonl`` is the whole truth: .txt files are ignored, and images it
  does not list are left out with a warning.

Each item is resized so that its shorter side is ``resolution`` (aspect kept), cropped to
``resolution`` x ``resolution`` (centre or random) and, with ``random_flip``, mirrored
left-right with probability 1/2. Augmentation draws come from a per-item stream seeded by
(seed, epoch, index, how often this process has read the item), so a run with
``num_workers=0`` (or one that calls ``set_epoch``) is reproducible.

ControlNet data (``conditioning=True``): each ``metadata.jsonl`` row also names a control map in
``conditioning_file_name`` (diffusers' train_controlnet.py layout; ``latentloom make-shapes
--control-maps`` writes one). The map must have its image's size, and gets the image's resize,
crop and flip, so the two stay aligned pixel for pixel.

``LatentCache`` encodes every item once and serves the stored latents and text embeddings
afterwards. Random crops cannot be cached (there are too many), so a cache refuses
``crop="random"``; random flips are cached honestly by encoding both the image and its
mirror (the VAE is not exactly flip-equivariant, so flipping latents would not do).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from latentloom.file_io import write_atomic
from latentloom.text_encoders.embedding import TextEmbedding

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CROPS = ("center", "random")
METADATA_FILE = "metadata.jsonl"
CONDITIONING_KEY = "conditioning_file_name"  # diffusers' train_controlnet.py column
CACHE_FORMAT = "latentloom-latent-cache-2"  # 2: each latent's micro-conditioning


def _check_resolution(resolution: object) -> int:
    # Latent models downsample by 8 (SD's VAE) or less; a multiple of 8 fits all of them.
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8 (e.g. 64, 256, 512), got {resolution!r}")
    return resolution


def _read_metadata(root: Path, *, conditioning: bool = False) -> list[tuple[Path, str, Path | None]]:
    """(image, caption, control map or None) per row; the maps are checked only when `conditioning`."""
    items = []
    path = root / METADATA_FILE
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {lineno} must be a JSON object with file_name and text")
        for key in ("file_name", "text"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{path}: line {lineno} needs a string {key!r}, got {row.get(key)!r}")
        file = root / row["file_name"]
        if not file.is_file():
            raise ValueError(f"{path}: line {lineno} names {row['file_name']!r}, which is not a file under {root}")
        name = row.get(CONDITIONING_KEY)
        if conditioning and not isinstance(name, str):
            raise ValueError(f"{path}: line {lineno} needs a string {CONDITIONING_KEY!r} (the control map's path "
                             f"under {root}) for conditioning=True, got {name!r}")
        control = root / name if isinstance(name, str) else None
        if conditioning and not control.is_file():
            raise ValueError(f"{path}: line {lineno} names control map {name!r}, which is not a file under {root}")
        items.append((file, row["text"], control))
    return items


def _find_images(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)  # temp/hidden files
    )


class CaptionedImageDataset(torch.utils.data.Dataset):
    """A folder of captioned images. Items: ``{"pixel_values": (3, R, R) float in [-1, 1], "caption": str,
    "micro": (4,)}``; with ``conditioning=True`` also ``"conditioning_pixel_values": (3, R, R) float in [0, 1]``
    (the control map, in [0, 1] as diffusers' train_controlnet.py feeds it to a ControlNet)."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        resolution: int,
        crop: str = "center",
        random_flip: bool = False,
        seed: int | None = None,
        conditioning: bool = False,
    ) -> None:
        self.root = Path(root)
        self.resolution = _check_resolution(resolution)
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
        self.crop, self.random_flip = crop, bool(random_flip)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder {str(self.root)!r} does not exist (or is not a folder)")
        self.conditioning = bool(conditioning)
        if (self.root / METADATA_FILE).is_file():
            items = _read_metadata(self.root, conditioning=self.conditioning)
            # control maps are images too, but listed ones are not "left out"
            listed = {f.resolve() for f, _, _ in items} | {c.resolve() for _, _, c in items if c is not None}
            unlisted = [p for p in _find_images(self.root) if p.resolve() not in listed]
            if unlisted:
                warnings.warn(
                    f"{len(unlisted)} image(s) under {self.root} are not in {METADATA_FILE} and are left out "
                    f"(first: {unlisted[0].relative_to(self.root)})",
                    stacklevel=2,
                )
        elif self.conditioning:
            raise ValueError(
                f"conditioning=True needs a {METADATA_FILE} in {str(self.root)!r} whose rows name each image's "
                f"control map in {CONDITIONING_KEY!r} (a folder of images with .txt captions has no maps)"
            )
        else:
            items = []
            for image in _find_images(self.root):
                txt = image.with_suffix(".txt")
                if not txt.is_file():
                    raise ValueError(
                        f"image {str(image.relative_to(self.root))!r} has no caption: expected "
                        f"{str(txt.relative_to(self.root))!r} next to it (or a {METADATA_FILE})"
                    )
                items.append((image, txt.read_text(encoding="utf-8").strip(), None))
        if not items:
            raise ValueError(
                f"no images in {str(self.root)!r}: expected files ending in {', '.join(IMAGE_EXTENSIONS)} "
                f"with captions (.txt of the same name, or {METADATA_FILE})"
            )
        self.files = [f for f, _, _ in items]
        self.captions = [c for _, c, _ in items]
        self.conditioning_files = [m for _, _, m in items] if self.conditioning else None
        self.seed = seed
        # Without a seed, augmentation is random per instance (but still one stream per item).
        self._salt = seed if seed is not None else random.SystemRandom().getrandbits(63)
        self.epoch = 0
        self._reads = [0] * len(self.files)
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Make augmentation a function of (seed, epoch, index) alone from here on."""
        self.epoch = int(epoch)
        self._reads = [0] * len(self.files)

    def rng(self, index: int) -> random.Random:
        """The next augmentation stream for item `index` (advances that item's read count)."""
        reads = self._reads[index]
        self._reads[index] += 1
        return random.Random(f"latentloom-data/{self._salt}/{self.epoch}/{index}/{reads}")

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, stacklevel=3)

    def load_image(self, index: int) -> Image.Image:
        """Item `index` as an RGB PIL image at its own size (transparency composited onto white)."""
        path = self.files[index]
        try:
            with Image.open(path) as im:
                im.load()
                image = im
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {str(path)!r}: {e}") from None
        # Cameras store rotation in EXIF; without this, portrait photos train sideways.
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            # 16-bit / float grayscale: PIL's convert("RGB") would clip, so rescale to 8 bits.
            values = np.asarray(image, dtype=np.float64)
            top = values.max(initial=0)
            if image.mode.startswith("I;16") or top > 255:
                peak = 65535.0
            else:  # "I" holding 8-bit values, or "F" in [0, 1] or [0, 255]
                peak = 1.0 if image.mode == "F" and top <= 1.0 else 255.0
            image = Image.fromarray(np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA"):
            rgba = image.convert("RGBA")
            if rgba.getextrema()[3][0] < 255:
                self._warn_once(
                    "alpha",
                    f"{path.name} has transparent pixels: composited onto white "
                    "(further images with transparency are handled the same way without a warning)",
                )
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB") if image.mode != "RGB" else image

    def pixel_values(self, index: int, *, flip: bool = False, rng: random.Random | None = None) -> torch.Tensor:
        """Item `index` resized, cropped (centre, or random from `rng`) and optionally mirrored: (3, R, R)."""
        return self.prepare(index, flip=flip, rng=rng)[0]

    def prepare(self, index: int, *, flip: bool = False,
                rng: random.Random | None = None) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """`pixel_values` with SDXL's micro-conditioning of the item: its original (height, width), and
        the crop's (top, left) in the resized image, mirrored with the image (diffusers' SDXL training
        flips the resized image before cropping, which is the same crop seen from the other side)."""
        pixels, original_size, crop_top_left, _ = self._prepare(index, flip=flip, rng=rng, conditioning=False)
        return pixels, original_size, crop_top_left

    def _prepare(self, index: int, *, flip: bool, rng: random.Random | None,
                 conditioning: bool) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int], torch.Tensor | None]:
        """`prepare`, plus the control map under the very same resize, crop and flip when `conditioning`."""
        image = self.load_image(index)
        w, h = image.size
        resized, (left, top) = self._layout(index, image.size, rng)
        pixels = _to_tensor(self._transform(image, resized, (left, top), flip)).div_(127.5).sub_(1.0)  # (3, R, R)
        control = None
        if conditioning:
            control_image = self.load_conditioning(index, size=image.size)
            control = _to_tensor(self._transform(control_image, resized, (left, top), flip)).div_(255.0)  # (3, R, R)
        if flip:
            left = resized[0] - self.resolution - left
        return pixels, (h, w), (top, left), control

    def _layout(self, index: int, size: tuple[int, int],
                rng: random.Random | None) -> tuple[tuple[int, int], tuple[int, int]]:
        """For item `index` of `size` (w, h): its resized (w, h), shorter side R, and the crop's (left, top),
        drawn from `rng` for random crops (so an image and its map take the same draws)."""
        r = self.resolution
        w, h = size
        if min(w, h) < r:
            self._warn_once(
                "upscale", f"{self.files[index].name} is {w}x{h}, smaller than resolution {r}: upscaled "
                "(further small images are upscaled without a warning)",
            )
        scale = r / min(w, h)
        new_w, new_h = max(r, round(w * scale)), max(r, round(h * scale))
        if self.crop == "random" and rng is not None:
            left, top = rng.randint(0, new_w - r), rng.randint(0, new_h - r)
        else:
            left, top = (new_w - r) // 2, (new_h - r) // 2
        return (new_w, new_h), (left, top)

    def _transform(self, image: Image.Image, resized: tuple[int, int], corner: tuple[int, int],
                   flip: bool) -> Image.Image:
        r = self.resolution
        if resized != image.size:
            image = image.resize(resized, Image.Resampling.BICUBIC, reducing_gap=None)
        left, top = corner
        image = image.crop((left, top, left + r, top + r))
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def load_conditioning(self, index: int, *, size: tuple[int, int] | None = None) -> Image.Image:
        """Item `index`'s control map as RGB at its own size, which must be its image's (w, h) `size`
        (read from the image file when not given): a map is never resized to fit."""
        from latentloom.pipelines.control_maps import load_control_image

        if self.conditioning_files is None:
            raise ValueError(f"this dataset was made without conditioning=True; it reads no control maps "
                             f"(from {METADATA_FILE}'s {CONDITIONING_KEY!r})")
        path = self.conditioning_files[index]
        control = load_control_image(path)
        size = self._image_size(index) if size is None else size
        if control.size != size:
            raise ValueError(
                f"control map {str(path)!r} is {control.width}x{control.height}, but its image "
                f"{str(self.files[index])!r} is {size[0]}x{size[1]}; make the map at the image's size"
            )
        return control

    def conditioning_values(self, index: int, *, flip: bool = False,
                            rng: random.Random | None = None) -> torch.Tensor:
        """Item `index`'s control map prepared as `pixel_values(index, flip=flip, rng=rng)` prepares its
        image (the same crop for an `rng` in the same state): (3, R, R) float in [0, 1]."""
        size = self._image_size(index)
        resized, corner = self._layout(index, size, rng)
        control = self._transform(self.load_conditioning(index, size=size), resized, corner, flip)
        return _to_tensor(control).div_(255.0)  # (3, R, R)

    def _image_size(self, index: int) -> tuple[int, int]:
        """The (w, h) `load_image` gives, from the file's header (EXIF rotations swap the sides)."""
        path = self.files[index]
        try:
            with Image.open(path) as im:
                w, h = im.size
                orientation = im.getexif().get(0x0112)  # EXIF Orientation
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {str(path)!r}: {e}") from None
        return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # 5-8: rotated by 90 or 270 degrees

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self.rng(index)
        # The flip is the stream's first draw, so a LatentCache makes the same choice.
        flip = self.random_flip and rng.random() < 0.5
        pixels, original_size, crop_top_left, control = self._prepare(
            index, flip=flip, rng=rng, conditioning=self.conditioning
        )
        item = {"pixel_values": pixels, "caption": self.captions[index],
                "micro": _micro(original_size, crop_top_left)}
        if control is not None:
            item["conditioning_pixel_values"] = control
        return item

    def fingerprint(self) -> str:
        """Identifies the data and preprocessing (files, sizes, mtimes, captions, resolution, crop, flip)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.resolution, self.crop, self.random_flip]).encode())
        for f, c in zip(self.files, self.captions):
            st = f.stat()
            h.update(json.dumps([str(f.relative_to(self.root)), st.st_size, st.st_mtime_ns, c]).encode())
        return h.hexdigest()


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as (3, H, W) float32 in 0..255."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()


def _micro(original_size: tuple[int, int], crop_top_left: tuple[int, int]) -> torch.Tensor:
    """(4,) int64: original height, width, crop top, left (SDXL's size and crop conditioning)."""
    return torch.tensor([*original_size, *crop_top_left], dtype=torch.long)


def _pad_text(items: Sequence[dict[str, Any]]) -> TextEmbedding:
    """Stack per-item (L_i, D) embeddings, padding to the longest L with mask 0."""
    length = max(it["hidden"].shape[0] for it in items)
    hidden = items[0]["hidden"].new_zeros((len(items), length, items[0]["hidden"].shape[1]))  # (B, L, D)
    mask = items[0]["mask"].new_zeros((len(items), length))  # (B, L)
    for i, it in enumerate(items):
        n = it["hidden"].shape[0]
        hidden[i, :n], mask[i, :n] = it["hidden"], it["mask"]
    pooled = None
    if all(it.get("pooled") is not None for it in items):
        pooled = torch.stack([it["pooled"] for it in items])  # (B, D')
    return TextEmbedding(hidden, mask, pooled)


class LatentCache(torch.utils.data.Dataset):
    """Encodes each item of a `CaptionedImageDataset` once; serves stored results afterwards.

    encode_image: (B, 3, R, R) float32 CPU pixels in [-1, 1] (move them to the VAE's device
        inside) -> (B, C, h, w) latents, already scaled as
        the model wants them. Whatever it returns is frozen: encoding with a *sample* of the
        VAE's posterior stores that one sample, so prefer its mean (``latent_dist.mode()``).
    encode_text: list[str] -> TextEmbedding. Each distinct caption is encoded once.
    path: optional ``.safetensors`` file. If it exists and was made from the same data and
        `key`, it is loaded; otherwise the cache is rebuilt (with a warning) and written
        there, atomically, as soon as every item is encoded.
    key: names the encoders (e.g. "sd-vae-ft-mse+minilm"): a cache made with other
        encoders is not reused.

    Items: ``{"latents": (C, h, w), "hidden": (L, D), "mask": (L,), "pooled": (D',) or None,
    "micro": (4,) original size and crop, "caption": str}``, plus the dataset's "conditioning_pixel_values"
    when it has them, on the CPU (`UNetTask.collate` batches them). Items are encoded on
    first use, or all at once, in batches, by `fill()`; with DataLoader workers, call
    `fill()` first (a worker's copy of the cache would be lost with the worker).
    """

    def __init__(
        self,
        dataset: CaptionedImageDataset,
        *,
        encode_image: Callable[[torch.Tensor], torch.Tensor],
        encode_text: Callable[[list[str]], TextEmbedding],
        path: str | os.PathLike | None = None,
        key: str = "",
    ) -> None:
        if not isinstance(dataset, CaptionedImageDataset):
            raise TypeError(f"dataset must be a CaptionedImageDataset, got {type(dataset).__name__}")
        if dataset.crop != "center":
            raise ValueError(
                f"a latent cache needs crop='center' (got {dataset.crop!r}): every random crop would be a "
                "different latent. Use crop='center' with the cache, or train without the cache"
            )
        self.dataset = dataset
        self.encode_image, self.encode_text = encode_image, encode_text
        self.path = None if path is None else Path(path)
        self.key = key
        self.flips = (False, True) if dataset.random_flip else (False,)
        self._latents: dict[tuple[int, bool], torch.Tensor] = {}  # (index, flip) -> (C, h, w)
        self._micro: dict[tuple[int, bool], torch.Tensor] = {}  # (index, flip) -> (4,)
        self._text: dict[str, dict[str, torch.Tensor | None]] = {}  # caption -> hidden/mask/pooled
        self._saved = False
        if self.path is not None and self.path.exists():
            self._load()

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def complete(self) -> bool:
        return len(self._latents) == len(self.dataset) * len(self.flips) and all(
            c in self._text for c in self.dataset.captions
        )

    # ------------------------------------------------------------------ encoding

    @torch.no_grad()
    def _encode_images(self, keys: list[tuple[int, bool]]) -> None:
        prepared = [self.dataset.prepare(i, flip=f) for i, f in keys]
        pixels = torch.stack([p for p, _, _ in prepared])  # (B, 3, R, R)
        latents = self.encode_image(pixels)
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[0] != len(keys):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"encode_image must return (B={len(keys)}, C, h, w) latents, got {got}")
        for k, z, (_, size, crop) in zip(keys, latents.detach().cpu(), prepared):
            self._latents[k] = z.clone()  # own storage: safetensors refuses shared tensors
            self._micro[k] = _micro(size, crop)

    @torch.no_grad()
    def _encode_texts(self, captions: list[str]) -> None:
        emb = self.encode_text(captions)
        if not isinstance(emb, TextEmbedding):
            raise TypeError(f"encode_text must return a TextEmbedding, got {type(emb).__name__}")
        if len(emb) != len(captions):
            raise ValueError(f"encode_text returned {len(emb)} embeddings for {len(captions)} captions")
        for i, c in enumerate(captions):
            self._text[c] = {
                "hidden": emb.hidden[i].detach().cpu().clone(),  # (L, D)
                "mask": emb.mask[i].detach().cpu().clone(),  # (L,)
                "pooled": None if emb.pooled is None else emb.pooled[i].detach().cpu().clone(),  # (D',)
            }

    def fill(self, *, batch_size: int = 16) -> None:
        """Encode everything not yet cached, `batch_size` images (or captions) per call; then save."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        todo = [(i, f) for i in range(len(self.dataset)) for f in self.flips if (i, f) not in self._latents]
        for s in range(0, len(todo), batch_size):
            self._encode_images(todo[s : s + batch_size])
        captions = list(dict.fromkeys(c for c in self.dataset.captions if c not in self._text))
        for s in range(0, len(captions), batch_size):
            self._encode_texts(captions[s : s + batch_size])
        self._maybe_save()

    def text(self, captions: list[str]) -> TextEmbedding:
        """Embeddings of any captions (e.g. "" for caption dropout), encoding the missing ones once."""
        missing = list(dict.fromkeys(c for c in captions if c not in self._text))
        if missing:
            self._encode_texts(missing)
        return _pad_text([self._text[c] for c in captions])

    def __getitem__(self, index: int) -> dict[str, Any]:
        # Same first draw as CaptionedImageDataset.__getitem__: the same flips, cached or not.
        flip = self.dataset.random_flip and self.dataset.rng(index).random() < 0.5
        missing = [(index, f) for f in self.flips if (index, f) not in self._latents]
        caption = self.dataset.captions[index]
        if (missing or caption not in self._text) and torch.utils.data.get_worker_info() is not None:
            # A worker's copy of the cache dies with the worker: it would re-encode forever.
            raise RuntimeError(
                f"LatentCache item {index} is not encoded yet, inside a DataLoader worker; call "
                "cache.fill() before iterating with num_workers > 0 (or use num_workers=0)"
            )
        if missing:  # both flips in one call: the mirror will be needed soon enough
            self._encode_images(missing)
        if caption not in self._text:
            self._encode_texts([caption])
        if missing:
            self._maybe_save()
        text = self._text[caption]
        item = {"latents": self._latents[(index, flip)], "micro": self._micro[(index, flip)], **text,
                "caption": caption}
        if self.dataset.conditioning:  # maps are cheap to read, so not cached; the flip is the latents' flip
            item["conditioning_pixel_values"] = self.dataset.conditioning_values(index, flip=flip)
        return item

    # ------------------------------------------------------------------ disk

    def _maybe_save(self) -> None:
        if self.path is not None and not self._saved and self.complete:
            self.save()

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the cache to a safetensors file (temporary name, then rename)."""
        from safetensors.torch import save_file

        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("no path: pass save(path=...) or LatentCache(..., path=...)")
        tensors: dict[str, torch.Tensor] = {}
        for (i, f), z in self._latents.items():
            tensors[f"latents.{i}.{int(f)}"] = z.contiguous()
            tensors[f"micro.{i}.{int(f)}"] = self._micro[(i, f)].contiguous()
        captions = list(self._text)
        for k, c in enumerate(captions):
            for name, t in self._text[c].items():
                if t is not None:
                    tensors[f"text.{k}.{name}"] = t.contiguous()
        metadata = {
            "format": CACHE_FORMAT,
            "fingerprint": self.dataset.fingerprint(),
            "key": self.key,
            "captions": json.dumps(captions),
        }
        write_atomic(target, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), fsync=False)
        if target == self.path:
            self._saved = True
        return target

    def _load(self) -> None:
        from safetensors import SafetensorError, safe_open

        assert self.path is not None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                stale = (
                    meta.get("format") != CACHE_FORMAT
                    or meta.get("key") != self.key
                    or meta.get("fingerprint") != self.dataset.fingerprint()
                )
                if stale:
                    warnings.warn(
                        f"latent cache {self.path} was made from other data, preprocessing or encoders "
                        f"(key {meta.get('key')!r}, this run {self.key!r}): re-encoding and overwriting it",
                        stacklevel=3,
                    )
                    return
                captions = json.loads(meta["captions"])
                names = set(f.keys())
                for name in names:
                    kind, a, b = name.split(".")
                    if kind in ("latents", "micro"):
                        store = self._latents if kind == "latents" else self._micro
                        store[(int(a), bool(int(b)))] = f.get_tensor(name)
                for k, c in enumerate(captions):
                    pooled = f"text.{k}.pooled"
                    self._text[c] = {
                        "hidden": f.get_tensor(f"text.{k}.hidden"),
                        "mask": f.get_tensor(f"text.{k}.mask"),
                        "pooled": f.get_tensor(pooled) if pooled in names else None,
                    }
        except (SafetensorError, OSError, ValueError, KeyError) as e:  # JSONDecodeError is a ValueError
            self._latents.clear()
            self._micro.clear()
            self._text.clear()
            warnings.warn(f"latent cache {self.path} is unreadable ({e}): re-encoding and overwriting it", stacklevel=3)
            return
        self._saved = self.complete
