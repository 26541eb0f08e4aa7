"""AUTOMATIC1111's API under /sdapi/v1/: its request fields mapped onto latentloom's pipelines, and its answers.

Field names, defaults and answer shapes follow A1111's modules/api/models.py and api.py. A field this server
does not implement is ignored with a logged warning when it asks for something (a value other than A1111's
neutral one); unknown fields likewise. Missing size, steps, cfg_scale and sampler take the model's defaults.
"""
from __future__ import annotations

import json
import logging
import random
import time
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, Strict

from latentloom.serve.controlnet import check_sizes, hide_images, read_scripts
from latentloom.serve.generate import Finished, Generation, check_generation
from latentloom.serve.images import decode_image, encode_png
from latentloom.serve.names import a1111_sampler_name, resolve_sampler, resolve_scheduler

log = logging.getLogger("latentloom.serve")

Int = Annotated[int, Strict()]  # no bools or strings where A1111 takes ints
SEED_RANGE = 2**32  # A1111's seeds are 32-bit


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: Int = -1
    steps: Int | None = None
    cfg_scale: float | None = None
    width: Int | None = None
    height: Int | None = None
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111's older name for sampler_name
    scheduler: str | None = None
    batch_size: Int = 1
    n_iter: Int = 1
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict)  # ControlNet's: serve/controlnet.py
    force_task_id: str | None = None
    send_images: bool = True
    save_images: bool = False


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None
    mask: str | None = None
    denoising_strength: float = 0.75
    inpainting_mask_invert: Int = 0
    mask_blur: Int | None = None
    include_init_images: bool = False


# A1111 fields latentloom does not implement, with the values that ask for nothing (no warning for those)
NEUTRAL: dict[str, tuple] = {
    "enable_hr": (False, None), "styles": ([], None), "subseed": (-1, None), "subseed_strength": (0, 0.0, None),
    "seed_resize_from_h": (-1, 0, None), "seed_resize_from_w": (-1, 0, None), "restore_faces": (False, None),
    "tiling": (False, None), "do_not_save_samples": (False, None), "do_not_save_grid": (False, None),
    "eta": (None, 0, 0.0, 1, 1.0), "s_churn": (0, 0.0, None), "s_tmax": (0, 0.0, None), "s_tmin": (0, 0.0, None),
    "s_noise": (1, 1.0, None), "script_name": (None, ""), "script_args": ([], None),
    "firstphase_width": (0, None), "firstphase_height": (0, None), "refiner_checkpoint": (None, ""),
    "refiner_switch_at": (None, 0), "disable_extra_networks": (False, None), "comments": (None, {}),
    "infotext": (None, ""), "image_cfg_scale": (None, 1.5, 1.0), "initial_noise_multiplier": (None, 1, 1.0),
    "inpainting_fill": (None, 0, 1), "inpaint_full_res": (False, 0, None), "inpaint_full_res_padding": (None, 0, 32),
    "resize_mode": (0, None), "latent_mask": (None,), "mask_round": (True, None), "user": (None,),
    "denoising_strength": None,  # txt2img: only used by hires fix, which is off
}
# A1111 fields that only matter under another switch (hires fix) or are spent elsewhere
_SILENT_PREFIXES = ("hr_",)


def ignored_fields(req: BaseModel) -> list[str]:
    """Warnings for the fields of a request this server does not act on."""
    notes = []
    for key, value in (req.model_extra or {}).items():
        if key.startswith(_SILENT_PREFIXES) or key in type(req).model_fields:
            continue
        if key in NEUTRAL:
            neutral = NEUTRAL[key]
            if neutral is None or value in neutral:
                continue
            notes.append(f"{key}={value!r} is not supported by latentloom and was ignored")
        else:
            notes.append(f"unknown field {key!r} was ignored")
    if getattr(req, "include_init_images", False):
        notes.append("include_init_images is not supported; init images are not echoed back")
    return notes


def check_request(req: Txt2ImgRequest) -> None:
    """The request-only checks (sizes and steps are checked with the model's defaults in the job)."""
    if req.cfg_scale is not None and not 0.0 <= req.cfg_scale <= 100.0:
        raise ValueError(f"cfg_scale must be in [0, 100], got {req.cfg_scale}")
    if req.seed < -1 or req.seed >= SEED_RANGE:
        raise ValueError(f"seed must be -1 (random) or in [0, {SEED_RANGE - 1}], got {req.seed}")


def to_generation(req: Txt2ImgRequest, server, *, task: str) -> Generation:
    """Map an A1111 request onto a `Generation` (ValueError / LookupError name the bad field)."""
    notes = ignored_fields(req)
    sampler, karras = None, None
    name = req.sampler_name or req.sampler_index
    if name:
        entry, implied = resolve_sampler(name)
        sampler = entry.sampler
        if implied is not None:
            karras = resolve_scheduler(implied)
    if req.scheduler and karras is None:
        karras = resolve_scheduler(req.scheduler)
    model = None
    overrides = dict(req.override_settings)
    if "sd_model_checkpoint" in overrides:
        model = server.models.find(overrides.pop("sd_model_checkpoint")).title
    notes += [f"override_settings.{key} is not supported and was ignored" for key in overrides]
    check_request(req)
    seed = random.randrange(SEED_RANGE) if req.seed == -1 else req.seed
    gen = Generation(task=task, prompt=req.prompt, negative_prompt=req.negative_prompt, seed=seed, steps=req.steps,
                     cfg_scale=req.cfg_scale, sampler=sampler, karras=karras, width=req.width, height=req.height,
                     batch_size=req.batch_size, n_iter=req.n_iter, model=model,
                     restore_model=req.override_settings_restore_afterwards, warnings=notes)
    check_generation(gen, server.settings.limits)  # what can be checked before the model's defaults are known
    if isinstance(req, Img2ImgRequest):
        _add_images(gen, req, server)
    # after the init image: an img2img unit without an image reads it, as sd-webui-controlnet does
    gen.controlnets, script_notes = read_scripts(req.alwayson_scripts, server.controlnets,
                                                 max_pixels=server.settings.limits.max_input_pixels,
                                                 init_image=gen.image if gen.task != "txt2img" else None)
    notes += script_notes
    check_sizes(gen.controlnets, gen.width, gen.height)  # txt2img sizes left out are checked in the job
    for note in notes:
        log.warning("%s: %s", task, note)
    return gen


def _add_images(gen: Generation, req: Img2ImgRequest, server) -> None:
    if not req.init_images:
        raise ValueError("init_images must hold one base64 image (img2img needs an image to start from)")
    if len(req.init_images) > 1:
        gen.warnings.append(f"init_images has {len(req.init_images)} images; only the first is used")
    if not 0.0 <= req.denoising_strength <= 1.0:
        raise ValueError(f"denoising_strength must be in [0, 1], got {req.denoising_strength}")
    if req.inpainting_mask_invert not in (0, 1):
        raise ValueError(f"inpainting_mask_invert must be 0 or 1, got {req.inpainting_mask_invert}")
    limit = server.settings.limits.max_input_pixels
    image = decode_image(req.init_images[0], field="init_images[0]", max_pixels=limit).convert("RGB")
    # A1111's resize_mode 0: the image is resized to the requested size (without one: its own, to a multiple of 8)
    gen.width = gen.width or max(8, image.width // 8 * 8)
    gen.height = gen.height or max(8, image.height // 8 * 8)
    check_generation(gen, server.settings.limits)
    size = (gen.width, gen.height)
    gen.image = image if image.size == size else image.resize(size)
    gen.strength = req.denoising_strength
    gen.task = "img2img"
    if req.mask:
        from PIL import ImageOps

        mask = decode_image(req.mask, field="mask", max_pixels=limit)
        # A1111: white repaints; an alpha channel, where present, is the mask's own transparency
        mask = mask.convert("L").resize(size)
        gen.mask = ImageOps.invert(mask) if req.inpainting_mask_invert else mask
        gen.task = "inpaint"
        if req.mask_blur is not None:
            if not 0 <= req.mask_blur <= 256:
                raise ValueError(f"mask_blur must be in [0, 256] pixels, got {req.mask_blur}")
            gen.feather = req.mask_blur  # the nearest latentloom has: paste-back blending width


def answer(req: BaseModel | None, gen: Generation, done: Finished, *, send_images: bool = True) -> dict[str, Any]:
    """A1111's {images, parameters, info} for a finished job."""
    from latentloom.pipelines.metadata import human_readable

    parameters = req.model_dump() if req is not None else {}
    if "init_images" in parameters:  # A1111 does not echo the uploaded images
        parameters["init_images"] = None
        parameters["mask"] = None
    hide_images(parameters)
    first = done.recipes[0] if done.recipes else {}
    seeds = done.seeds or [gen.seed]
    info = {
        "prompt": gen.prompt, "all_prompts": [gen.prompt] * len(done.recipes),
        "negative_prompt": gen.negative_prompt, "all_negative_prompts": [gen.negative_prompt] * len(done.recipes),
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": first.get("width", gen.width), "height": first.get("height", gen.height),
        "sampler_name": a1111_sampler_name(first.get("sampler", gen.sampler or "")),
        "scheduler": "Karras" if first.get("karras_sigmas") else "Automatic",
        "cfg_scale": first.get("guidance_scale", gen.cfg_scale), "steps": first.get("num_inference_steps", gen.steps),
        "batch_size": gen.batch_size, "n_iter": gen.n_iter,
        "sd_model_name": done.model.title if done.model else None, "sd_model_hash": first.get("model_hash"),
        "denoising_strength": gen.strength if gen.task in ("img2img", "inpaint") else None,
        "index_of_first_image": 0, "infotexts": [human_readable(r) for r in done.recipes],
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": gen.task == "inpaint", "interrupted": done.interrupted,
        "warnings": gen.warnings, "latentloom": {"names": done.names, "task": gen.task},
    }
    images = [encode_png(data) for data in done.pngs] if send_images else []
    return {"images": images, "parameters": parameters, "info": json.dumps(info, ensure_ascii=False)}


def png_info(image_b64: Any, server) -> dict[str, Any]:
    """A1111's /png-info: the infotext, every text chunk, and the infotext's fields parsed."""
    image = decode_image(image_b64, field="image", max_pixels=server.settings.limits.max_input_pixels)
    items = {k: v for k, v in (getattr(image, "text", None) or image.info).items() if isinstance(v, str)}
    info = items.pop("parameters", "")
    return {"info": info, "items": items, "parameters": parse_infotext(info)}


def parse_infotext(text: str) -> dict[str, Any]:
    """The fields of an A1111 infotext: "Prompt", "Negative prompt", and the settings line's "Key: value"
    pairs, read by latentloom's infotext reader (A1111's rule: a last line with 3+ pairs is the settings)."""
    from latentloom.pipelines.infotext import settings_pairs, split_prompts

    if not text:
        return {}
    *lines, last = text.strip().split("\n")
    pairs, _ = settings_pairs(last)
    if len(pairs) < 3:  # no settings line: every line is prompt
        lines, pairs = [*lines, last], []
    fields: dict[str, Any] = {}
    fields["Prompt"], fields["Negative prompt"] = split_prompts(lines)
    fields.update(pairs)
    if "Size" in fields and "x" in fields["Size"]:
        fields["Size-1"], _, fields["Size-2"] = fields["Size"].partition("x")
    return fields


def progress_state(server, *, skip_current_image: bool = False) -> dict[str, Any]:
    """A1111's /sdapi/v1/progress for the running job (zeros when idle)."""
    job = server.queue.current
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                "state": {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                          "job_count": server.queue.pending(), "job_timestamp": "0", "job_no": 0,
                          "sampling_step": 0, "sampling_steps": 0}}
    image = None
    if not skip_current_image:
        job.preview_wanted = time.time()  # previews are decoded only while someone looks
        image = encode_png(job.preview) if job.preview is not None else None
    return {"progress": job.progress(), "eta_relative": job.eta() or 0.0, "current_image": image,
            "textinfo": job.textinfo,
            "state": {"skipped": job.skipped, "interrupted": job.interrupted, "stopping_generation": False,
                      "job": job.id, "job_count": server.queue.pending(),
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
                      "job_no": 0, "sampling_step": job.batch_step, "sampling_steps": job.batch_steps}}


def router(server) -> APIRouter:
    """The /sdapi/v1 routes of one server."""
    api = APIRouter(prefix="/sdapi/v1")

    @api.post("/txt2img")
    async def txt2img(req: Txt2ImgRequest):
        return await server.run_a1111(req, task="txt2img")

    @api.post("/img2img")
    async def img2img(req: Img2ImgRequest):
        return await server.run_a1111(req, task="img2img")

    @api.get("/progress")
    def progress(skip_current_image: bool = False):
        return progress_state(server, skip_current_image=skip_current_image)

    @api.post("/interrupt")
    def interrupt():
        server.queue.interrupt()
        return {}

    @api.post("/skip")
    def skip():
        server.queue.interrupt(skip=True)
        return {}

    @api.get("/samplers")
    def samplers():
        from latentloom.serve.names import samplers_listing

        return samplers_listing()

    @api.get("/schedulers")
    def schedulers():
        from latentloom.serve.names import schedulers_listing

        return schedulers_listing()

    @api.get("/sd-models")
    def sd_models():
        return [entry.a1111() for entry in server.models.entries]

    @api.post("/refresh-checkpoints")
    def refresh_checkpoints():
        return {}

    @api.get("/options")
    def get_options():
        return server.options()

    @api.post("/options")
    async def set_options(request: Request):
        body = await server.json_object(request)
        return await server.set_options(body)

    @api.post("/png-info")
    async def png_info_route(request: Request):
        body = await server.json_object(request)
        return png_info(body.get("image"), server)

    @api.get("/upscalers")
    def upscalers():
        items = [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": None}]
        items += [{"name": e.title, "model_name": e.title, "model_path": e.filename, "model_url": None,
                   "scale": e.scale} for e in (server.upscalers.entries if server.upscalers else [])]
        return items

    @api.get("/scripts")
    def scripts():  # webuiapi asks on connect which extensions are there: ControlNet, where it is offered
        names = ["controlnet"] if server.controlnets.entries else []
        return {"txt2img": names, "img2img": list(names)}

    @api.get("/cmd-flags")
    def cmd_flags():
        s = server.settings
        return {"listen": s.host not in ("127.0.0.1", "localhost", "::1"), "port": s.port, "api": True,
                "api_auth": "***" if s.api_auth else None, "ckpt": server.models.entries[0].source}

    return api
