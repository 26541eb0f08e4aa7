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
    step, position = 0, 0
    resume_from = resolve_resume(cfg.resume, root=ckpt_root) if cfg.resume else None
    if cfg.resume == "latest" and resume_from is None and accelerator.is_main_process:
        print(f"latentloom train: no checkpoint under {ckpt_root} yet; starting from step 0")
    if resume_from is not None:
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
        step, position = int(state["step"]), int(state["position"])
        if accelerator.is_main_process:
            print(f"latentloom train: resumed from {resume_from} at step {step}")

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

    progress = None
    if cfg.progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.model}", unit="step", dynamic_ncols=True)
    log_file = cfg.checkpoint_dir / f"{cfg.model}-log.jsonl"  # one JSON line per log_every steps
    stop_at = cfg.steps if cfg.stop_after is None else min(cfg.steps, step + cfg.stop_after)
    ddp_model.train()
    t_start, steps_timed, loss_avg = time.perf_counter(), 0, float("nan")
    while step < stop_at:
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
        step += 1
        position += global_batch * cfg.grad_accum
        steps_timed += 1
        if ema is not None:
            ema.update(model)
        loss_avg = loss_sum / cfg.grad_accum if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * loss_sum / cfg.grad_accum
        if accelerator.is_main_process and (step % cfg.log_every == 0 or step == stop_at):
            elapsed = time.perf_counter() - t_start
            images_per_s = steps_timed * global_batch * cfg.grad_accum / max(elapsed, 1e-9)
            record = {"step": step, "loss": loss_sum / cfg.grad_accum, "loss_ema": loss_avg,
                      "lr": lr_scheduler.get_last_lr()[0], "images_per_s": images_per_s}
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(log_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            if progress is not None:
                progress.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{images_per_s:.1f}")
        if progress is not None:
            progress.update(1)
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
    if progress is not None:
        progress.close()
    elapsed = time.perf_counter() - t_start
    stats = {
        "steps": step,
        "images_per_s": steps_timed * global_batch * cfg.grad_accum / elapsed if steps_timed else None,
        "final_loss_ema": loss_avg,
        "processes": world,
    }
    output = Path(cfg.output)
    task.stats = stats
    if accelerator.is_main_process:
        cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (cfg.checkpoint_dir / f"{cfg.model}-train-stats.json").write_text(json.dumps(stats, indent=2))
    if step < cfg.steps:  # stopped early: the checkpoint is the result; export when finished
        return output
    if accelerator.is_main_process:
        export_model = model
        if ema is not None:
            export_model = copy.deepcopy(model)
            ema.copy_to(export_model)
        export_model.eval()
        task.export(export_model, output)
    accelerator.wait_for_everyone()
    return output
