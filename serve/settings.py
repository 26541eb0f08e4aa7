"""What a `latentloom serve` run is configured with: models, address, outputs folder, security and limits."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


@dataclass
class Limits:
    """The largest request the server takes: pixels per image (width x height), sampler steps, images per
    request (batch_size x n_iter) and request body size in MiB."""

    max_pixels: int = 1024 * 1024
    max_steps: int = 150
    max_batch: int = 16
    max_body_mb: float = 64.0

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_steps", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.max_body_mb, (int, float)) or not self.max_body_mb > 0:
            raise ValueError(f"max_body_mb must be a number > 0, got {self.max_body_mb!r}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_input_pixels(self) -> int:
        # uploaded images are resized to the requested size, so they may be a little larger than an output
        return 4 * self.max_pixels


@dataclass
class ServeSettings:
    """models: "bundled:NAME", model folders or single files (the first one is loaded at start);
    api_auth: (user, password) or None; cors_allow_origins: the origins that get CORS headers (none: no
    CORS headers at all); upscaler: a model for /latentloom/upscale, or None; controlnets: the ControlNets the
    API's ControlNet units may name, besides the bundled one the bundled models bring (folders, .safetensors
    files, "bundled:controlnet"); preview_every: decode the current x0 estimate every this many steps while
    someone watches the progress."""

    models: list[str] = field(default_factory=lambda: ["bundled:default"])
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    outputs: Path = Path("outputs")
    api_auth: tuple[str, str] | None = None
    cors_allow_origins: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    upscaler: str | None = None
    controlnets: list[str] = field(default_factory=list)
    preview_every: int = 3
    static_dir: Path = Path(__file__).resolve().parent / "static"

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models is empty; give at least one model ('bundled:default', a folder or a file)")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an int in [0, 65535], got {self.port!r}")
        self.outputs = Path(self.outputs)
        for origin in self.cors_allow_origins:
            if origin == "*" or not origin.startswith(("http://", "https://")):
                raise ValueError(f"CORS origin {origin!r} is not an origin; give full origins such as "
                                 "'http://localhost:3000' ('*' is refused: any web page could drive the server)")


def parse_auth(value: str) -> tuple[str, str]:
    """'USER:PASS' -> (user, password); the password may contain ':'."""
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"--api-auth must be USER:PASSWORD with both parts non-empty, got {value!r}")
    return user, password
