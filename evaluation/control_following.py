"""Control following on the synthetic shapes domain: does a ControlNet put the shape where its map
says, at the map's size and outline, while the prompt still sets color, shape and background?

For held-out one-shape scenes (`synthetic.shapes`, split "heldout") the map is the scene's
`render_control_map` (white silhouette on black). Each scene is generated twice with its map: with its
own caption ("agrees"), and with a caption naming another position ("disagrees": the map should win,
so position is scored against the map). Scored per image: the mask IoU of the generated shape
(pixels nearer the detected shape color than the background, `shape_checker.detect`) with the map's
white pixels, reported for large and small shapes apart, and the prompt-following attributes of
`shape_checker.score` against the map's scene.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from latentloom.evaluation.shape_checker import NONE, detect, score
from latentloom.synthetic.shapes import (
    COLORS, NUM_PHRASINGS, SPLITS, SceneSpec, caption, make_item, render_control_map,
)

# rows of the table, in order: mask IoU by size, then the attributes
IOU_ROWS = ("mask IoU large", "mask IoU small")
ATTRIBUTES = ("color", "shape", "size", "position", "background")
# another position for a conflicting caption: the opposite side, and for the center a side
OTHER_POSITION = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "left"}

# generate(captions, control maps) -> one image per caption
GenerateWithMaps = Callable[[list[str], list[Image.Image]], list[Image.Image]]


@dataclasses.dataclass(frozen=True)
class ControlCase:
    """One scene to generate: the map's scene (what is scored), its map, and the two captions."""

    scene: SceneSpec
    control: Image.Image
    caption: str  # the scene's own caption
    conflicting: str  # the same caption with another position
    prompt_position: str  # the position the conflicting caption names


def control_cases(n: int, *, seed: int, split: str = "heldout", size: int = 64) -> list[ControlCase]:
    """The first `n` one-shape scenes of the split (two-shape scenes are skipped: the mask of a second,
    differently colored shape is not the first's) with their maps at `size` px."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    cases, index = [], 0
    while len(cases) < n:
        _, text, scene = make_item(index, seed=seed, split=split)
        index += 1
        if len(scene.shapes) != 1:
            continue
        shape = scene.shapes[0]
        other = OTHER_POSITION[shape.position]
        moved = SceneSpec(shapes=(dataclasses.replace(shape, position=other),), background=scene.background)
        # phrasings cycle so both captions of a case read alike and all phrasings appear
        conflicting = caption(moved, phrasing=index % NUM_PHRASINGS)
        own = caption(scene, phrasing=index % NUM_PHRASINGS)
        if other not in conflicting:  # a phrasing without the position would not conflict
            continue
        cases.append(ControlCase(scene, render_control_map(scene, size=size), own, conflicting, other))
    return cases


def shape_mask(image: Image.Image | np.ndarray) -> np.ndarray:
    """(64, 64) bool: the pixels nearer the detected shape's color than the background's (half
    coverage, as the map's white pixels are); all False when the checker finds no shape."""
    found = detect(image)
    if found.color == NONE:
        return np.zeros((64, 64), dtype=bool)
    from latentloom.evaluation.shape_checker import _to_array

    arr = _to_array(image)
    bg = np.asarray(COLORS[found.background], dtype=np.float32)
    direction = np.asarray(found.rgb, dtype=np.float32) - bg
    alpha = ((arr - bg) @ direction) / max(float(direction @ direction), 1e-6)
    return alpha >= 0.5


def map_mask(control: Image.Image) -> np.ndarray:
    """(64, 64) bool: the map's white (at least half-covered) pixels, at the checker's size."""
    im = control.convert("L")
    if im.size != (64, 64):
        im = im.resize((64, 64), Image.Resampling.BOX)
    return np.asarray(im, dtype=np.float32) >= 127.5


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def evaluate_control(generate: GenerateWithMaps, cases: Sequence[ControlCase], *, conflicting: bool = False,
                     batch_size: int = 8) -> dict[str, Any]:
    """Generate one image per case (with the conflicting captions when `conflicting`) and score it.

    Returns {"rows": {row: value in [0, 1] or None}, "counts": {row: images scored}, "num_images",
    "prompt_position": fraction of images at the prompt's position (conflicting only), "per_image": [...]}.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not cases:
        raise ValueError("cases is empty: nothing to evaluate")
    ious: dict[str, list[float]] = {row: [] for row in IOU_ROWS}
    right: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    every, at_prompt, per_image = [], [], []
    for start in range(0, len(cases), batch_size):
        chunk = list(cases[start : start + batch_size])
        texts = [c.conflicting if conflicting else c.caption for c in chunk]
        images = list(generate(texts, [c.control for c in chunk]))
        if len(images) != len(chunk):
            raise ValueError(f"generate returned {len(images)} images for {len(chunk)} captions (expected one each)")
        for case, text, image in zip(chunk, texts, images):
            iou = mask_iou(shape_mask(image), map_mask(case.control))
            ious[f"mask IoU {case.scene.shapes[0].size}"].append(iou)
            scores = score(image, case.scene)  # against the map's scene: its position wins
            for attr, ok in scores.items():
                right[attr].append(bool(ok))
            every.append(all(scores.values()))
            if conflicting:
                at_prompt.append(detect(image).position == case.prompt_position)
            per_image.append({"caption": text, "iou": iou, "scores": scores})
    rows: dict[str, float | None] = {row: (float(np.mean(v)) if v else None) for row, v in ious.items()}
    rows.update({a: (float(np.mean(v)) if v else None) for a, v in right.items()})
    rows["all"] = float(np.mean(every))
    counts = {**{row: len(v) for row, v in ious.items()}, **{a: len(v) for a, v in right.items()}, "all": len(every)}
    return {"rows": rows, "counts": counts, "num_images": len(every),
            "prompt_position": float(np.mean(at_prompt)) if conflicting else None, "per_image": per_image}


def format_control_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per measure (IoU as a fraction, attributes in percent), one column per setting."""
    names = list(results)
    width = max(14, *(len(n) + 2 for n in names))
    lines = [f"{'measure':<20}" + "".join(f"{n:>{width}}" for n in names)]
    for row in (*IOU_ROWS, *ATTRIBUTES, "all", "at prompt position"):
        cells = []
        for n in names:
            res = results[n]
            value = res["prompt_position"] if row == "at prompt position" else res["rows"].get(row)
            if value is None:
                cells.append(f"{'-':>{width}}")
            elif row in IOU_ROWS:
                cells.append(f"{value:>{width}.3f}")
            else:
                cells.append(f"{100 * value:>{width - 1}.1f}%")
        lines.append(f"{row:<20}" + "".join(cells))
    return "\n".join(lines)

