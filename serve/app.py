"""The FastAPI app of `latentloom serve`: the page, the A1111 API (serve/a1111.py), and latentloom's own routes
for the page (progress by task id, cancel, gallery, info, upscale). See serve/API.md for the contract."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from latentloom.serve import a1111
from latentloom.serve.controlnet import VERSION, ControlNetRegistry, bundled_sources, modules
from latentloom.serve.gallery import Gallery
from latentloom.serve.generate import Finished, Generation, run_generation
from latentloom.serve.images import BadImage, encode_png, set_pixel_limit
from latentloom.serve.jobs import Cancelled, JobQueue
from latentloom.serve.models import ModelRegistry
from latentloom.serve.names import accepted_samplers, schedulers_listing
from latentloom.serve.security import Guard
from latentloom.serve.settings import ServeSettings

log = logging.getLogger("latentloom.serve")


class RequestError(Exception):
    """A 4xx answer: {"error": kind, "detail": message}."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


class Server:
    """What the routes share: settings, models, the job queue and the gallery."""

    def __init__(self, settings: ServeSettings, *, loader=None) -> None:
        self.settings = settings
        self.models = ModelRegistry(settings.models, loader=loader)
        # the bundled ControlNet comes with the bundled models it fits
        self.controlnets = ControlNetRegistry([*settings.controlnets, *bundled_sources(settings.models)])
        self.upscalers = ModelRegistry([settings.upscaler], loader=loader) if settings.upscaler else None
        self.queue = JobQueue()
        self.gallery = Gallery(settings.outputs)
        self.ready = None  # the preload's future
        self._defaults: dict[str, Any] = {}  # model title -> its CallDefaults, once loaded
        set_pixel_limit(settings.limits.max_input_pixels)

    def preload(self) -> None:
        """Load the first model in the worker, so the first request finds it ready."""
        self.ready = self.queue.submit(lambda job: self._remember_defaults(self.models.pipeline()), kind="load").future
        if self.controlnets.entries:  # their names hash the weights: once, now, rather than in a request
            self.queue.submit(lambda job: self.controlnets.names(), kind="load")

    def _remember_defaults(self, pipe) -> None:
        self._defaults[self.models.current.title] = pipe.defaults

    def defaults(self):
        """The current model's call defaults (size, steps...), once it has been loaded."""
        from latentloom.pipelines.defaults import CallDefaults

        return self._defaults.get(self.models.current.title) or CallDefaults()

    async def submit(self, gen: Generation, *, job_id: str | None = None) -> tuple[Any, Finished]:
        def run(job):
            done = run_generation(job, self, gen)
            if gen.task != "upscale" and self.models.is_loaded():
                self._remember_defaults(self.models.pipeline())
            return done

        job = self.queue.submit(run, kind=gen.task, job_id=job_id)
        try:
            # shield: a client that goes away must not cancel the job's future; the job runs on and saves
            return job, await asyncio.shield(asyncio.wrap_future(job.future))
        except Cancelled:
            raise RequestError(409, "cancelled", f"job {job.id} was cancelled before it started") from None
        except (ValueError, TypeError, LookupError) as err:
            raise RequestError(422, "invalid request", str(err)) from None

    async def run_a1111(self, req: a1111.Txt2ImgRequest, *, task: str) -> dict[str, Any]:
        gen = self._checked(lambda: a1111.to_generation(req, self, task=task))
        _, done = await self.submit(gen, job_id=req.force_task_id)
        return a1111.answer(req, gen, done, send_images=req.send_images)

    @staticmethod
    def _checked(make):
        try:
            return make()
        except BadImage as err:
            raise RequestError(err.status, "bad image", str(err)) from None
        except (ValueError, TypeError, LookupError) as err:
            raise RequestError(422, "invalid request", str(err)) from None

    async def json_object(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(422, "malformed JSON", f"the request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise RequestError(422, "invalid request", f"the request body must be a JSON object, got "
                               f"{type(body).__name__}")
        return body

    def options(self) -> dict[str, Any]:
        current = self.models.current
        return {"sd_model_checkpoint": current.title, "sd_checkpoint_hash": current.hash,
                "samples_format": "png", "outdir_samples": str(self.settings.outputs),
                "live_previews_enable": True, "show_progress_every_n_steps": self.settings.preview_every,
                "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "samples_save": True}

    async def set_options(self, body: dict[str, Any]) -> None:
        for key in body:
            if key != "sd_model_checkpoint":
                log.warning("options: %s is not supported by latentloom and was ignored", key)
        if "sd_model_checkpoint" in body:
            entry = self._checked(lambda: self.models.find(body["sd_model_checkpoint"]))

            def switch(job):  # in the worker, after the jobs before it, as A1111 loads synchronously
                self.models.select(entry.title)
                self._remember_defaults(self.models.pipeline())

            job = self.queue.submit(switch, kind="load")
            await asyncio.shield(asyncio.wrap_future(job.future))
        return None


def create_app(settings: ServeSettings, *, loader=None, preload: bool = True) -> FastAPI:
    """The app for `settings`; `loader(source) -> Pipeline` replaces load_pipeline (tests)."""
    server = Server(settings, loader=loader)
    app = FastAPI(title="latentloom", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        return JSONResponse({"error": err.kind, "detail": err.detail}, status_code=err.status)

    @app.exception_handler(BadImage)
    async def bad_image(request: Request, err: BadImage):
        return JSONResponse({"error": "bad image", "detail": str(err)}, status_code=err.status)

    app.include_router(a1111.router(server))
    _controlnet_routes(app, server)
    _page_routes(app, server)
    _latentloom_routes(app, server)
    app.add_middleware(Guard, host=settings.host, port=settings.port, auth=settings.api_auth,
                       max_body=settings.limits.max_body_bytes, origins=list(settings.cors_allow_origins))
    if settings.cors_allow_origins:
        from starlette.middleware.cors import CORSMiddleware

        # outermost: a browser's preflight carries no credentials, so it must be answered before the auth check
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_allow_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)
    if preload:
        server.preload()
    return app


def _not_found(what: str) -> JSONResponse:
    return JSONResponse({"error": "not found", "detail": f"{what} is not here"}, status_code=404)


def _controlnet_routes(app: FastAPI, server: Server) -> None:
    """sd-webui-controlnet's listing routes (its units come in txt2img / img2img's alwayson_scripts)."""

    @app.get("/controlnet/version")
    def controlnet_version():
        return {"version": VERSION}

    @app.get("/controlnet/model_list")
    def controlnet_model_list(update: bool = True):  # the extension rescans its folder; the list here is fixed
        return {"model_list": server.controlnets.names()}

    @app.get("/controlnet/module_list")
    def controlnet_module_list(alias_names: bool = False):
        return {"module_list": modules()}


def _page_routes(app: FastAPI, server: Server) -> None:
    static = Path(server.settings.static_dir)

    @app.get("/")
    def index():
        page = static / "index.html"
        if not page.is_file():
            return _not_found("the page (serve/static/index.html)")
        return FileResponse(page, media_type="text/html")

    @app.get("/static/{path:path}")
    def static_file(path: str):
        root = static.resolve()
        target = (static / path)
        try:
            inside = target.resolve().is_relative_to(root) and target.resolve().is_file()
        except (OSError, ValueError):
            inside = False
        if not inside or ".." in Path(path).parts:
            return _not_found(f"/static/{path}")
        return FileResponse(target)

    @app.get("/outputs/{name:path}")
    def output(name: str):
        path = server.gallery.path(name)
        if path is None:
            return _not_found(f"/outputs/{name}")
        return FileResponse(path, media_type="image/png")


def _latentloom_routes(app: FastAPI, server: Server) -> None:
    @app.post("/internal/progress")
    async def internal_progress(request: Request):
        body = await server.json_object(request)
        return task_progress(server, body)

    @app.post("/latentloom/cancel")
    async def cancel(request: Request):
        body = await server.json_object(request)
        job_id = body.get("id_task")
        if not isinstance(job_id, str):
            raise RequestError(422, "invalid request", f"id_task must be the task id string, got {job_id!r}")
        return {"id_task": job_id, "cancelled": server.queue.cancel(job_id)}

    @app.get("/latentloom/gallery")
    def gallery():
        return server.gallery.items()

    @app.get("/latentloom/info")
    def info():
        d, limits = server.defaults(), server.settings.limits
        return {"models": [{"title": e.title, "model_name": e.title} for e in server.models.entries],
                "current_model": server.models.current.title, "samplers": accepted_samplers(),
                "schedulers": [s["label"] for s in schedulers_listing()], "upscaler": server.upscalers is not None,
                "limits": {"max_pixels": limits.max_pixels, "max_steps": limits.max_steps,
                           "max_batch": limits.max_batch, "max_body_mb": limits.max_body_mb},
                "defaults": {"width": d.width, "height": d.height, "steps": d.num_inference_steps,
                             "cfg_scale": d.guidance_scale, "sampler_name": a1111.a1111_sampler_name(d.sampler)}}

    @app.post("/latentloom/upscale")
    async def upscale(request: Request):
        body = await server.json_object(request)
        if server.upscalers is None:
            raise RequestError(409, "no upscaler", "this server has no upscaler; start it with --upscaler MODEL "
                               "(e.g. --upscaler bundled:upscaler)")
        name = body.get("name")
        path = server.gallery.path(name) if isinstance(name, str) else None
        if path is None:
            raise RequestError(404, "not found", f"name must be a gallery image name (GET /latentloom/gallery), "
                               f"got {name!r}")
        gen = _upscale_generation(server, path, body)
        _, done = await server.submit(gen, job_id=body.get("id_task") if isinstance(body.get("id_task"), str)
                                      else None)
        return a1111.answer(None, gen, done)


def _upscale_generation(server: Server, path: Path, body: dict[str, Any]) -> Generation:
    from PIL import Image

    recipe = server.gallery.recipe(path.name) or {}
    with Image.open(path) as image:
        image = image.convert("RGB")
    seed = recipe.get("seed") if isinstance(recipe.get("seed"), int) else 0
    steps = body.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or not 1 <= steps <= server.settings.limits.max_steps):
        raise RequestError(422, "invalid request", f"steps must be an int in [1, {server.settings.limits.max_steps}] "
                           f"(or left out for the upscaler's default), got {steps!r}")
    return Generation(task="upscale", prompt=str(recipe.get("prompt") or ""),
                      negative_prompt=str(recipe.get("negative_prompt") or ""), seed=seed, steps=steps,
                      cfg_scale=None, sampler=None, image=image)


def task_progress(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    """The page's (and A1111's own UI's) /internal/progress for one task id."""
    job_id = body.get("id_task")
    if not isinstance(job_id, str):
        raise RequestError(422, "invalid request", f"id_task must be the task id string, got {job_id!r}")
    wanted = body.get("id_live_preview", -1)
    job = server.queue.get(job_id)
    idle = {"active": False, "queued": False, "queue_position": None, "completed": False, "progress": None,
            "eta": None, "live_preview": None, "id_live_preview": wanted, "textinfo": "Waiting...",
            "sampling_step": 0, "sampling_steps": 0}
    if job is None:
        return idle
    finished = job.state in ("done", "failed", "cancelled")
    position = server.queue.position(job)
    answer = {**idle, "active": job.state == "running", "queued": job.state == "queued",
              "queue_position": position, "completed": finished,
              "progress": job.progress() if job.state != "queued" else None, "eta": job.eta(),
              "textinfo": _textinfo(job, position), "sampling_step": job.batch_step,
              "sampling_steps": job.batch_steps}
    if body.get("live_preview", True) and job.state == "running":
        job.preview_wanted = time.time()
        if job.preview is not None and job.preview_id != wanted:
            answer["live_preview"] = "data:image/png;base64," + encode_png(job.preview)
            answer["id_live_preview"] = job.preview_id
    return answer


def _textinfo(job, position: int | None) -> str:
    if job.state == "queued":
        return f"In queue: {position + 1 if position is not None else '?'} ahead of you" if position else "Next"
    if job.state == "running":
        return job.textinfo or f"Step {job.batch_step} of {job.batch_steps}"
    return {"done": "Done", "failed": "Failed", "cancelled": "Cancelled"}[job.state]
