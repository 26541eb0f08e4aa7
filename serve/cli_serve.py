"""`latentloom serve`: the local web page and AUTOMATIC1111-compatible HTTP API (FastAPI on uvicorn)."""
from __future__ import annotations

import argparse
import sys

from latentloom.serve.settings import DEFAULT_HOST, DEFAULT_PORT, Limits

_LIMITS = Limits()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the local web page and an AUTOMATIC1111-compatible API",
        description="Serve a web page and an AUTOMATIC1111-compatible HTTP API (/sdapi/v1/txt2img, img2img, "
                    "progress, ...) on the bundled model, offline, or on the --model list. Binds 127.0.0.1 unless "
                    "--host; every image made is written with its recipe to --outputs.",
    )
    parser.add_argument("--model", action="append", default=None, metavar="MODEL",
                        help="a model folder, a single .safetensors file or bundled:NAME; repeat for a list the "
                             "API can switch between (one loaded at a time; default: bundled:default)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to bind (default: {DEFAULT_HOST}, this machine only; 0.0.0.0 opens it to "
                             "the network: then set --api-auth)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--outputs", default="outputs", metavar="DIR",
                        help="folder every image is written to, and the gallery (default: ./outputs)")
    parser.add_argument("--api-auth", default=None, metavar="USER:PASS",
                        help="require HTTP Basic auth with this user and password on every route (page and API)")
    parser.add_argument("--cors-allow-origins", nargs="+", default=[], metavar="ORIGIN",
                        help="web origins (e.g. http://localhost:3000) allowed to call the API from a browser; "
                             "default: none, no CORS headers")
    parser.add_argument("--max-pixels", type=int, default=_LIMITS.max_pixels, metavar="N",
                        help=f"largest width x height of an image (default: {_LIMITS.max_pixels})")
    parser.add_argument("--max-steps", type=int, default=_LIMITS.max_steps, metavar="N",
                        help=f"most sampler steps per request (default: {_LIMITS.max_steps})")
    parser.add_argument("--max-batch", type=int, default=_LIMITS.max_batch, metavar="N",
                        help=f"most images per request, batch_size x n_iter (default: {_LIMITS.max_batch})")
    parser.add_argument("--max-body-mb", type=float, default=_LIMITS.max_body_mb, metavar="N",
                        help=f"largest request body in MiB (default: {_LIMITS.max_body_mb:g})")
    parser.add_argument("--upscaler", default=None, metavar="MODEL",
                        help="an upscaler model for the page's upscale button (e.g. bundled:upscaler)")
    parser.add_argument("--controlnet", action="append", default=None, metavar="PATH",
                        help="a ControlNet for the API's alwayson_scripts (sd-webui-controlnet's units): a diffusers "
                             "ControlNetModel folder, an original .safetensors file or bundled:controlnet; repeat "
                             "for more (loaded at first use; bundled:controlnet is offered with the bundled models)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from latentloom.pipelines.cli_common import fail
    from latentloom.serve.controlnet import check_source
    from latentloom.serve.settings import ServeSettings, parse_auth

    try:
        limits = Limits(max_pixels=args.max_pixels, max_steps=args.max_steps, max_batch=args.max_batch,
                        max_body_mb=args.max_body_mb)
        settings = ServeSettings(models=args.model or ["bundled:default"], host=args.host, port=args.port,
                                 outputs=args.outputs, api_auth=parse_auth(args.api_auth) if args.api_auth else None,
                                 cors_allow_origins=list(args.cors_allow_origins), limits=limits,
                                 upscaler=args.upscaler, controlnets=list(args.controlnet or []))
        for source in settings.controlnets:
            check_source(source)
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
    except ValueError as err:
        return fail(str(err))
    import logging

    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_auth is None:
        print(f"latentloom: warning: serving on {settings.host} without --api-auth: anyone who can reach this "
              "machine can use it", file=sys.stderr)
    from latentloom.serve.app import create_app

    app = create_app(settings)
    try:  # the first model loads before the port opens, so the first request does not wait for it
        app.state.server.ready.result()
    except Exception as err:
        return fail(f"could not load {settings.models[0]}: {err}")
    print(f"latentloom serve: http://{_url_host(settings.host)}:{settings.port}/ (outputs in {settings.outputs})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
