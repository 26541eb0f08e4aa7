"""A generation job: runs txt2img / img2img / inpaint / upscale on the resident model in n_iter batches, reports
each step (progress, live previews, interrupts) and writes every finished image to the gallery."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from latentloom.serve.controlnet import attached, call_arguments, check_sizes
from latentloom.serve.images import png_bytes
from latentloom.serve.jobs import Interrupted, Job

log = logging.getLogger("latentloom.serve")


@dataclass
class Generation:
    """One request, checked and in latentloom's terms (A1111's fields are mapped in serve/a1111.py)."""

    task: str  # txt2img, img2img, inpaint, upscale
    prompt: str
    negative_prompt: str
    seed: int
    steps: int | None
    cfg_scale: float | None
    sampler: str | None
    karras: bool | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    image: Any = None  # PIL, for img2img / inpaint / upscale
    mask: Any = None  # PIL "L", white = repaint
    strength: float = 0.75
    feather: int | None = None
    noise_level: int | None = None
    model: str | None = None  # switch to this model first (A1111's override_settings.sd_model_checkpoint)
    restore_model: bool = True  # A1111's override_settings_restore_afterwards
    controlnets: list = field(default_factory=list)  # serve.controlnet.Unit, attached for this job only
    warnings: list[str] = field(default_factory=list)

    def steps_per_batch(self, default_steps: int) -> int:
        steps = self.steps or default_steps
        if self.task in ("img2img", "inpaint"):
            return max(1, min(steps, int(steps * self.strength)))
        return steps


@dataclass
class Finished:
    names: list[str]
    pngs: list[bytes]
    recipes: list[dict]
    seeds: list[int]
    model: Any  # the ModelEntry that made them
    interrupted: bool = False


def check_generation(gen: Generation, limits) -> None:
    """Sizes, steps and image count against the server's limits (None: not known yet, checked later)."""
    for name in ("width", "height"):
        value = getattr(gen, name)
        if value is not None and (value < 8 or value % 8):
            raise ValueError(f"{name} must be a multiple of 8 and at least 8, got {value}")
    if gen.width is not None and gen.height is not None and gen.width * gen.height > limits.max_pixels:
        raise ValueError(f"width x height = {gen.width}x{gen.height} = {gen.width * gen.height} pixels is over "
                         f"this server's limit of {limits.max_pixels} (--max-pixels)")
    if gen.steps is not None and not 1 <= gen.steps <= limits.max_steps:
        raise ValueError(f"steps must be in [1, {limits.max_steps}] (--max-steps), got {gen.steps}")
    if gen.batch_size < 1 or gen.n_iter < 1:
        raise ValueError(f"batch_size and n_iter must be >= 1, got batch_size={gen.batch_size}, n_iter={gen.n_iter}")
    if gen.batch_size * gen.n_iter > limits.max_batch:
        raise ValueError(f"batch_size x n_iter = {gen.batch_size} x {gen.n_iter} images is over this server's "
                         f"limit of {limits.max_batch} (--max-batch)")


def run_generation(job: Job, server, gen: Generation) -> Finished:
    """The job function: switch models if asked, then make gen.n_iter batches of gen.batch_size images."""
    registry = server.upscalers if gen.task == "upscale" else server.models
    previous = registry.current
    if gen.model is not None:
        registry.select(gen.model)
    try:
        return _run(job, server, registry, gen)
    finally:
        if gen.model is not None and gen.restore_model:
            registry.current = previous  # loaded again only when a later request needs it


def _run(job: Job, server, registry, gen: Generation) -> Finished:
    pipe = registry.pipeline()
    entry = registry.current
    if gen.task == "txt2img":  # the model's own defaults for what the request left out, within the limits
        # with ControlNet, the map's size first, as the pipelines (and diffusers) take it
        size = gen.controlnets[0].image.size if gen.controlnets else (None, None)
        gen.width = gen.width or size[0] or pipe.defaults.width
        gen.height = gen.height or size[1] or pipe.defaults.height
    elif gen.task == "upscale":  # the limits hold for what comes out
        gen.width, gen.height = gen.image.width * pipe.vae_scale_factor, gen.image.height * pipe.vae_scale_factor
    gen.steps = gen.steps or pipe.defaults.num_inference_steps
    check_generation(gen, server.settings.limits)
    check_sizes(gen.controlnets, gen.width, gen.height)
    per_batch = gen.steps_per_batch(pipe.defaults.num_inference_steps)
    job.total_steps, job.batches = per_batch * gen.n_iter, gen.n_iter
    every = server.settings.preview_every
    done = Finished(names=[], pngs=[], recipes=[], seeds=[], model=entry)

    def callback(i, sigma, x, denoised):
        job.step(i + 1, per_batch)
        if gen.task != "upscale" and job.wants_preview() and (i + 1) % every == 0:
            try:
                job.preview = _preview(pipe, denoised)
                job.preview_id += 1
            except Exception:  # a preview is a nicety: never fail the job for it
                log.debug("preview decode failed", exc_info=True)

    with attached(pipe, server.controlnets, gen.controlnets):
        _batches(job, server, pipe, gen, done, per_batch, callback)
    return done


def _batches(job: Job, server, pipe, gen: Generation, done: Finished, per_batch: int, callback) -> None:
    for batch in range(gen.n_iter):
        job.textinfo = f"batch {batch + 1} of {gen.n_iter}" if gen.n_iter > 1 else None
        seed = gen.seed + batch * gen.batch_size
        start = time.perf_counter()
        try:
            out = _call(pipe, gen, seed=seed, callback=callback)
        except Interrupted:
            done.interrupted = True
            break
        log.info("%s: %d image(s), %d steps, %dx%d in %.2f s", gen.task, len(out.images), per_batch,
                 gen.width or 0, gen.height or 0, time.perf_counter() - start)
        for image, recipe in zip(out.images, out.recipes):
            name = server.gallery.save(image, recipe, seed=recipe.get("seed"))
            done.names.append(name)
            done.pngs.append((server.gallery.folder / name).read_bytes())  # the file as saved, metadata and all
            done.recipes.append(recipe)
            done.seeds.append(recipe.get("seed", seed))
        if job.interrupted:  # interrupted after its last step: keep the batch, make no more
            done.interrupted = True
            break


def _call(pipe, gen: Generation, *, seed: int, callback):
    common = dict(negative_prompt=gen.negative_prompt, num_inference_steps=gen.steps, guidance_scale=gen.cfg_scale,
                  sampler=gen.sampler, karras_sigmas=gen.karras, num_images_per_prompt=gen.batch_size, seed=seed,
                  callback=callback, progress=False, **call_arguments(gen.controlnets))
    if gen.task == "txt2img":
        return pipe(gen.prompt, height=gen.height, width=gen.width, **common)
    if gen.task == "img2img":
        return pipe.img2img(gen.prompt, image=gen.image, strength=gen.strength, **common)
    if gen.task == "inpaint":
        feather = {} if gen.feather is None else {"feather": gen.feather}
        return pipe.inpaint(gen.prompt, image=gen.image, mask_image=gen.mask, strength=gen.strength, **feather,
                            **common)
    if gen.task == "upscale":
        level = {} if gen.noise_level is None else {"noise_level": gen.noise_level}
        return pipe.upscale(gen.prompt, image=gen.image, **level, **common)
    raise ValueError(f"unknown task {gen.task!r}; expected txt2img, img2img, inpaint or upscale")


def _preview(pipe, denoised) -> bytes:
    """The first image's current x0 estimate, decoded by the VAE."""
    from latentloom.pipelines.output import latents_to_output

    image = latents_to_output(pipe, denoised[:1].float(), "pil")[0]
    return png_bytes(image)
