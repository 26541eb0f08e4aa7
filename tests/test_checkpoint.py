"""Checkpoint files: safetensors round trip of optimizer/RNG/EMA, atomic rename, retention, resume lookup."""
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from latentloom.training.checkpoint import (
    list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint,
)
from latentloom.training.ema import EMA
from latentloom.training.lr_schedule import make_lr_scheduler


def make_run(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = make_lr_scheduler(opt, kind="cosine", warmup_steps=2, total_steps=10)
    return model, opt, sched, EMA(model, max_decay=0.9), torch.Generator().manual_seed(seed)


def train_steps(model, opt, sched, ema, gen, n):
    for _ in range(n):
        x = torch.randn(5, 4, generator=gen)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step(); sched.step(); opt.zero_grad(); ema.update(model)


def save(root, step, model, opt, sched, ema, gen, **kw):
    return save_checkpoint(root, step=step, model_state=model.state_dict(), optimizer=opt, lr_scheduler=sched,
                           ema_state=ema.state_dict(), generators={"noise": gen}, state={"position": step * 5}, **kw)


def test_save_load_continues_exactly(tmp_path):
    ref = make_run()
    train_steps(*ref, 6)
    run = make_run()
    train_steps(*run, 3)
    random.seed(123); np.random.seed(5)
    folder = save(tmp_path, 3, *run)
    expected_py, expected_np = random.random(), np.random.rand()
    assert folder.name == "checkpoint-3"
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json",
        "lr_scheduler.json", "rng-0.safetensors", "rng-0.json", "state.json"])
    # a fresh process: different weights, optimizer, RNG
    model, opt, sched, ema, gen = make_run(seed=99)
    model_state, ema_state, state = load_checkpoint(folder, optimizer=opt, lr_scheduler=sched, generators={"noise": gen})
    model.load_state_dict(model_state); ema.load_state_dict(ema_state)
    assert state == {"position": 15, "step": 3}
    assert random.random() == expected_py and np.random.rand() == expected_np
    train_steps(model, opt, sched, ema, gen, 3)
    for a, b in zip(model.state_dict().values(), ref[0].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for n in ema.shadow:
        torch.testing.assert_close(ema.shadow[n], ref[3].shadow[n], rtol=0, atol=0)
    assert sched.get_last_lr() == ref[2].get_last_lr()


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    run = make_run()
    save(tmp_path, 1, *run)
    import latentloom.training.checkpoint as ckpt

    def killed(*a, **k):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(ckpt, "_fsync_tree", killed)  # dies after writing, before the rename
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, *run)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert resolve_resume("latest", root=tmp_path).name == "checkpoint-1"
    assert (tmp_path / ".tmp-checkpoint-2").exists()
    # the next save of that step cleans the leftover and completes
    save(tmp_path, 2, *run)
    assert not (tmp_path / ".tmp-checkpoint-2").exists()
    assert resolve_resume("latest", root=tmp_path).name == "checkpoint-2"
    # saving the same step again swaps in place
    save(tmp_path, 2, *run)
    assert json.loads((tmp_path / "checkpoint-2" / "state.json").read_text())["step"] == 2


def test_total_limit_keeps_newest(tmp_path):
    run = make_run()
    for step in (1, 2, 10, 3):
        save(tmp_path, step, *run, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-10"]


def test_resume_errors(tmp_path):
    assert resolve_resume("latest", root=tmp_path / "none") is None
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        resolve_resume(str(tmp_path), root=tmp_path)
    run = make_run()
    folder = save(tmp_path, 1, *run)
    model, opt, sched, ema, gen = make_run()
    with pytest.raises(ValueError, match="no RNG state for process 1"):
        load_checkpoint(folder, optimizer=opt, lr_scheduler=sched, generators={"noise": gen}, rank=1)
    with pytest.raises(ValueError, match="no RNG state for generator 'other'"):
        load_checkpoint(folder, optimizer=opt, lr_scheduler=sched, generators={"other": gen})
