"""Checkpoints for exact resume, written atomically, in safetensors + JSON (no pickle).

A checkpoint is a folder ``checkpoint-<step>`` under the run's checkpoint root:

    model.safetensors        the trained model's state dict
    ema.safetensors          the EMA shadow weights (when EMA is on)
    optimizer.safetensors    the optimizer's per-parameter tensors, flattened
    optimizer.json           everything else in the optimizer's state dict
    lr_scheduler.json        the LR scheduler's state dict
    rng-<rank>.safetensors   each process's torch generators (training noise, global RNG)
    rng-<rank>.json          each process's Python and NumPy RNG states
    state.json               step, data position, the run's config

It is first written to ``.tmp-checkpoint-<step>`` and renamed when complete, so a kill
during a save leaves every ``checkpoint-*`` folder whole (rename is atomic on POSIX).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import save_file

from latentloom.file_io import read_json_object

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under root, oldest first (temp folders are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, *, root: str | os.PathLike) -> Path | None:
    """``"latest"`` -> the newest complete checkpoint under root (None when there is none);
    a path -> that checkpoint folder, which must hold a state.json."""
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ValueError(f"resume={resume!r} is not a checkpoint folder (no state.json); pass one, or 'latest'")
    return path


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True))


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into safetensors-ready tensors and JSON-ready rest."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value
            else:
                rest.setdefault(str(idx), {})[name] = value
    return _contiguous(tensors), {"param_groups": state["param_groups"], "state_rest": rest}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["state_rest"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {f"generator.{name}": g.get_state() for name, g in generators.items()}
    tensors["torch_global"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, meta


def set_rng_state(generators: dict[str, torch.Generator], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    for name, g in generators.items():
        key = f"generator.{name}"
        if key not in tensors:
            raise ValueError(f"checkpoint has no RNG state for generator {name!r}; it has {sorted(tensors)}")
        g.set_state(tensors[key])
    torch.set_rng_state(tensors["torch_global"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    root: str | os.PathLike,
    *,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ema_state: dict[str, torch.Tensor] | None,
    generators: dict[str, torch.Generator],
    state: dict[str, Any],
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
    total_limit: int | None = None,
) -> Path:
    """Write checkpoint-<step> atomically; every process calls this (rank 0 writes the
    shared parts, each rank its own RNG). Returns the final folder."""
    root = Path(root)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over from a save that was killed
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    rng_tensors, rng_meta = rng_state(generators)
    save_file(_contiguous(rng_tensors), str(tmp / f"rng-{rank}.safetensors"))
    _write_json(tmp / f"rng-{rank}.json", rng_meta)
    if rank == 0:
        save_file(_contiguous(model_state), str(tmp / "model.safetensors"))
        if ema_state is not None:
            save_file(_contiguous(ema_state), str(tmp / "ema.safetensors"))
        opt_tensors, opt_meta = optimizer_to_flat(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", opt_meta)
        _write_json(tmp / "lr_scheduler.json", lr_scheduler.state_dict())
        _write_json(tmp / "state.json", {**state, "step": step})
    barrier()
    if rank == 0:
        _fsync_tree(tmp)
        if final.exists():
            # Same step saved again (e.g. a resumed run): swap, so a complete one always exists.
            old = root / f".old-checkpoint-{step}"
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        if total_limit is not None:
            for stale in list_checkpoints(root)[:-total_limit]:
                shutil.rmtree(stale)
    barrier()
    return final


def _fsync_tree(folder: Path) -> None:
    """Flush file contents before the rename makes the folder visible as complete."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def load_checkpoint(
    folder: str | os.PathLike,
    *,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    generators: dict[str, torch.Generator],
    rank: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Restore optimizer, LR scheduler and this rank's RNG; return (model_state, ema_state, state).

    The model and EMA tensors are returned for the caller to load (it knows the model's
    wrapping). The RNG file of this rank must exist: resuming with a different number of
    processes than the checkpoint was written with is refused.
    """
    from latentloom.weight_files import load_safetensors

    folder = Path(folder)
    state = read_json_object(folder / "state.json")
    rng_file = folder / f"rng-{rank}.safetensors"
    if not rng_file.is_file():
        raise ValueError(
            f"{folder} has no RNG state for process {rank}: it was written by "
            f"{state.get('world_size', '?')} process(es); resume with that many"
        )
    model_state = load_safetensors(folder / "model.safetensors")
    ema_file = folder / "ema.safetensors"
    ema_state = load_safetensors(ema_file) if ema_file.is_file() else None
    opt_meta = read_json_object(folder / "optimizer.json")
    optimizer.load_state_dict(optimizer_from_flat(load_safetensors(folder / "optimizer.safetensors"), opt_meta))
    lr_scheduler.load_state_dict(read_json_object(folder / "lr_scheduler.json"))
    set_rng_state(generators, load_safetensors(rng_file), read_json_object(folder / f"rng-{rank}.json"))
    return model_state, ema_state, state
