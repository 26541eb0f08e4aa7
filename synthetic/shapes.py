"""The bundled synthetic domain: captioned 64x64 images of one or two simple shapes.

The default model is trained on this data, and `latentloom eval` measures prompt following
on it with the procedural checker in `latentloom.evaluation.shape_checker`.

Vocabulary: shapes ``SHAPES``, colors ``COLORS`` (well separated in RGB), sizes ``SIZES``,
positions ``POSITIONS``; the background is one of the colors, never a shape's color.

Layout rules (they keep every scene unambiguous for the checker):
- A position is where the shape's bounding-box centre sits: 16 px from the image centre
  towards that side (or the centre itself), jittered by at most +-2 px.
- A small shape spans 13-17 px, a large one 26-30 px (its bounding box's longer side).
- A two-shape scene names the large shape first and the small one second, at opposite
  positions (left/right or top/bottom), in two different colors; the checker scores the
  first-named shape, which is the largest non-background region.

Held-out split: ``HELDOUT_COMBOS`` is the set of (color, shape, position) triples with
``(color_index + 3 * shape_index + 7 * position_index) % 10 == 0`` (indices into
``COLORS``, ``SHAPES``, ``POSITIONS``): 20 of the 200 triples, exactly one color for each
(shape, position) pair, so every color, shape and position still appears in training.
No shape in a "train" scene is a held-out triple; the first-named shape of every
"heldout" scene is one (e.g. "a small red star on the right" never appears in training).

Control maps (`render_control_map`, `make-shapes --control-maps`): each scene's shapes as white
silhouettes on black, drawn from the same geometry as the image, for training a ControlNet.
`--conflict-captions F` then re-captions a fraction F of the one-shape scenes with another
position than the map's (`conflicting_captions`), so the ControlNet learns that the map wins.

Determinism: item ``i`` of ``make_dataset(n, seed=s, split=...)`` depends only on
(s, split, i), so a longer dataset extends a shorter one, and the PNG bytes are identical
from run to run (PIL draws and encodes deterministically; no timestamps are written).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

from latentloom.file_io import write_atomic, write_bytes_atomic

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Saturated, well-separated colors: the closest pair (orange/yellow) is ~80 apart in RGB.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "cyan": (40, 210, 220),
    "pink": (245, 130, 190),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
SPLITS: tuple[str, ...] = ("train", "heldout")

CANVAS = 64  # scene coordinates are in a 64x64 frame, scaled to the rendered size
POSITION_OFFSET = 16.0
POSITION_JITTER = 2.0
SIZE_RANGE: dict[str, tuple[float, float]] = {"small": (13.0, 17.0), "large": (26.0, 30.0)}
NOMINAL_EXTENT: dict[str, float] = {"small": 15.0, "large": 28.0}
STAR_INNER_RATIO = 0.45  # fatter arms than a pentagram (0.38) so small stars stay stars at 64 px
SUPERSAMPLE = 4  # draw 4x larger, then box-filter down: clean anti-aliased edges
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
TWO_SHAPE_PROBABILITY = 0.25
NUM_PHRASINGS = 6

_CENTERS: dict[str, tuple[float, float]] = {
    "left": (CANVAS / 2 - POSITION_OFFSET, CANVAS / 2),
    "right": (CANVAS / 2 + POSITION_OFFSET, CANVAS / 2),
    "top": (CANVAS / 2, CANVAS / 2 - POSITION_OFFSET),
    "bottom": (CANVAS / 2, CANVAS / 2 + POSITION_OFFSET),
    "center": (CANVAS / 2, CANVAS / 2),
}

_COLOR_NAMES = tuple(COLORS)
HELDOUT_COMBOS: frozenset[tuple[str, str, str]] = frozenset(
    (c, s, p)
    for ci, c in enumerate(_COLOR_NAMES)
    for si, s in enumerate(SHAPES)
    for pi, p in enumerate(POSITIONS)
    if (ci + 3 * si + 7 * pi) % 10 == 0
)


def _check(value: object, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class ShapeSpec:
    """One shape: what a caption says about it, plus the exact geometry it is drawn with.

    extent: the bounding box's longer side in 64-px units (None: the size's nominal value).
    dx, dy: jitter of the bounding-box centre from the position's centre, in 64-px units.
    """

    shape: str
    color: str
    size: str | None = None
    position: str | None = None
    extent: float | None = None
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self) -> None:
        _check(self.shape, SHAPES, "shape")
        _check(self.color, _COLOR_NAMES, "color")
        if self.size is not None:
            _check(self.size, SIZES, "size")
        if self.position is not None:
            _check(self.position, POSITIONS, "position")
        if self.extent is not None and not 4.0 <= self.extent <= CANVAS:
            raise ValueError(f"extent must be in [4, {CANVAS}] (64-px units), got {self.extent}")

    @property
    def combo(self) -> tuple[str, str, str | None]:
        return (self.color, self.shape, self.position)


@dataclass(frozen=True)
class SceneSpec:
    """One or two shapes on a flat background. The first shape is the one a caption names first.

    background: a color name, or None when unknown (e.g. parsed from a caption that does
    not name it); `render` then picks black, or white where a shape is black.
    """

    shapes: tuple[ShapeSpec, ...]
    background: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.shapes, tuple):
            object.__setattr__(self, "shapes", tuple(self.shapes))
        if len(self.shapes) not in (1, 2):
            raise ValueError(f"a scene holds 1 or 2 shapes, got {len(self.shapes)}")
        if self.background is not None:
            _check(self.background, _COLOR_NAMES, "background color")
            for s in self.shapes:
                if s.color == self.background:
                    raise ValueError(
                        f"shape color {s.color!r} equals the background {self.background!r}: "
                        "the shape would be invisible; pick a different background"
                    )

    def resolved_background(self) -> str:
        if self.background is not None:
            return self.background
        return "white" if any(s.color == "black" for s in self.shapes) else "black"


# --------------------------------------------------------------------------- sampling


def _sample_shape(rng: random.Random, *, size: str, position: str, color: str, shape: str) -> ShapeSpec:
    lo, hi = SIZE_RANGE[size]
    return ShapeSpec(
        shape=shape,
        color=color,
        size=size,
        position=position,
        extent=round(rng.uniform(lo, hi), 3),
        dx=round(rng.uniform(-POSITION_JITTER, POSITION_JITTER), 3),
        dy=round(rng.uniform(-POSITION_JITTER, POSITION_JITTER), 3),
    )


def sample_scene(rng: random.Random, *, split: str = "train") -> SceneSpec:
    """Draw one scene of the split from `rng` (a `random.Random`): see the module notes."""
    _check(split, SPLITS, "split")
    two = rng.random() < TWO_SHAPE_PROBABILITY
    while True:  # rejection sampling: about 1 in 10 first draws is a held-out triple
        if split == "heldout":
            color, shape, position = rng.choice(sorted(HELDOUT_COMBOS))
            if two and position == "center":
                continue
        else:
            color, shape = rng.choice(_COLOR_NAMES), rng.choice(SHAPES)
            position = rng.choice(tuple(OPPOSITE) if two else POSITIONS)
            if (color, shape, position) in HELDOUT_COMBOS:
                continue
        break
    if not two:
        first = _sample_shape(rng, size=rng.choice(SIZES), position=position, color=color, shape=shape)
        taken = {color}
        shapes: tuple[ShapeSpec, ...] = (first,)
    else:
        first = _sample_shape(rng, size="large", position=position, color=color, shape=shape)
        while True:
            color2, shape2 = rng.choice(_COLOR_NAMES), rng.choice(SHAPES)
            if color2 != color and (color2, shape2, OPPOSITE[position]) not in HELDOUT_COMBOS:
                break
        second = _sample_shape(rng, size="small", position=OPPOSITE[position], color=color2, shape=shape2)
        taken = {color, color2}
        shapes = (first, second)
    background = rng.choice([c for c in _COLOR_NAMES if c not in taken])
    return SceneSpec(shapes=shapes, background=background)


# --------------------------------------------------------------------------- rendering


def _polygon(shape: str, cx: float, cy: float, extent: float) -> list[tuple[float, float]]:
    """Vertices of a triangle or star whose bounding box is centred on (cx, cy), longer side `extent`."""
    if shape == "triangle":  # equilateral, pointing up
        h = extent * math.sqrt(3) / 2
        return [(cx, cy - h / 2), (cx + extent / 2, cy + h / 2), (cx - extent / 2, cy + h / 2)]
    # Five-pointed star, one point up. In units of the outer radius R its bounding box is
    # 2 sin72 wide and 1 + cos36 tall, so R follows from the extent and the centre shifts down.
    width, height = 2 * math.sin(math.radians(72)), 1 + math.cos(math.radians(36))
    r_outer = extent / width
    oy = cy - height * r_outer / 2 + r_outer  # star centre: top point sits at cy - box_height/2
    pts = []
    for k in range(10):
        r = r_outer if k % 2 == 0 else r_outer * STAR_INNER_RATIO
        a = math.radians(-90 + 36 * k)
        pts.append((cx + r * math.cos(a), oy + r * math.sin(a)))
    return pts


def draw_outline(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, extent: float, fill) -> None:
    """Fill `shape` with its bounding box centred on (cx, cy), longer side `extent` (draw's pixels)."""
    e = extent
    if shape == "circle":
        draw.ellipse([cx - e / 2, cy - e / 2, cx + e / 2, cy + e / 2], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - e / 2, cy - e / 2, cx + e / 2, cy + e / 2], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, e), fill=fill)


def _draw_shape(draw: ImageDraw.ImageDraw, spec: ShapeSpec, scale: float, fill=None) -> None:
    """Draw `spec` in its colour, or in `fill` (a control map's white)."""
    extent = spec.extent if spec.extent is not None else NOMINAL_EXTENT[spec.size or "small"]
    px, py = _CENTERS[spec.position or "center"]
    fill = COLORS[spec.color] if fill is None else fill
    draw_outline(draw, spec.shape, (px + spec.dx) * scale, (py + spec.dy) * scale, extent * scale, fill)


def render(scene: SceneSpec, *, size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image of `size` x `size`: supersampled, then box-filtered down."""
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLORS[scene.resolved_background()])
    draw = ImageDraw.Draw(image)
    # Draw the second (small) shape first so the first-named shape is on top if they ever touch.
    for spec in reversed(scene.shapes):
        _draw_shape(draw, spec, big / CANVAS)
    return image.resize((size, size), Image.Resampling.BOX)


def render_control_map(scene: SceneSpec, *, size: int = 64) -> Image.Image:
    """The scene's layout as a ControlNet map: every shape's silhouette in white on black, RGB.

    A silhouette drawn from the scene's geometry, not edges found by a detector: it is exact (no
    thresholds, no broken or doubled lines), it states position, size and shape in every pixel it
    covers (a 1-px outline of a 13-px shape at 64 px is thin signal after the ControlNet's 8x
    downsampling), it is what a mask-IoU check compares against, and a user can draw one. Drawn
    like `render` (same supersampling and box filter), so its grey edge pixels are exactly the
    shapes' coverage in the rendered image. Colours are left to the prompt.
    """
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for spec in scene.shapes:
        _draw_shape(draw, spec, big / CANVAS, fill=(255, 255, 255))
    return image.resize((size, size), Image.Resampling.BOX)


# --------------------------------------------------------------------------- captions

_POS_PHRASE = {
    "left": ("on the left", "at the left", "left side"),
    "right": ("on the right", "at the right", "right side"),
    "top": ("at the top", "at the top", "top side"),
    "bottom": ("at the bottom", "at the bottom", "bottom side"),
    "center": ("in the center", "in the middle", "center"),
}


def _noun(s: ShapeSpec, *, article: bool) -> str:
    body = " ".join(w for w in (s.size, s.color, s.shape) if w)
    return f"{_article(body)} {body}" if article else body


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def caption(scene: SceneSpec, *, phrasing: int) -> str:
    """The scene in words; `phrasing` in [0, NUM_PHRASINGS) picks one of the templates.

    0 "a small red circle on the left"
    1 "a small red circle on the left on a blue background"
    2 "red circle, small, left side, on blue"
    3 "a large yellow star in the center of a black background"
    4 "a blue background with a small red circle at the left"
    5 "small red circle in the middle, blue background"
    Two-shape scenes join the shapes with "and" (phrasing 2: with ";").
    Phrasing 0 does not name the background.
    """
    if not isinstance(phrasing, int) or not 0 <= phrasing < NUM_PHRASINGS:
        raise ValueError(f"phrasing must be an int in [0, {NUM_PHRASINGS}), got {phrasing!r}")
    bg = scene.resolved_background()

    def pos(s: ShapeSpec, k: int) -> str:
        return _POS_PHRASE[s.position or "center"][k] if s.position else ""

    def join(parts: list[str], sep: str = " and ") -> str:
        return sep.join(p.strip() for p in parts)

    shapes = scene.shapes
    if phrasing == 0:
        return join([f"{_noun(s, article=True)} {pos(s, 0)}" for s in shapes])
    if phrasing == 1:
        return join([f"{_noun(s, article=True)} {pos(s, 0)}" for s in shapes]) + f" on {_article(bg)} {bg} background"
    if phrasing == 2:
        parts = []
        for s in shapes:
            words = [f"{s.color} {s.shape}"] + [w for w in (s.size, pos(s, 2)) if w]
            parts.append(", ".join(words))
        return join(parts, "; ") + f", on {bg}"
    if phrasing == 3:
        body = join([f"{_noun(s, article=True)} {pos(s, 0)}" for s in shapes])
        return f"{body} of {_article(bg)} {bg} background"
    if phrasing == 4:
        return f"{_article(bg)} {bg} background with " + join([f"{_noun(s, article=True)} {pos(s, 1)}" for s in shapes])
    return join([f"{_noun(s, article=False)} {pos(s, 1)}" for s in shapes]) + f", {bg} background"


_WORD = {w: kind for kind, words in (("shape", SHAPES), ("color", _COLOR_NAMES), ("size", SIZES)) for w in words}
_POS_WORDS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "center": "center", "middle": "center"}
_BG_PATTERNS = (
    re.compile(r"(?:on|of) (?:a |an )?(\w+) background"),
    re.compile(r"^(?:a |an )?(\w+) background with"),
    re.compile(r",\s*(\w+) background$"),
    re.compile(r",\s*on (\w+)$"),
)


def parse_caption(text: str) -> SceneSpec:
    """Invert `caption` (any phrasing): the scene a caption asks for, without the jitter.

    Attributes the caption does not state are None (size, position, background). Raises
    ValueError when no shape word, or more than two shapes, are found.
    """
    t = text.lower().strip()
    background = None
    for pat in _BG_PATTERNS:
        m = pat.search(t)
        if m and m.group(1) in COLORS:
            background = m.group(1)
            t = t[: m.start()] + " " + t[m.end():]
            break
    chunks = [c for c in re.split(r"\band\b|;", t) if c.strip()]
    shapes: list[ShapeSpec] = []
    for chunk in chunks:
        found: dict[str, str] = {}
        for w in re.findall(r"[a-z]+", chunk):
            if w in _WORD and _WORD[w] not in found:
                found[_WORD[w]] = w
            elif w in _POS_WORDS and "position" not in found:
                found["position"] = _POS_WORDS[w]
        if "shape" not in found:
            continue
        if "color" not in found:
            raise ValueError(f"no color word for the {found['shape']} in caption {text!r}")
        shapes.append(ShapeSpec(**found))
    if not shapes:
        raise ValueError(f"no shape word ({', '.join(SHAPES)}) in caption {text!r}")
    if len(shapes) > 2:
        raise ValueError(f"at most 2 shapes per caption, found {len(shapes)} in {text!r}")
    return SceneSpec(shapes=tuple(shapes), background=background)


# --------------------------------------------------------------------------- datasets


def _item_rng(seed: int, split: str, index: int) -> random.Random:
    # A str seed is hashed with SHA-512 by `random.Random`: stable across runs and platforms.
    return random.Random(f"latentloom-shapes/{split}/{seed}/{index}")


def make_item(
    index: int, *, seed: int, split: str = "train", size: int = CANVAS
) -> tuple[Image.Image, str, SceneSpec]:
    """Item `index` of the dataset with this seed and split: (image, caption, scene).

    `size` only changes the rendering: the scene and caption are the same at every size.
    """
    rng = _item_rng(seed, split, index)
    scene = sample_scene(rng, split=split)
    text = caption(scene, phrasing=rng.randrange(NUM_PHRASINGS))
    return render(scene, size=size), text, scene


def make_dataset(n: int, *, seed: int, split: str = "train") -> list[tuple[Image.Image, str, SceneSpec]]:
    """`n` (image, caption, scene) triples; deterministic in (seed, split)."""
    _check(split, SPLITS, "split")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return [make_item(i, seed=seed, split=split) for i in range(n)]


def scene_to_dict(scene: SceneSpec) -> dict:
    return {
        "background": scene.background,
        "shapes": [
            {k: getattr(s, k) for k in ("shape", "color", "size", "position", "extent", "dx", "dy")}
            for s in scene.shapes
        ],
    }


def scene_from_dict(d: dict) -> SceneSpec:
    return SceneSpec(shapes=tuple(ShapeSpec(**s) for s in d["shapes"]), background=d.get("background"))


DATASET_SIZES = range(CANVAS, 1024 + 1, CANVAS)  # 64, 128, ..., 1024


def check_dataset_size(size: object) -> int:
    """`size` if it is a multiple of 64 in [64, 1024], else ValueError naming it.

    Multiples of 64 keep the scene's 64-px geometry on whole pixels of every rendering, and
    every size a VAE with factor 8 and a 3-level UNet can take.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size not in DATASET_SIZES:
        raise ValueError(
            f"size must be a multiple of {CANVAS} in [{CANVAS}, 1024] (64, 128, 192, ..., 1024), got {size!r}"
        )
    return size


CONDITIONING_FOLDER = "conditioning"
# the positions a conflicting caption may name instead of the map's: the opposite side first,
# then the others in POSITIONS order (a fixed order, as rng.choice needs)
_OTHER_POSITIONS: dict[str, tuple[str, ...]] = {
    p: tuple(q for q in dict.fromkeys((OPPOSITE.get(p), *POSITIONS)) if q not in (None, p)) for p in POSITIONS}


def conflicting_captions(scenes: list[SceneSpec], fraction: float, *, seed: int) -> list[tuple[str, int]]:
    """Which rows to re-caption so that the caption disagrees with the map, and with what.

    `scenes`: the rows' scenes in dataset order. Each one-shape scene is picked with probability
    `fraction` and gets a caption that names another position (any of the other four, never one
    that would make a held-out triple, so eval captions stay unseen), in a random phrasing.
    Returns [(new caption, row index)]. One `random.Random(seed)` walks the rows in order, so a
    longer dataset extends a shorter one, as the images do.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"conflict_captions must be a fraction in [0, 1], got {fraction!r}")
    rng = random.Random(seed)
    changed = []
    for index, scene in enumerate(scenes):
        if len(scene.shapes) != 1 or not rng.random() < fraction:
            continue
        shape = scene.shapes[0]
        allowed = [p for p in _OTHER_POSITIONS[shape.position] if (shape.color, shape.shape, p) not in HELDOUT_COMBOS]
        moved = SceneSpec(shapes=(replace(shape, position=rng.choice(allowed)),),
                          background=scene.background)
        changed.append((caption(moved, phrasing=rng.randrange(NUM_PHRASINGS)), index))
    return changed


def write_dataset(
    folder: str | os.PathLike, n: int, *, seed: int, split: str = "train", size: int = CANVAS,
    control_maps: bool = False, conflict_captions: float = 0.0,
) -> Path:
    """Write `n` PNGs and a `metadata.jsonl` (file_name, text, scene) into `folder`.

    `size`: the side of every PNG, a multiple of 64 in [64, 1024]; the scenes and captions
    depend only on (seed, split), so datasets of one seed at two sizes are pairs of the same
    scenes (e.g. 64-px inputs and 256-px targets for an upscaler).

    `control_maps`: also write each scene's `render_control_map` to ``conditioning/NAME.png``
    and name it in the row's ``conditioning_file_name`` (diffusers' train_controlnet.py layout).
    Without it the files are exactly those written before the option existed.

    `conflict_captions`: with `control_maps`, the fraction of one-shape scenes whose caption
    names another position than the map's (`conflicting_captions`); the row's ``scene`` stays
    the drawn one. 0 (the default) changes nothing.

    Every file is written to a temporary name and renamed, and `metadata.jsonl` last, so a
    crash never leaves a metadata file that points at missing or half-written images.
    Refuses a folder that already holds a metadata.jsonl (no silent overwrite).
    """
    _check(split, SPLITS, "split")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    check_dataset_size(size)
    if conflict_captions and not control_maps:
        raise ValueError(f"conflict_captions={conflict_captions!r} needs control_maps=True: without a map "
                         "there is nothing for the caption to conflict with")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "metadata.jsonl"
    if meta_path.exists():
        raise FileExistsError(f"{meta_path} already exists; write into an empty folder or remove it")
    width = max(5, len(str(n - 1)))
    rows = []
    for i in range(n):
        image, text, scene = make_item(i, seed=seed, split=split, size=size)
        name = f"{split}_{i:0{width}d}.png"
        write_atomic(out / name, lambda tmp, im=image: im.save(tmp, format="PNG"), fsync=False)
        row = {"file_name": name, "text": text}
        if control_maps:
            control = render_control_map(scene, size=size)
            row["conditioning_file_name"] = f"{CONDITIONING_FOLDER}/{name}"
            write_atomic(out / row["conditioning_file_name"], lambda tmp, im=control: im.save(tmp, format="PNG"),
                         fsync=False)
        rows.append((row, scene))
    if conflict_captions:
        for text, i in conflicting_captions([scene for _, scene in rows], conflict_captions, seed=seed):
            rows[i][0]["text"] = text
    lines = [json.dumps({**row, "scene": scene_to_dict(scene)}) for row, scene in rows]
    payload = ("\n".join(lines) + "\n").encode()
    write_bytes_atomic(meta_path, payload, fsync=False)
    return out
