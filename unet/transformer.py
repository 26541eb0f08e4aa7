"""Spatial transformer: the latents attend to themselves and to the text tokens.

Pixels become tokens (B, H*W, C); each block runs self-attention, cross-attention
(queries from the latents, keys/values from the text context) and a GEGLU feed-forward,
all pre-LayerNorm with residuals (Rombach et al. 2022, LDM; Shazeer 2020, GEGLU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentloom.unet.attention import attention
from latentloom.unet.token_merge import TokenMerge


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections; k/v may come from a context."""

    def __init__(self, dim: int, *, heads: int, context_dim: int | None, upcast: bool,
                 dropout: float) -> None:
        super().__init__()
        kv_dim = dim if context_dim is None else context_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        # Set by UNet.set_attention_backend on every Attention at once.
        self.backend = "sdpa"
        self.query_chunk = 1024

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C); context (B, L, D) or None for self-attention; bias (B, 1, 1, L)."""
        kv = x if context is None else context
        out = attention(self.to_q(x), self.to_k(kv), self.to_v(kv), heads=self.heads, bias=bias,
                        backend=self.backend, upcast=self.upcast, query_chunk=self.query_chunk)
        return self.to_out(out)  # (B, N, C)


class GEGLU(nn.Module):
    """One matmul produces value and gate; out = value * gelu(gate)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4x width, dropout, back to the model width."""

    def __init__(self, dim: int, *, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Self-attention (or a second cross-attention), cross-attention, GEGLU feed-forward."""

    def __init__(self, dim: int, *, heads: int, context_dim: int, only_cross: bool,
                 upcast: bool, dropout: float) -> None:
        super().__init__()
        self.only_cross = only_cross
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, context_dim=context_dim if only_cross else None,
                               upcast=upcast, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads=heads, context_dim=context_dim, upcast=upcast,
                               dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None,
                merge: TokenMerge | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, N, C); merge: token merging before attn1 over the (H, W) = size token grid (ToMe)."""
        # In only-cross blocks (x4 upscaler) the first attention reads the text unmasked,
        # exactly as diffusers does; the padding mask applies to attn2.
        # Residuals added in place into the fresh Linear outputs (see ResBlock.forward).
        first_context = context if self.only_cross else None
        if merge is None:
            x = self.attn1(self.norm1(x), first_context).add_(x)
        else:
            # tomesd's metric is the block input; the residual stream keeps all N tokens
            m = merge.match(x, height=size[0], width=size[1])
            x = m.unmerge(self.attn1(m.merge(self.norm1(x)), first_context)).add_(x)
        x = self.attn2(self.norm2(x), context, bias).add_(x)
        return self.ff(self.norm3(x)).add_(x)  # (B, N, C)


class SpatialTransformer(nn.Module):
    """GroupNorm, project in, transformer blocks over H*W tokens, project out, residual.

    ``proj_in`` / ``proj_out`` are Linear layers even for SD 1.x, whose checkpoints hold
    them as 1x1 convs (same weights, reshaped at load): a token-major Linear keeps
    channels_last tensors free of layout copies.
    """

    def __init__(self, ch: int, *, heads: int, depth: int, context_dim: int, groups: int,
                 only_cross: bool, upcast: bool, dropout: float) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(ch, heads=heads, context_dim=context_dim, only_cross=only_cross,
                             upcast=upcast, dropout=dropout)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None,
                merge: TokenMerge | None = None) -> torch.Tensor:
        """x (B, C, H, W); merge: token merging for the blocks' self-attention (None: exact)."""
        B, C, H, W = x.shape
        # (B, H*W, C): free for channels_last input, one copy for NCHW.
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        h = self.proj_in(h)
        for i, block in enumerate(self.transformer_blocks):
            if merge is None:
                h = block(h, context, bias)
            else:
                h = block(h, context, bias, merge.child(i), (H, W))
        h = self.proj_out(h).view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), NHWC strides
        # Residual first: the sum takes the input's memory format.
        return x + h
