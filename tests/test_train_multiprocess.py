"""The loop under several processes (2 CPU processes, gloo): DDP, per-rank RNG in checkpoints, resume."""
import json
import os
import socket
import subprocess
import sys

import pytest

from latentloom.synthetic.shapes import write_dataset


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, *, processes=2):
    # `accelerate launch --multi_gpu` is torchrun underneath; on a machine without CUDA the
    # loop asks accelerate for its multi-CPU (gloo) mode. (`--cpu` would start one process.)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "latentloom.training", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_two_processes_train_and_checkpoint(tmp_path):
    # (exact resume itself is tested in one process in test_train_loop.py)
    data = write_dataset(tmp_path / "data", 8, seed=3)
    out = tmp_path / "out"
    common = ["--data", str(data), "--output", str(out), "--resolution", "16", "--batch-size", "2",
              "--steps", "3", "--checkpoint-every", "1", "--no-progress", "--ema", "--caption-dropout", "0.5"]
    done = launch(common)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = out / "checkpoints" / "unet" / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert {"rng-0.safetensors", "rng-1.safetensors", "model.safetensors", "ema.safetensors"} <= names
    state = json.loads((ckpt / "state.json").read_text())
    assert state["world_size"] == 2 and state["position"] == 2 * 2 * 2  # steps x batch x processes
    # the two processes drew different noise and captions-dropout coins
    from safetensors.torch import load_file

    rng = [load_file(str(ckpt / f"rng-{r}.safetensors")) for r in (0, 1)]
    assert not (rng[0]["generator.noise"] == rng[1]["generator.noise"]).all()
    stats = json.loads((out / "checkpoints" / "unet-train-stats.json").read_text())
    assert stats["processes"] == 2 and stats["steps"] == 3
    assert (out / "unet" / "model.safetensors").is_file()
    # one process cannot take over a two-process run's RNG streams
    from latentloom.training.config import TrainConfig
    from latentloom.training.loop import train

    with pytest.raises(ValueError, match="written by 2 process"):
        train(TrainConfig(data=str(data), output=str(out), resolution=16, batch_size=2, steps=3,
                          resume=str(ckpt), progress=False, ema=True))
