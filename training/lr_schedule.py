"""Learning-rate schedules: linear warmup, then cosine decay to zero or constant."""
from __future__ import annotations

import math
from typing import Callable

import torch

from latentloom.training.config import LR_SCHEDULES


def lr_factor(step: int, *, kind: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr schedule {kind!r} is not one of {LR_SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, *, kind: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    fn: Callable[[int], float] = lambda step: lr_factor(  # noqa: E731
        step, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps
    )
    fn(0)  # raise on a bad kind here, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
