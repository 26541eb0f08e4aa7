"""SDXL's micro-conditioning: the numbers beside the pooled text in the UNet's vector y.

Base models read 6: original_size (h, w), crops_coords_top_left (top, left), target_size (h, w).
Refiners read 5: original_size, crops_coords_top_left, aesthetic_score. Argument names and
defaults are diffusers': sizes default to the output size, crops to (0, 0), aesthetic scores to
6.0 / 2.5. The negative branch has its own numbers; each negative_* defaults to its positive twin.
(diffusers uses the negative sizes only when both negative_original_size and negative_target_size
are given; latentloom uses each one given.)
"""
from __future__ import annotations

import numbers as _numbers
from dataclasses import asdict, dataclass
from typing import Any

BASE_NUMBERS, REFINER_NUMBERS = 6, 5
ARGUMENTS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
             "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score", "negative_aesthetic_score")


@dataclass
class MicroConditioning:
    original_size: tuple[int, int]
    crops_coords_top_left: tuple[int, int]
    target_size: tuple[int, int]
    negative_original_size: tuple[int, int]
    negative_crops_coords_top_left: tuple[int, int]
    negative_target_size: tuple[int, int]
    aesthetic_score: float
    negative_aesthetic_score: float
    refiner: bool

    def numbers(self, *, negative: bool) -> list[float]:
        """The UNet's numbers for one branch, in sgm's order."""
        prefix = "negative_" if negative else ""
        values = [*getattr(self, prefix + "original_size"), *getattr(self, prefix + "crops_coords_top_left")]
        if self.refiner:
            return [*values, getattr(self, prefix + "aesthetic_score")]
        return [*values, *getattr(self, prefix + "target_size")]

    def recipe(self) -> dict[str, Any]:
        """What a PNG records (lists, as JSON has them); the refiner's unused target sizes and the base's
        unused aesthetic scores are left out."""
        skip = ("target_size", "negative_target_size") if self.refiner else ("aesthetic_score", "negative_aesthetic_score")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if k != "refiner" and k not in skip}


def micro_values(arguments: dict[str, Any]) -> dict[str, Any]:
    """The micro-conditioning among a pipeline call's arguments (its `locals()`), by their diffusers names."""
    return {name: arguments[name] for name in ARGUMENTS}


def vector_numbers(unet, pooled_size: int) -> int | None:
    """How many micro-conditioning numbers this UNet's y holds (None: it has no y)."""
    cfg = unet.config
    if cfg.adm_in_channels is None:
        return None
    count, rest = divmod(cfg.adm_in_channels - pooled_size, cfg.addition_time_embed_dim)
    if rest or count not in (BASE_NUMBERS, REFINER_NUMBERS):
        raise ValueError(f"the UNet's vector conditioning is {cfg.adm_in_channels} wide: not the text encoder's pooled "
                         f"{pooled_size} + 5 or 6 numbers x {cfg.addition_time_embed_dim}")
    return count


def parse_micro(pipe, *, height: int, width: int, values: dict[str, Any]) -> MicroConditioning | None:
    """The checked micro-conditioning of a call (None for models without one, which refuse these arguments)."""
    given = {k: v for k, v in values.items() if v is not None}
    pooled_size = getattr(pipe.text_encoder, "pooled_size", None)
    count = vector_numbers(pipe.unet, pooled_size) if pooled_size is not None else None
    if count is None:
        if given:
            raise ValueError(f"{sorted(given)} are SDXL's micro-conditioning; this model ({pipe.name}) takes none")
        return None
    refiner = count == REFINER_NUMBERS
    size = _pair(given.get("original_size", (height, width)), "original_size")
    crop = _pair(given.get("crops_coords_top_left", (0, 0)), "crops_coords_top_left")
    target = _pair(given.get("target_size", (height, width)), "target_size")
    score = _score(given.get("aesthetic_score", 6.0), "aesthetic_score")
    return MicroConditioning(
        original_size=size, crops_coords_top_left=crop, target_size=target,
        negative_original_size=_pair(given.get("negative_original_size", size), "negative_original_size"),
        negative_crops_coords_top_left=_pair(given.get("negative_crops_coords_top_left", crop),
                                             "negative_crops_coords_top_left"),
        negative_target_size=_pair(given.get("negative_target_size", target), "negative_target_size"),
        aesthetic_score=score,
        negative_aesthetic_score=_score(given.get("negative_aesthetic_score", 2.5), "negative_aesthetic_score"),
        refiner=refiner,
    )


def _pair(value: Any, name: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, _numbers.Integral) or v < 0 for v in value)):
        raise ValueError(f"{name} must be two ints >= 0 (height, width or top, left), got {value!r}")
    return int(value[0]), int(value[1])


def _score(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, _numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)
