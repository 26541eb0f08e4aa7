"""Token merging for self-attention (ToMe for Stable Diffusion, Bolya & Hoffman 2023): fewer tokens
where self-attention is dearest, at the highest resolution, whose cost grows with the square of H*W.

Bipartite soft matching as tomesd does it: in every 2x2 window of the token grid one token, drawn at
random, is a destination (dst) and the other three are sources (src); with an odd height or width the
windows cover the even part only and the tokens left over are sources too (tomesd's rule). Each src
finds its most similar dst by cosine similarity of the block's input; the r = int(ratio * N) src most
similar to theirs are averaged into it (never more than there are src). Self-attention then runs on
N - r tokens, and unmerging copies each dst's output back to the src merged into it, so the residual
stream keeps all N tokens.

    merge = TokenMerge(0.5, seed=0)
    m = merge.match(x, height=H, width=W)  # x (B, H*W, C), the block's input
    out = m.unmerge(attn1(m.merge(norm1(x)))) + x

The UNet (`token_merge_ratio=`) merges before attn1 only, in the transformer blocks of its highest-
resolution level that has any (tomesd's defaults merge_attn=True, merge_crossattn=False,
merge_mlp=False, max_downsample=1). Each UNet call seeds the random dst draws from its timestep, so
a call's output depends only on its inputs: the same seed gives the same image, and classifier-free
guidance's two halves share one draw whether batched or not.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

_SEED_MOD = 2**63


def check_token_merge_ratio(value: Any) -> float:
    """None -> 0.0 (no merging); else a number in [0, 1). bool and str are refused, naming the value."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"token_merge_ratio must be a number in [0, 1) (0 or None: no token merging), got "
                        f"{type(value).__name__} {value!r}")
    ratio = float(value)
    if not math.isfinite(ratio) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"token_merge_ratio must be a number in [0, 1) (0 or None: no token merging), got {value}")
    return ratio


class Matching:
    """Which tokens of one (B, N, C) sequence merge into which; `merge` -> (B, N - r, C), `unmerge` -> back.

    keep (B, N - r): the positions that stay, unmerged src first, then every dst; moved (B, r): the
    merged src; into (B, r): the row of the merged sequence each of them joins (its dst); back (B, N):
    the row each position reads on unmerge. All None when nothing merges (r = 0).
    """

    def __init__(self, keep: torch.Tensor | None = None, moved: torch.Tensor | None = None,
                 into: torch.Tensor | None = None, back: torch.Tensor | None = None) -> None:
        self.keep, self.moved, self.into, self.back = keep, moved, into, back

    @property
    def r(self) -> int:
        return 0 if self.moved is None else self.moved.shape[1]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): each dst the mean of itself and the src merged into it."""
        if self.keep is None:
            return x
        C = x.shape[-1]
        out = x.gather(1, self.keep[..., None].expand(-1, -1, C))
        moved = x.gather(1, self.moved[..., None].expand(-1, -1, C))
        # include_self: the dst counts in its own mean, as tomesd's scatter_reduce(mean) does
        return out.scatter_reduce_(1, self.into[..., None].expand(-1, -1, C), moved, reduce="mean")

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C): one gather; a merged src takes its dst's row."""
        if self.back is None:
            return x
        return x.gather(1, self.back[..., None].expand(-1, -1, x.shape[-1]))


def dst_positions(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """(H//2 * W//2,) grid positions of the dst tokens: one drawn at random in each 2x2 window
    (windows in raster order); the draw happens on the CPU so any device gives the same pattern."""
    hs, ws = height // 2, width // 2
    pick = torch.randint(4, (hs, ws), generator=generator)  # which of the window's 4 tokens
    wy = torch.arange(hs)[:, None]
    wx = torch.arange(ws)[None, :]
    return ((2 * wy + pick // 2) * width + 2 * wx + pick % 2).flatten()


def bipartite_soft_matching(metric: torch.Tensor, *, height: int, width: int, r: int,
                            generator: torch.Generator) -> Matching:
    """Match each src token of metric (B, H*W, C) to its most similar dst (cosine) and choose the
    r src with the highest similarity to merge (capped at the number of src); tomesd's
    `bipartite_soft_matching_random2d` with sx = sy = 2."""
    B, N, _ = metric.shape
    if N != height * width:
        raise ValueError(f"token merging needs H*W = {height}*{width} = {height * width} tokens, got {N}")
    dst = dst_positions(height, width, generator)
    r = min(r, N - dst.numel())
    if r <= 0 or dst.numel() == 0:  # nothing to merge, or no 2x2 window (H or W is 1)
        return Matching()
    is_dst = torch.zeros(N, dtype=torch.bool)
    is_dst[dst] = True
    src = (~is_dst).nonzero().squeeze(1)  # (Ns,) ascending
    device = metric.device
    dst, src = dst.to(device), src.to(device)
    with torch.no_grad():
        unit = F.normalize(metric, dim=-1)  # eps: an all-zero token must not give NaN scores
        scores = unit[:, src] @ unit[:, dst].transpose(1, 2)  # (B, Ns, Nd)
        best, best_dst = scores.max(dim=-1)  # (B, Ns)
        # stable: equal scores (common in bf16) always order the same way
        order = best.argsort(dim=-1, descending=True, stable=True)
    merged, unmerged = order[:, :r], order[:, r:]  # (B, r), (B, Ns - r): indices into src
    n_unm = unmerged.shape[1]
    keep = torch.cat([src[unmerged], dst.expand(B, -1)], dim=1)  # (B, N - r)
    moved = src[merged]  # (B, r)
    into = n_unm + best_dst.gather(1, merged)  # (B, r)
    back = torch.empty(B, N, dtype=torch.long, device=device)
    back.scatter_(1, keep, torch.arange(N - r, device=device).expand(B, -1))
    back.scatter_(1, moved, into)
    return Matching(keep, moved, into, back)


@dataclass(frozen=True)
class TokenMerge:
    """The token merging of one UNet call: the ratio, and the seed its random dst draws come from.
    `child(i)` derives the seed of the i-th transformer / block, so every block draws its own pattern
    (as tomesd's per-block generators do) while the call stays a pure function of its inputs."""

    ratio: float
    seed: int

    def __post_init__(self) -> None:
        check_token_merge_ratio(self.ratio)

    @classmethod
    def for_timestep(cls, ratio: float, t: torch.Tensor) -> TokenMerge:
        """A call at timesteps t (B,): the draws change from step to step (tomesd's random dst)
        yet repeat for the same step; the first timestep decides, so a batch draws as one image."""
        return cls(ratio, round(float(t[0]) * 1000) % _SEED_MOD)

    def child(self, index: int) -> TokenMerge:
        return replace(self, seed=(self.seed * 1_000_003 + index + 1) % _SEED_MOD)

    def match(self, metric: torch.Tensor, *, height: int, width: int) -> Matching:
        """The matching for metric (B, H*W, C): r = int(ratio * H*W) merged tokens."""
        generator = torch.Generator().manual_seed(self.seed)
        return bipartite_soft_matching(metric, height=height, width=width, r=int(self.ratio * metric.shape[1]),
                                       generator=generator)
