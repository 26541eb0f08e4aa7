"""Tiled encode / decode: run a network on overlapping square tiles and blend the seams.

The tiles, overlaps and blend are diffusers' AutoencoderKL tiling, so a tiled image equals the one
diffusers makes: input tiles of `tile` pixels (or latents) start every tile x (1 - overlap); each
output tile (`out_tile` on a side) is blended linearly into the one above and the one to its left
over out_tile x overlap rows / columns, and the top-left out_tile x (1 - overlap) of each is kept.
Blends happen in place, in row order, so a tile blended into its upper neighbour is what its right
neighbour then blends with (as diffusers does).
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, tile: int, out_tile: int,
                overlap: float) -> torch.Tensor:
    """fn over the (B, C, H, W) tensor x tile by tile; the blended result."""
    if tile < 1 or out_tile < 1 or not 0.0 <= overlap < 1.0:
        raise ValueError(f"tiling needs tile >= 1, out_tile >= 1 and 0 <= overlap < 1; got {tile}, {out_tile}, "
                         f"{overlap}")
    step = max(int(tile * (1 - overlap)), 1)
    blend = int(out_tile * overlap)
    keep = out_tile - blend
    rows = [[fn(x[:, :, i:i + tile, j:j + tile]) for j in range(0, x.shape[3], step)]
            for i in range(0, x.shape[2], step)]
    out_rows = []
    for i, row in enumerate(rows):
        for j, piece in enumerate(row):
            if i > 0:
                _blend_into(rows[i - 1][j], piece, blend, dim=2)
            if j > 0:
                _blend_into(row[j - 1], piece, blend, dim=3)
        out_rows.append(torch.cat([piece[:, :, :keep, :keep] for piece in row], dim=3))
    return torch.cat(out_rows, dim=2)


def _blend_into(before: torch.Tensor, piece: torch.Tensor, extent: int, *, dim: int) -> None:
    """Fade from the last `extent` rows (dim=2) or columns (dim=3) of `before` into the first of
    `piece`, in place: weight y / extent on piece at offset y."""
    n = min(before.shape[dim], piece.shape[dim], extent)
    if n <= 0:
        return
    ramp = torch.arange(n, dtype=torch.float64) / n  # the weights in double, as Python floats would be
    shape = (n, 1) if dim == 2 else (n,)
    w_piece = ramp.to(device=piece.device, dtype=torch.float32).reshape(shape)
    w_before = (1 - ramp).to(device=piece.device, dtype=torch.float32).reshape(shape)
    head = piece.narrow(dim, 0, n)
    tail = before.narrow(dim, before.shape[dim] - n, n)
    head.copy_((tail.float() * w_before + head.float() * w_piece).to(piece.dtype))
