"""UNet: the Stable-Diffusion-style denoiser.

    unet(x, t, context, *, context_mask=None, class_labels=None, y=None, guidance=None) -> prediction

Levels of ResBlocks (+ spatial transformers where ``attention_levels`` says so) go down,
a middle block, the mirrored levels come up reading the skip connections
(Ronneberger et al. 2015; Rombach et al. 2022, LDM). Parameter names match diffusers'
``UNet2DConditionModel``; convert.py handles the checkpoint formats.

The signature stays small; each kind of conditioning has one way in:
- spatial conditioning is concatenated onto ``x`` by the caller (inpainting's mask and masked
  latents, the upscaler's low-resolution image); ``in_channels`` says how many there are;
- tokens (text) are ``context``, read by cross-attention, with ``context_mask`` for padding;
- per-image vectors enter through the timestep embedding: ``class_labels`` (an index: the x4
  upscaler's noise level) and ``y`` (a vector: SDXL's pooled text + embedded size numbers, built
  by ``vector_conditioning``; sgm's name), and ``guidance`` (B,), the guidance scale w of
  LCM-distilled UNets, embedded like a timestep (``guidance_embedding``) and projected into the
  timestep's sinusoidal embedding, as diffusers' ``time_cond_proj_dim`` / ``timestep_cond`` do;
- add-on networks (ControlNet) pass their residuals as one optional keyword, ``control=(down, mid)``:
  down[k] is added to the k-th skip tensor and mid to the middle block's output (diffusers'
  ``down_block_additional_residuals`` / ``mid_block_additional_residual``).
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from latentloom.unet.attention import DEFAULT_QUERY_CHUNK, check_backend, mask_to_bias
from latentloom.unet.blocks import Downsample, ResBlock, TimestepMLP, Upsample, timestep_embedding
from latentloom.unet.config import UNetConfig
from latentloom.unet.step_cache import DeepCache
from latentloom.unet.token_merge import TokenMerge, check_token_merge_ratio
from latentloom.unet.transformer import Attention, SpatialTransformer


class Level(nn.Module):
    """One resolution: ResBlocks, optional spatial transformers, optional resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.resnets = nn.ModuleList()
        self.attentions = nn.ModuleList()


class MidBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, *, emb_dim: int) -> None:
        super().__init__()
        ch = cfg.channels[-1]
        res = dict(emb_dim=emb_dim, groups=cfg.norm_groups, eps=cfg.norm_eps, dropout=cfg.dropout)
        self.resnets = nn.ModuleList([ResBlock(ch, ch, **res), ResBlock(ch, ch, **res)])
        self.attentions = nn.ModuleList([_transformer(cfg, cfg.num_levels - 1, only_cross=False)])


def _transformer(cfg: UNetConfig, level: int, *, only_cross: bool) -> SpatialTransformer:
    return SpatialTransformer(
        cfg.channels[level], heads=cfg.heads_at(level), depth=cfg.transformer_depth[level],
        context_dim=cfg.context_dim, groups=cfg.norm_groups, only_cross=only_cross,
        upcast=cfg.upcast_attention, dropout=cfg.dropout,
    )


def build_embeddings(module: nn.Module, cfg: UNetConfig) -> None:
    """The embeddings and input conv of a UNet's encoder, as `module`'s attributes under diffusers' names
    (time_embedding, class_embedding, add_embedding, conv_in): shared by the UNet and the ControlNet."""
    ch0, emb_dim = cfg.channels[0], cfg.time_embed_dim
    module.time_embedding = TimestepMLP(ch0, emb_dim, cond_dim=cfg.time_cond_proj_dim)
    module.class_embedding = nn.Embedding(cfg.num_class_embeds, emb_dim) if cfg.num_class_embeds is not None else None
    module.add_embedding = TimestepMLP(cfg.adm_in_channels, emb_dim) if cfg.adm_in_channels is not None else None
    module.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)


def build_down_levels(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The encoder's levels (ResBlocks, transformers, downsamplers) and the channels of every tensor
    pushed on the skip stack, conv_in's first: shared by the UNet and the ControlNet."""
    res = dict(emb_dim=cfg.time_embed_dim, groups=cfg.norm_groups, eps=cfg.norm_eps, dropout=cfg.dropout)
    skip_channels = [cfg.channels[0]]
    levels = nn.ModuleList()
    ch = cfg.channels[0]
    for i, out_ch in enumerate(cfg.channels):
        level = Level()
        for _ in range(cfg.layers_per_level[i]):
            level.resnets.append(ResBlock(ch, out_ch, **res))
            ch = out_ch
            if cfg.attention_levels[i]:
                level.attentions.append(_transformer(cfg, i, only_cross=cfg.only_cross_attention[i]))
            skip_channels.append(ch)
        level.downsamplers = nn.ModuleList()
        if i < cfg.num_levels - 1:
            level.downsamplers.append(Downsample(ch))
            skip_channels.append(ch)
        levels.append(level)
    return levels, skip_channels


class UNet(nn.Module):
    """Text-conditioned UNet: ``unet(x, t, context, *, context_mask=None, class_labels=None, y=None)``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet expects a UNetConfig, got {type(config).__name__}")
        self._config = config
        cfg = config
        ch0, emb_dim = cfg.channels[0], cfg.time_embed_dim
        res = dict(emb_dim=emb_dim, groups=cfg.norm_groups, eps=cfg.norm_eps, dropout=cfg.dropout)
        build_embeddings(self, cfg)
        self.down_blocks, skip_channels = build_down_levels(cfg)
        ch = cfg.channels[-1]

        self.mid_block = MidBlock(cfg, emb_dim=emb_dim)

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(cfg.num_levels)):
            level, out_ch = Level(), cfg.channels[i]
            for j in range(cfg.layers_per_level[i] + 1):
                level.resnets.append(ResBlock(ch + skip_channels.pop(), out_ch, **res))
                ch = out_ch
                if cfg.attention_levels[i]:
                    level.attentions.append(_transformer(cfg, i, only_cross=cfg.only_cross_attention[i]))
            level.upsamplers = nn.ModuleList()
            if i > 0:
                level.upsamplers.append(Upsample(ch))
            self.up_blocks.append(level)

        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch0, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch0, cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False
        self._backend = "sdpa"
        # token merging's level: the highest resolution with transformers (SD 1.x/2.x: level 0, as
        # tomesd's max_downsample=1; SDXL and the bundled model have none at level 0, so level 1)
        self.merge_level = next((i for i, a in enumerate(cfg.attention_levels) if a), None)

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> UNetConfig:
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    @property
    def attention_backend(self) -> str:
        return self._backend

    # ------------------------------------------------------------------ switches
    def set_attention_backend(self, name: str, *, query_chunk: int = DEFAULT_QUERY_CHUNK) -> None:
        """Choose "sdpa" (default), "xformers" (CUDA), "chunked" (bounded memory) or "math"."""
        check_backend(name, device=self.device)
        if isinstance(query_chunk, bool) or not isinstance(query_chunk, int) or query_chunk < 1:
            raise ValueError(f"query_chunk must be an int >= 1, got {query_chunk!r}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = name
                module.query_chunk = query_chunk
        self._backend = name

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward: less memory, ~30% more compute."""
        self.gradient_checkpointing = bool(enabled)

    def _run(self, module: nn.Module, *args: Any) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float | int,
        context: torch.Tensor,
        *,
        context_mask: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        guidance: torch.Tensor | float | None = None,
        cache: DeepCache | None = None,
        token_merge_ratio: float | None = None,
        control: tuple[list[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, in_ch, H, W), t scalar or (B,), context (B, L, D) -> (B, out_ch, H, W).

        y (B, adm_in_channels): the vector conditioning of models that have one (SDXL; build it
        with `vector_conditioning`). guidance: scalar or (B,), the w an LCM-distilled UNet
        (config.time_cond_proj_dim) was distilled at, in diffusers' convention (guidance scale - 1);
        None leaves the embedding out, as diffusers does without `timestep_cond`. Inputs are cast
        to the weights' dtype; the prediction comes back in x's dtype. cache: a `step_cache.DeepCache`
        (step caching, opt-in): it says whether this call runs the whole network and stores the deep
        feature, or only the shallow branch on the stored one. token_merge_ratio: r in [0, 1) (opt-in,
        ToMe for SD): self-attention in the transformers of the highest-resolution level that has them
        runs on (1 - r) of the tokens (`token_merge`); 0 or None: exact. control: (down, mid), a
        ControlNet's residuals (summed over several): one per skip tensor, each shaped like it (or (B, C, 1, 1),
        a pooled ControlNet's), added to the skips after the down path, and mid added to the middle block's
        output, as diffusers adds them. On a cached step only the shallow branch runs, so only the residuals
        of the skips it reads (conv_in's and the first down block's) are added; the deeper ones reach the
        image through the deep feature stored on the last full step, which had that step's residuals.
        """
        cfg = self._config
        self._check_inputs(x, context, context_mask, class_labels)
        self._check_vector(y, x.shape[0])
        ratio = check_token_merge_ratio(token_merge_ratio)
        B, in_dtype, dtype = x.shape[0], x.dtype, self.dtype
        if control is not None:
            down_res, mid_res = self._check_control(control, x)
            down_res, mid_res = [r.to(dtype) for r in down_res], mid_res.to(dtype)
        x, context = x.to(dtype), context.to(dtype)

        t = _timesteps(t, B, device=x.device)  # (B,) float32
        merge = TokenMerge.for_timestep(ratio, t) if ratio > 0 else None
        emb_act = self.embed(t, dtype, guidance=guidance, class_labels=class_labels, y=y)
        bias = mask_to_bias(context_mask, dtype=dtype)  # (B, 1, 1, L) or None

        h = self.conv_in(x)
        skips = [h]
        # the last up level's ResBlock paired with the first down block's output: the cache point
        cache_at = len(self.up_blocks[-1].resnets) - 2
        if cache is not None and not cache.begin_call():
            first = self.down_blocks[0]  # shallow branch: the first down block only
            h = self._run(first.resnets[0], h, emb_act)
            if len(first.attentions):
                h = self._run(first.attentions[0], h, context, bias, self._merge(merge, 0, 0))
            skips.append(h)
            if control is not None:  # the shallow branch reads only the first skips: add theirs
                skips = [s + r for s, r in zip(skips, down_res)]
            h = self._up_level(self.up_blocks[-1], cache.load(h), skips, emb_act, context, bias, start=cache_at,
                               merge=self._merge(merge, 0, 0, up=True))
            return self.conv_out(F.silu(self.conv_norm_out(h))).to(in_dtype)  # (B, out_ch, H, W)

        for i, level in enumerate(self.down_blocks):
            for j, resnet in enumerate(level.resnets):
                h = self._run(resnet, h, emb_act)
                if len(level.attentions):
                    h = self._run(level.attentions[j], h, context, bias, self._merge(merge, i, j))
                skips.append(h)
            for down in level.downsamplers:
                h = down(h)
                skips.append(h)
        if control is not None:  # after the down path: the residuals change the skips, not the path down
            skips = [s + r for s, r in zip(skips, down_res)]

        mid = self.mid_block
        h = self._run(mid.resnets[0], h, emb_act)
        h = self._run(mid.attentions[0], h, context, bias, self._merge(merge, cfg.num_levels - 1, 0, mid=True))
        h = self._run(mid.resnets[1], h, emb_act)
        if control is not None:
            h = h + mid_res

        for k, level in enumerate(self.up_blocks):
            last = k == len(self.up_blocks) - 1
            h = self._up_level(level, h, skips, emb_act, context, bias, store=cache if last else None,
                               store_at=cache_at, merge=self._merge(merge, cfg.num_levels - 1 - k, 0, up=True))

        h = self.conv_out(F.silu(self.conv_norm_out(h)))
        return h.to(in_dtype)  # (B, out_ch, H, W)

    def _up_level(self, level: Level, h: torch.Tensor, skips: list[torch.Tensor], emb_act: torch.Tensor,
                  context: torch.Tensor, bias: torch.Tensor | None, *, start: int = 0,
                  store: DeepCache | None = None, store_at: int = -1,
                  merge: TokenMerge | None = None) -> torch.Tensor:
        """One up level from its ResBlock `start` on, popping a skip per ResBlock; `store` keeps the
        input of ResBlock `store_at` (before its skip is concatenated); `merge`: this level's token
        merging (transformer j draws from merge.child(j))."""
        for j in range(start, len(level.resnets)):
            if store is not None and j == store_at:
                store.store(h)
            h = self._run(level.resnets[j], torch.cat([h, skips.pop()], dim=1), emb_act)
            if len(level.attentions):
                h = self._run(level.attentions[j], h, context, bias, None if merge is None else merge.child(j))
        for up in level.upsamplers:
            h = up(h, size=tuple(skips[-1].shape[-2:]))
        return h

    def _merge(self, merge: TokenMerge | None, level: int, j: int, *, up: bool = False,
               mid: bool = False) -> TokenMerge | None:
        """Token merging for transformer j of `level` (down path, up path or middle block): only the
        merge level's transformers merge, each with its own draws; the same ones on cached steps."""
        if merge is None or level != self.merge_level:
            return None
        return merge.child(2000 if mid else 1000 if up else j)

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None,
                      class_labels: torch.Tensor | None) -> None:
        cfg = self._config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must have shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        B = x.shape[0]
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must have shape ({B}, L, {cfg.context_dim}), got {tuple(context.shape)}")
        if mask is not None and tuple(mask.shape) != tuple(context.shape[:2]):
            raise ValueError(f"context_mask must have shape {tuple(context.shape[:2])}, got {tuple(mask.shape)}")
        if cfg.num_class_embeds is None:
            if class_labels is not None:
                raise ValueError("class_labels given but this UNet has no class embedding "
                                 "(config.num_class_embeds is None)")
        else:
            if class_labels is None:
                raise ValueError(f"this UNet needs class_labels (B,) ints in [0, {cfg.num_class_embeds}) "
                                 "(the x4 upscaler's noise level)")
            if class_labels.shape != (B,) or class_labels.is_floating_point():
                raise ValueError(f"class_labels must be ({B},) integers, got {tuple(class_labels.shape)} "
                                 f"{class_labels.dtype}")

    def skip_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """(channels, h, w) of every skip tensor for latents of height x width, in push order, and the
        middle block's output last: the shapes a ControlNet's residuals must have."""
        cfg, shapes, h, w = self._config, [], height, width
        shapes.append((cfg.channels[0], h, w))
        for i, level in enumerate(self.down_blocks):
            shapes += [(cfg.channels[i], h, w)] * len(level.resnets)
            if len(level.downsamplers):
                h, w = (h + 1) // 2, (w + 1) // 2  # stride-2 3x3 conv, padding 1
                shapes.append((cfg.channels[i], h, w))
        return shapes + [(cfg.channels[-1], h, w)]

    def _check_control(self, control: Any, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(down, mid) residuals that fit this UNet at x's size; ValueError naming the first misfit."""
        if not isinstance(control, (tuple, list)) or len(control) != 2 or not isinstance(control[0], (list, tuple)):
            raise TypeError(f"control must be (down residuals: list of tensors, mid residual: tensor), "
                            f"got {type(control).__name__}")
        down, mid = list(control[0]), control[1]
        B, shapes = x.shape[0], self.skip_shapes(*x.shape[-2:])
        if len(down) != len(shapes) - 1:
            raise ValueError(f"control has {len(down)} down residuals; this UNet has {len(shapes) - 1} skip tensors "
                             "(a ControlNet made for another UNet?)")
        for k, (r, (c, h, w)) in enumerate(zip([*down, mid], shapes)):
            name = "the mid residual" if k == len(down) else f"down residual {k}"
            if not torch.is_tensor(r) or r.ndim != 4 or tuple(r.shape[:2]) != (B, c) \
                    or tuple(r.shape[2:]) not in ((h, w), (1, 1)):
                got = tuple(r.shape) if torch.is_tensor(r) else type(r).__name__
                raise ValueError(f"control: {name} must have shape ({B}, {c}, {h}, {w}) (or ({B}, {c}, 1, 1)) "
                                 f"for x of shape {tuple(x.shape)}, got {got}")
        return down, mid

    def _check_vector(self, y: torch.Tensor | None, batch: int) -> None:
        width = self._config.adm_in_channels
        if width is None:
            if y is not None:
                raise ValueError("y given but this UNet has no vector conditioning (config.adm_in_channels is None)")
        elif y is None or tuple(y.shape) != (batch, width):
            got = "nothing" if y is None else f"shape {tuple(y.shape)}"
            raise ValueError(f"this UNet needs y of shape ({batch}, {width}) (SDXL: pooled text + size numbers; "
                             f"see vector_conditioning), got {got}")

    def embed(self, t: torch.Tensor, dtype: torch.dtype, *, guidance=None, class_labels=None, y=None) -> torch.Tensor:
        """The per-image embedding every ResBlock reads, after its SiLU: the timesteps t (B,) float32, plus
        the guidance embedding (LCM), the class embedding and the vector conditioning where the config
        has them. (B, 4 x channels[0]); shared with the ControlNet, whose encoder reads the same."""
        cfg = self._config
        t_emb = timestep_embedding(t, cfg.channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        cond = None
        if guidance is not None:
            if cfg.time_cond_proj_dim is None:
                raise ValueError(f"guidance given but this {type(self).__name__} has no guidance embedding "
                                 "(config.time_cond_proj_dim is None); it is for LCM-distilled models")
            cond = self.guidance_embedding(_timesteps(guidance, t.shape[0], device=t.device)).to(dtype)
        emb = self.time_embedding(t_emb.to(dtype), cond)  # (B, 4 * ch0)
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels).to(dtype)
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(y.to(dtype))
        return F.silu(emb)  # every ResBlock starts its embedding path with SiLU

    def guidance_embedding(self, w: torch.Tensor) -> torch.Tensor:
        """(B,) guidance scales -> (B, time_cond_proj_dim): w x 1000 embedded sin-then-cos with
        frequencies exp(-ln(10^4) i / (half - 1)), as the LCM distillation (diffusers'
        `get_guidance_scale_embedding`) trained it."""
        return timestep_embedding(w * 1000.0, self._config.time_cond_proj_dim, flip_sin_to_cos=False, freq_shift=1)

    def vector_conditioning(self, pooled: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        """y for this UNet: pooled text (B, P) then the sinusoidal embedding of each of the N numbers
        (B, N: SDXL's original size, crop top-left and target size, or aesthetic score) at
        `addition_time_embed_dim` wide, as sgm's conditioner and diffusers' add_time_proj build it."""
        cfg = self._config
        if cfg.adm_in_channels is None:
            raise ValueError("this UNet has no vector conditioning (config.adm_in_channels is None)")
        if pooled.ndim != 2 or numbers.ndim != 2 or numbers.shape[0] != pooled.shape[0]:
            raise ValueError(f"pooled must be (B, P) and numbers (B, N), got {tuple(pooled.shape)} and "
                             f"{tuple(numbers.shape)}")
        width = pooled.shape[1] + numbers.shape[1] * cfg.addition_time_embed_dim
        if width != cfg.adm_in_channels:
            raise ValueError(f"pooled ({pooled.shape[1]}) + {numbers.shape[1]} numbers x "
                             f"{cfg.addition_time_embed_dim} = {width}, but this UNet reads y of width "
                             f"{cfg.adm_in_channels}")
        embedded = timestep_embedding(numbers.flatten(), cfg.addition_time_embed_dim,
                                      flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        return torch.cat([pooled, embedded.reshape(numbers.shape[0], -1).to(pooled.dtype)], dim=-1)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_diffusers(cls, module_or_folder: Any, *, dtype: torch.dtype | None = None) -> UNet:
        """From a diffusers ``UNet2DConditionModel`` or its saved folder (config.json + safetensors)."""
        from latentloom.unet.loading import load_from_diffusers

        return load_from_diffusers(module_or_folder, dtype=dtype)

    @classmethod
    def from_ldm_state_dict(cls, state_dict: dict[str, torch.Tensor], *,
                            config: UNetConfig | None = None) -> UNet:
        """From an original LDM / CompVis state dict (``model.diffusion_model.*`` keys or bare)."""
        from latentloom.unet.loading import load_from_ldm

        return load_from_ldm(state_dict, config=config)

    def to_diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """This UNet's weights under diffusers' ``UNet2DConditionModel`` names and shapes."""
        from latentloom.unet.convert import ours_to_diffusers

        return ours_to_diffusers(self.state_dict(), self._config)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """config.json (UNetConfig) + model.safetensors, each written atomically."""
        from latentloom.unet.loading import save_pretrained

        save_pretrained(self, folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> UNet:
        from latentloom.unet.loading import load_pretrained

        return load_pretrained(folder, dtype=dtype)


def _timesteps(t: torch.Tensor | float | int, batch: int, *, device: torch.device) -> torch.Tensor:
    """Scalar, (), (1,) or (B,) timesteps (int or float) -> (B,) float32 on ``device``."""
    if isinstance(t, bool) or not isinstance(t, (int, float, torch.Tensor)):
        raise TypeError(f"t must be a number or a tensor, got {type(t).__name__}")
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t.float().expand(batch)
