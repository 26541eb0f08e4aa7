"""The training loop: one plain loop on accelerate for every model latentloom trains.

What differs between the UNet, the VAE, the image-text model and the upscaler (which
networks, which loss, what gets exported) lives in a *task* (``tasks.py``); this file
only knows optimizer steps, gradient accumulation, EMA, checkpoints and the progress bar.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentloom.training.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from latentloom.training.config import TrainConfig
from latentloom.training.data_order import PositionedDataset, StreamBatchSampler
from latentloom.training.ema import EMA
from latentloom.training.lr_schedule import make_lr_scheduler


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; bitsandbytes' 8-bit AdamW where it is installed and a GPU holds the weights."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.use_8bit_adam and params and params[0].device.type == "cuda":
        try:
            import bitsandbytes as bnb
        except ImportError:
            pass
        else:
            return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    # Several processes without CUDA (torchrun / `accelerate launch --multi_gpu` on a CPU box):
    # accelerate sets up its gloo MULTI_CPU mode only when told cpu=True.
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not several:
        # accelerate keeps one process-wide state and refuses a second Accelerator with another
        # mixed precision; a library user may call train() again (e.g. bf16 after fp32).
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=several and not torch.cuda.is_available())


def train(cfg: TrainConfig, *, task: Any = None) -> Path:
    """Run ``cfg.steps`` optimizer steps (resuming if asked) and export the model.

    Returns the output folder. Every process of an ``accelerate launch`` calls this.
    """
    from latentloom.training.tasks import make_task

    if cfg.threads is not None:
        # On a shared or small CPU, fewer threads often train faster (no spinning on busy cores).
        torch.set_num_threads(cfg.threads)
    accelerator = _make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    # Same initial weights on every process (DDP also broadcasts them from rank 0).
    torch.manual_seed(cfg.seed)
    if task is None:
        task = make_task(cfg, device=device, is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone)
    model: nn.Module = task.model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"the {cfg.model} task has no trainable parameters")
    optimizer = make_optimizer(params, cfg)
    lr_scheduler = make_lr_scheduler(optimizer, kind=cfg.lr_schedule, warmup_steps=cfg.lr_warmup_steps, total_steps=cfg.steps)
    ema = EMA(model, max_decay=cfg.ema_decay) if cfg.ema else None
    # Per-process streams: the diffusion noise on the model's device, coin flips on the host.
    generators = {
        "noise": torch.Generator(device=device).manual_seed(cfg.seed * 7919 + rank + 1),
        "host": torch.Generator().manual_seed(cfg.seed * 104729 + rank + 1),
    }
    torch.manual_seed(cfg.seed * 31 + rank)

    ckpt_root = cfg.checkpoint_dir / cfg.model
    step, position = _resume(cfg, ckpt_root, accelerator, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                             ema=ema, generators=generators)

    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    global_batch = cfg.batch_size * world
    sampler = StreamBatchSampler(
        len(task.dataset), batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world, position=position
    )
    loader = torch.utils.data.DataLoader(
        PositionedDataset(task.dataset, num_items=len(task.dataset), seed=cfg.seed),
        batch_sampler=sampler, collate_fn=getattr(task, "collate", None), num_workers=cfg.num_workers,
    )
    batches = iter(loader)

    stop_at = cfg.steps if cfg.stop_after is None else min(cfg.steps, step + cfg.stop_after)
    log = _Log(cfg, first_step=step, images_per_step=global_batch * cfg.grad_accum,
               main=accelerator.is_main_process)
    ddp_model.train()
    while step < stop_at:
        loss_sum = _optimizer_step(cfg, task, accelerator, ddp_model, batches, params=params, optimizer=optimizer,
                                   lr_scheduler=lr_scheduler, generators=generators, step=step)
        step += 1
        position += global_batch * cfg.grad_accum
        if ema is not None:
            ema.update(model)
        if hasattr(task, "after_step"):  # e.g. consistency distillation's EMA target network
            task.after_step(model)
        log.step(step, loss_sum, lr=lr_scheduler.get_last_lr()[0], write=step % cfg.log_every == 0 or step == stop_at)
        if step % cfg.checkpoint_every == 0 or step == stop_at:
            save_checkpoint(
                ckpt_root,
                step=step,
                model_state=model.state_dict(),
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                ema_state=ema.state_dict() if ema is not None else None,
                generators=generators,
                state={"position": position, "world_size": world, "config": cfg.to_dict()},
                rank=rank,
                barrier=accelerator.wait_for_everyone,
                total_limit=cfg.checkpoints_total_limit,
            )
    task.stats = log.close(step, processes=world)
    output = Path(cfg.output)
    if step < cfg.steps:  # stopped early: the checkpoint is the result; export when finished
        return output
    if accelerator.is_main_process:
        _export(task, model, ema, output)
    accelerator.wait_for_everyone()
    return output


def _resume(cfg: TrainConfig, ckpt_root: Path, accelerator, *, model: nn.Module, optimizer, lr_scheduler,
            ema: EMA | None, generators: dict[str, torch.Generator]) -> tuple[int, int]:
    """(step, data position) to start from: 0, 0, or those of the checkpoint cfg.resume names, whose
    weights, optimizer, schedule, EMA and random streams are loaded into the run."""
    rank, world = accelerator.process_index, accelerator.num_processes
    resume_from = resolve_resume(cfg.resume, root=ckpt_root) if cfg.resume else None
    if cfg.resume == "latest" and resume_from is None and accelerator.is_main_process:
        print(f"latentloom train: no checkpoint under {ckpt_root} yet; starting from step 0")
    if resume_from is None:
        return 0, 0
    model_state, ema_state, state = load_checkpoint(
        resume_from, optimizer=optimizer, lr_scheduler=lr_scheduler, generators=generators, rank=rank
    )
    if state.get("world_size", world) != world:
        raise ValueError(f"{resume_from} was written by {state['world_size']} processes; this run has {world}")
    model.load_state_dict(model_state)
    if ema is not None:
        if ema_state is None:
            raise ValueError(f"{resume_from} has no EMA weights but this run has --ema; resume without it")
        ema.load_state_dict(ema_state)
    if accelerator.is_main_process:
        print(f"latentloom train: resumed from {resume_from} at step {int(state['step'])}")
    return int(state["step"]), int(state["position"])


def _optimizer_step(cfg: TrainConfig, task: Any, accelerator, ddp_model: nn.Module, batches, *, params, optimizer,
                    lr_scheduler, generators: dict[str, torch.Generator], step: int) -> float:
    """One optimizer step over cfg.grad_accum micro-batches; returns the sum of their losses."""
    loss_sum = 0.0
    for micro in range(cfg.grad_accum):
        batch = next(batches)
        # Gradients are all-reduced only on the last micro-batch of a step.
        sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(ddp_model)
        with sync:
            with accelerator.autocast():
                loss = task.loss(ddp_model, batch, generators=generators)
            accelerator.backward(loss / cfg.grad_accum)
        loss_sum += loss.detach().float().item()
    if not math.isfinite(loss_sum):  # before the step: the last checkpoint and the weights stay good
        raise FloatingPointError(
            f"the loss became {loss_sum} at step {step + 1}; lower --lr or use --mixed-precision no"
        )
    if cfg.max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


class _Log:
    """The run's progress bar, its JSON-lines log (one line per log_every steps) and its final stats;
    only the main process writes."""

    def __init__(self, cfg: TrainConfig, *, first_step: int, images_per_step: int, main: bool) -> None:
        self.cfg, self.main, self.images_per_step = cfg, main, images_per_step
        self.file = cfg.checkpoint_dir / f"{cfg.model}-log.jsonl"
        self.progress = None
        if cfg.progress and main:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=cfg.steps, initial=first_step, desc=f"train {cfg.model}", unit="step",
                                 dynamic_ncols=True)
        self.t_start, self.steps_timed, self.loss_avg = time.perf_counter(), 0, float("nan")

    def step(self, step: int, loss_sum: float, *, lr: float, write: bool) -> None:
        """Count a step whose micro-batch losses summed to loss_sum."""
        accum = self.cfg.grad_accum
        self.steps_timed += 1
        self.loss_avg = loss_sum / accum if math.isnan(self.loss_avg) else 0.9 * self.loss_avg + 0.1 * loss_sum / accum
        if self.main and write:
            elapsed = time.perf_counter() - self.t_start
            images_per_s = self.steps_timed * self.images_per_step / max(elapsed, 1e-9)
            record = {"step": step, "loss": loss_sum / accum, "loss_ema": self.loss_avg, "lr": lr,
                      "images_per_s": images_per_s}
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.file, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.progress is not None:
                self.progress.set_postfix(loss=f"{self.loss_avg:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
        if self.progress is not None:
            self.progress.update(1)

    def close(self, step: int, *, processes: int) -> dict[str, Any]:
        """Close the bar and write CHECKPOINT_DIR/MODEL-train-stats.json; returns the stats."""
        if self.progress is not None:
            self.progress.close()
        elapsed = time.perf_counter() - self.t_start
        stats = {
            "steps": step,
            "images_per_s": self.steps_timed * self.images_per_step / elapsed if self.steps_timed else None,
            "final_loss_ema": self.loss_avg,
            "processes": processes,
        }
        if self.main:
            self.cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (self.cfg.checkpoint_dir / f"{self.cfg.model}-train-stats.json").write_text(json.dumps(stats, indent=2))
        return stats


def _export(task: Any, model: nn.Module, ema: EMA | None, output: Path) -> None:
    """The task writes the trained model (its EMA weights when the run kept them) to `output`."""
    export_model = model
    if ema is not None:
        export_model = copy.deepcopy(model)
        ema.copy_to(export_model)
    export_model.eval()
    task.export(export_model, output)
