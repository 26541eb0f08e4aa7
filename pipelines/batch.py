"""`latentloom generate --prompts FILE --output-dir DIR`: many images, split across processes, resumable.

Under `accelerate launch --num_processes N -m latentloom generate --prompts ...` (one machine or
several sharing DIR) each process makes its share of the images; with N = 1 the same command runs
without accelerate. What an image is depends only on its line and the run's options, never on
the number of processes:
- entry n of the file (0-based, prompts only; see `prompts_file`) has base seed = its own "seed", or
  run seed + n * K with K images per prompt; its image i uses base + i, alone (the README's batch
  rule), and is written to DIR/{n:06d}.png (DIR/{n:06d}-{i}.png for i >= 1) with its recipe;
- without --seed, the run seed is drawn once and kept in DIR/run.json, so a rerun reuses it.
A rerun drops the images already there (complete: every PNG is written under a temporary name and
renamed), splits the rest evenly, and refuses to mix: an existing PNG whose recipe differs from
this run's options is an error naming it, unless --overwrite (which redoes every image). Each
process appends to DIR/manifest-rank{r}.jsonl as it goes; when all are done, rank 0 writes
DIR/manifest.jsonl from the PNGs themselves, so no process relies on another's appends.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentloom.pipelines.prompts_file import PromptEntry

RUN_FILE = "run.json"
MANIFEST = "manifest.jsonl"
# recipe fields a rerun must agree on with an image already made (besides model identity)
COMPARED = ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "height", "width",
            "sampler")
# options compared only when the command gives them (their defaults are resolved inside the pipeline)
COMPARED_IF_GIVEN = ("guidance_rescale", "karras_sigmas", "clip_guidance_scale", "vae_tiling", "prompt_2",
                     "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size",
                     "negative_original_size", "negative_crops_coords_top_left", "negative_target_size",
                     "aesthetic_score", "negative_aesthetic_score", "cache_interval", "token_merge_ratio")
# recipes store sizes and coordinates as JSON lists; the command gives them as tuples or lists
_AS_LISTS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
             "negative_crops_coords_top_left", "negative_target_size")


@dataclass
class Job:
    """One image of the run: which entry, which of its K images, its file and the pipeline call."""

    entry: PromptEntry
    i: int
    file: str
    call: dict[str, Any]


def image_name(index: int, i: int) -> str:
    return f"{index:06d}.png" if i == 0 else f"{index:06d}-{i}.png"


def plan(entries: list[PromptEntry], *, seed: int, per_prompt: int, options: dict[str, Any]) -> list[Job]:
    """Every image of the run, in file order. `options`: the command's pipeline arguments."""
    jobs = []
    for entry in entries:
        call = {**options, **entry.overrides, "prompt": entry.prompt}
        base = entry.overrides.get("seed", seed + entry.index * per_prompt)
        for i in range(per_prompt):
            jobs.append(Job(entry, i, image_name(entry.index, i), {**call, "seed": base + i}))
    return jobs


class _OneProcess:
    """What a run needs of accelerate's PartialState when it runs alone (no accelerate import)."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def process_state():
    """accelerate's view of this process under `accelerate launch` (gloo on CPU), else a lone process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _OneProcess()
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def run_seed(out: Path, seed: int | None, state) -> int:
    """--seed, or the seed of an earlier run into `out` (DIR/run.json), or one drawn now; every
    process gets the same (rank 0 decides, the others read run.json after a barrier)."""
    from latentloom.file_io import read_json_object

    if seed is not None:
        return seed
    path = out / RUN_FILE
    if state.is_main_process:
        chosen = read_json_object(path).get("seed") if path.is_file() else None
        if not isinstance(chosen, int) or isinstance(chosen, bool):
            chosen = secrets.randbelow(2**31)
        write_run_file(out, {"seed": chosen})
    state.wait_for_everyone()
    return int(read_json_object(path)["seed"])


def write_run_file(out: Path, values: dict[str, Any]) -> None:
    from latentloom.file_io import read_json_object, write_json_atomic

    path = out / RUN_FILE
    old = read_json_object(path) if path.is_file() else {}
    write_json_atomic(path, {**old, **values})


def expected_recipe(pipe, job: Job, options: dict[str, Any], refiner=None) -> dict[str, Any]:
    """What the PNG of `job` must record, with the model's defaults where the command leaves a value out
    (and, for a hand-off run, the refiner)."""
    d = pipe.defaults
    call = job.call
    expected = {
        "prompt": call["prompt"], "negative_prompt": call.get("negative_prompt"), "seed": call["seed"],
        "num_inference_steps": call.get("num_inference_steps") or d.num_inference_steps,
        "guidance_scale": call["guidance_scale"] if call.get("guidance_scale") is not None else d.guidance_scale,
        "height": call.get("height") or d.height, "width": call.get("width") or d.width,
        "sampler": call.get("sampler") or d.sampler,
        "model": pipe.name, "model_hash": pipe.model_hash(), "dtype": str(pipe.dtype).removeprefix("torch."),
    }
    expected.update({k: list(call[k]) if k in _AS_LISTS else call[k]
                     for k in COMPARED_IF_GIVEN if call.get(k) is not None})
    if expected.get("cache_interval") == 1:  # exact: recipes leave it out
        expected["cache_interval"] = None
    if expected.get("token_merge_ratio") == 0:
        expected["token_merge_ratio"] = None
    if refiner is not None:
        expected.update({"refiner": refiner.name, "refiner_hash": refiner.model_hash(),
                         "refiner_start": options.get("refiner_start", 0.8)})
    return expected


def first_difference(recipe: dict[str, Any], expected: dict[str, Any]) -> str | None:
    for key, value in expected.items():
        if recipe.get(key) != value:
            return f"{key} is {recipe.get(key)!r} there, {value!r} in this run"
    return None


def remaining_jobs(pipe, jobs: list[Job], out: Path, *, options: dict[str, Any], overwrite: bool,
                   refiner=None) -> list[Job]:
    """The jobs whose PNG is not there yet (all with overwrite); ValueError at the first existing PNG
    made with other options."""
    from latentloom.pipelines.metadata import read_metadata

    if overwrite:
        return list(jobs)
    todo = []
    for job in jobs:
        path = out / job.file
        if not path.exists():
            todo.append(job)
            continue
        try:
            recipe = read_metadata(path)
        except ValueError as err:
            raise ValueError(f"{path} is in the way and is not an image of a run ({err}); move it, or pass "
                             "--overwrite") from None
        difference = first_difference(recipe, expected_recipe(pipe, job, options, refiner))
        if difference:
            raise ValueError(f"{path} was made with other options ({difference}); use another --output-dir, "
                             "or pass --overwrite to redo the images")
    return todo


def remove_stale_temporaries(out: Path) -> None:
    """PNGs a killed run was writing (write_atomic's temporary names); run by rank 0 before anyone writes."""
    for stale in out.glob(".*.png.*.tmp"):
        stale.unlink(missing_ok=True)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_image(pipe, call: dict[str, Any], refiner=None):
    """One job's image: the pipeline call, or the base-to-refiner hand-off when a refiner is given
    (`call["refiner_start"]`, default 0.8, is where it takes over)."""
    if refiner is None:
        return pipe(**call, progress=False)
    from latentloom.pipelines.handoff import generate_with_refiner

    rest = {k: v for k, v in call.items() if k not in ("prompt", "seed", "refiner_start")}
    return generate_with_refiner(pipe, refiner, call["prompt"], refiner_start=call.get("refiner_start", 0.8),
                                 seed=call["seed"], progress=False, **rest)


def generate_batch(pipe, jobs: list[Job], out: Path, *, state, progress: bool, options: dict[str, Any],
                   overwrite: bool, refiner=None) -> dict[str, Any]:
    """Make this process's share of the jobs left to do (through `refiner` too when given: the
    hand-off); rank 0 then writes DIR/manifest.jsonl. Returns counts and the run's images/s (rank 0's
    view of all processes)."""
    from tqdm.auto import tqdm

    from latentloom.file_io import write_atomic

    rank, world = state.process_index, state.num_processes
    todo = remaining_jobs(pipe, jobs, out, options=options, overwrite=overwrite, refiner=refiner)
    state.wait_for_everyone()  # every process has checked the folder before anyone writes into it
    mine = todo[rank::world]
    manifest = out / f"manifest-rank{rank}.jsonl"
    bar = tqdm(total=len(mine), desc=f"latentloom generate [{rank + 1}/{world}]", unit="image",
               disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for job in mine:
            result = make_image(pipe, job.call, refiner)
            (path,) = result.save(out / job.file)
            line = {"line": job.entry.index, "file": job.file, "prompt": job.call["prompt"], "seed": job.call["seed"],
                    "sha256": sha256_of(path)}
            with open(manifest, "a") as handle:  # one line per finished image; a crash loses the one in flight
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            bar.set_postfix(img_s=f"{(bar.n + 1) / max(time.perf_counter() - start, 1e-9):.2f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    state.wait_for_everyone()
    elapsed = time.perf_counter() - start
    summary = {"images": len(jobs), "made": len(todo), "kept": len(jobs) - len(todo), "processes": world,
               "seconds": elapsed, "images_per_s": len(todo) / elapsed if todo and elapsed > 0 else None}
    if state.is_main_process:
        from latentloom.pipelines.metadata import read_metadata

        lines = []
        for job in jobs:
            path = out / job.file
            recipe = read_metadata(path)
            lines.append(json.dumps({"line": job.entry.index, "file": job.file, "prompt": recipe["prompt"],
                                     "seed": recipe["seed"], "sha256": sha256_of(path)}, ensure_ascii=False))
        text = "\n".join(lines) + "\n"
        write_atomic(out / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        rate = f", {summary['images_per_s']:.2f} images/s" if summary["images_per_s"] else ""
        print(f"latentloom: {len(jobs)} images in {out} ({len(todo)} made now in {elapsed:.1f} s by {world} "
              f"process{'es' if world > 1 else ''}{rate}; {len(jobs) - len(todo)} were there)", file=sys.stderr)
    return summary
