"""Prompt following on the synthetic shapes domain: per-attribute accuracy of a generator.

`latentloom eval` wires a real pipeline into `generate`; the held-out captions of
`synthetic.shapes` (color/shape/position triples never seen in training) measure whether
the model composes attributes rather than remembering captions.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from latentloom.evaluation.shape_checker import score
from latentloom.synthetic.shapes import SPLITS, SceneSpec, make_item, parse_caption

ATTRIBUTES = ("color", "shape", "size", "position", "background")

Generate = Callable[[list[str], int], list[Image.Image]]


def domain_prompts(n: int, *, seed: int, split: str = "heldout") -> list[tuple[str, SceneSpec]]:
    """`n` captions of the split, each with the scene *the caption states* (parsed, no jitter).

    Scoring against the parsed scene checks only what the prompt asks for: a caption that
    does not name the background is not scored on it.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    out = []
    for i in range(n):
        _, text, _ = make_item(i, seed=seed, split=split)
        out.append((text, parse_caption(text)))
    return out


def evaluate(
    generate: Generate,
    captions_with_scenes: Sequence[tuple[str, SceneSpec | None]],
    *,
    images_per_caption: int = 1,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Generate images for each caption and score them with the shape checker.

    generate(captions, k) must return k images per caption, caption-major
    ([c0 #0, c0 #1, ..., c1 #0, ...]); it is called with at most `batch_size` captions.
    A scene of None means parse_caption(caption).

    Returns {"accuracy": {attribute: fraction}, "all_correct": fraction of images right on
    every scored attribute, "counts": {attribute: (right, scored)}, "num_captions",
    "num_images", "per_caption": [{"caption", "scores": [per-image dicts]}], "table": str}.
    """
    if not isinstance(images_per_caption, int) or images_per_caption < 1:
        raise ValueError(f"images_per_caption must be a positive int, got {images_per_caption!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    pairs = [(c, s if s is not None else parse_caption(c)) for c, s in captions_with_scenes]
    if not pairs:
        raise ValueError("captions_with_scenes is empty: nothing to evaluate")
    for c, s in pairs:
        if not isinstance(c, str) or not isinstance(s, SceneSpec):
            raise TypeError(f"expected (caption: str, scene: SceneSpec | None) pairs, got ({c!r}, {s!r})")

    right, scored = Counter(), Counter()
    all_right = 0
    per_caption = []
    k = images_per_caption
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        images = list(generate([c for c, _ in chunk], k))
        if len(images) != len(chunk) * k:
            raise ValueError(
                f"generate returned {len(images)} images for {len(chunk)} captions x {k} per caption "
                f"(expected {len(chunk) * k}, caption-major)"
            )
        for j, (text, scene) in enumerate(chunk):
            scores = [score(image, scene) for image in images[j * k : (j + 1) * k]]
            for s in scores:
                for attr, ok in s.items():
                    right[attr] += bool(ok)
                    scored[attr] += 1
                all_right += all(s.values())
            per_caption.append({"caption": text, "scores": scores})

    num_images = len(pairs) * k
    accuracy = {a: right[a] / scored[a] for a in ATTRIBUTES if scored[a]}
    result = {
        "accuracy": accuracy,
        "all_correct": all_right / num_images,
        "counts": {a: (right[a], scored[a]) for a in ATTRIBUTES if scored[a]},
        "num_captions": len(pairs),
        "num_images": num_images,
        "per_caption": per_caption,
    }
    result["table"] = format_table(result)
    return result


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of `evaluate`'s result: one row per attribute, then all-correct."""
    rows = [f"{'attribute':<12}{'accuracy':>10}{'correct / scored':>20}"]
    for attr, (r, n) in result["counts"].items():
        rows.append(f"{attr:<12}{100 * r / n:>9.1f}%{f'{r} / {n}':>20}")
    n = result["num_images"]
    frac = result["all_correct"]
    rows.append(f"{'all':<12}{100 * frac:>9.1f}%{f'{round(frac * n)} / {n}':>20}")
    return "\n".join(rows)
