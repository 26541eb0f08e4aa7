"""Exponential moving average of model weights (the weights that get exported)."""
from __future__ import annotations

import torch
from torch import nn


def ema_decay_at(step: int, *, max_decay: float) -> float:
    """Warmed-up decay: (1 + step) / (10 + step), capped at max_decay.

    Early weights are poor, so a fixed 0.9999 would keep them in the average for
    thousands of steps; the warmup lets the average follow the model at first.
    """
    return min(max_decay, (1.0 + step) / (10.0 + step))


class EMA:
    """A float32 shadow copy of a model's trainable floating-point tensors.

    ``update(model)`` after each optimizer step; ``copy_to(model)`` to export.
    Buffers (e.g. norm statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, *, max_decay: float = 0.9999) -> None:
        if not 0.0 < max_decay < 1.0:
            raise ValueError(f"max_decay must be in (0, 1), got {max_decay}")
        self.max_decay = max_decay
        self.step = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }
        if not self.shadow:
            raise ValueError("EMA needs a model with trainable parameters; none has requires_grad=True")

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = ema_decay_at(self.step, max_decay=self.max_decay)
        params = dict(model.named_parameters())
        shadows = list(self.shadow.values())
        current = [params[name].detach().float() for name in self.shadow]
        # shadow <- decay * shadow + (1 - decay) * param, all tensors in one fused call
        torch._foreach_lerp_(shadows, current, 1.0 - decay)
        self.step += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        missing = sorted(set(self.shadow) - set(params))
        if missing:
            raise ValueError(f"EMA holds {len(missing)} tensors the model lacks, e.g. {missing[:3]}")
        for name, shadow in self.shadow.items():
            params[name].copy_(shadow.to(params[name].dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (safetensors-ready); the step rides along as a 0-d tensor."""
        state = {f"shadow.{name}": t for name, t in self.shadow.items()}
        state["step"] = torch.tensor(self.step, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        names = {k[len("shadow."):] for k in state if k.startswith("shadow.")}
        if names != set(self.shadow):
            extra, lacking = sorted(names - set(self.shadow)), sorted(set(self.shadow) - names)
            raise ValueError(f"EMA state does not match the model: extra {extra[:3]}, missing {lacking[:3]}")
        for name in names:
            self.shadow[name].copy_(state[f"shadow.{name}"])
        self.step = int(state["step"])
