"""Step caching (DeepCache, Ma et al. 2023): reuse the UNet's slowly changing deep features between
sampler steps, running the whole network only every N steps and its shallow branch in between.

    cache = DeepCache(interval=3, calls_per_step=1)
    out = unet(x, t, context, cache=cache)  # step 0: the whole UNet; stores the deep feature
    cache.step_done(0)                      # from the sampler's per-step callback
    out = unet(x, t, context, cache=cache)  # step 1: conv_in, one down block, the last up blocks

The cache point is DeepCache's branch 0 for Stable Diffusion (its `cache_layer_id=0, cache_block_id=0`;
the same point in its diffusers and LDM-layout code). The last up level has one ResBlock per skip of
the first level (conv_in's output and each of the first down level's blocks). On a full step the
input of that level's second-to-last ResBlock (the one paired with the first down block's output,
before the skip is concatenated) is stored: everything deeper (the rest of the down path, the middle
block, the other up levels) is summarised by it. On a cached step the UNet computes conv_in and the
first down level's first block (ResBlock + transformer), then runs the last up level from that
ResBlock on, starting from the stored feature, and conv_norm_out / conv_out (SD 1.5: 1 of 8 down
ResBlocks and 2 of 12 up ResBlocks, with their transformers, all at the highest resolution).

A cache serves one sampling run of one batch: with classifier-free guidance cond + uncond are one
batch and are cached together. A cached call whose batch, latent size, dtype or device differs
from the stored feature's is an error, never a broadcast.
"""
from __future__ import annotations

import numbers
from typing import Any

import torch


def check_cache_interval(value: Any) -> int:
    """None -> 1 (no caching); else an int >= 1. bool, float and str are refused, naming the value."""
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"cache_interval must be an int >= 1 (1 or None: no step caching), got "
                        f"{type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"cache_interval must be an int >= 1 (1 or None: no step caching), got {value}")
    return int(value)


class DeepCache:
    """The state of step caching for one sampling run.

    interval: N; the whole UNet runs on sampler steps i with i % N == 0 (step 0 always), the shallow
    branch on the others. calls_per_step: UNet calls one sampler step makes (2 for Heun); the calls of
    one step are cached or not together. Steps are told apart by `step_done(i)`, which the sampler's
    per-step callback calls after step i's first call: after it, the next calls_per_step - 1 calls
    still belong to step i. `full_calls` / `cached_calls` count what ran.
    """

    def __init__(self, interval: int, *, calls_per_step: int = 1) -> None:
        self.interval = check_cache_interval(interval)
        if isinstance(calls_per_step, bool) or not isinstance(calls_per_step, int) or calls_per_step < 1:
            raise ValueError(f"calls_per_step must be an int >= 1, got {calls_per_step!r}")
        self.calls_per_step = calls_per_step
        self.feature: torch.Tensor | None = None  # (B, C, H, W) at the first level's resolution
        self.step = 0  # the sampler step of the latest call
        self.full_calls = 0
        self.cached_calls = 0
        self._last_done: int | None = None
        self._calls_since_done = 0
        self._undo: tuple[int, int, int] | None = None  # the bookkeeping before the latest call

    def step_done(self, i: int) -> None:
        """The sampler's step i made its first call (its per-step callback ran)."""
        self._last_done = int(i)
        self._calls_since_done = 0

    def begin_call(self) -> bool:
        """Called by the UNet once per forward: True when this call must run the whole network."""
        if self._last_done is None:
            step = 0
        else:
            step = self._last_done + (0 if self._calls_since_done < self.calls_per_step - 1 else 1)
            self._calls_since_done += 1
        self.step = step
        self._undo = (self._calls_since_done - (self._last_done is not None), self.full_calls, self.cached_calls)
        # no feature yet (or forgotten, e.g. after a switch to float32): this call must make one
        full = step % self.interval == 0 or self.feature is None
        if full:
            self.full_calls += 1
        else:
            self.cached_calls += 1
        return full

    def store(self, feature: torch.Tensor) -> None:
        self.feature = feature

    def load(self, like: torch.Tensor) -> torch.Tensor:
        """The stored feature, for a call whose first-level activations are `like` (B, C, H, W)."""
        f = self.feature
        if f is None:
            raise RuntimeError("the step cache holds no feature; a full UNet call must come first")
        if f.shape[0] != like.shape[0] or f.shape[2:] != like.shape[2:] or f.dtype != like.dtype \
                or f.device != like.device:
            raise ValueError(
                f"the step cache holds features of batch {f.shape[0]} at {f.shape[2]}x{f.shape[3]} latents "
                f"({f.dtype}, {f.device}), but this call has batch {like.shape[0]} at {like.shape[2]}x"
                f"{like.shape[3]} ({like.dtype}, {like.device}); a DeepCache serves one sampling run of one "
                "batch (cond + uncond together under guidance): make a new one")
        return f

    def forget(self, *, redo: bool = False) -> None:
        """Drop the stored feature: the next call runs the whole network. redo=True: that call is the
        latest one made again (e.g. in float32 after an overflow), so it counts in the same step."""
        self.feature = None
        if redo and self._undo is not None:
            self._calls_since_done, self.full_calls, self.cached_calls = self._undo
            self._undo = None

    def __repr__(self) -> str:
        return (f"DeepCache(interval={self.interval}, calls_per_step={self.calls_per_step}, step={self.step}, "
                f"full_calls={self.full_calls}, cached_calls={self.cached_calls})")
