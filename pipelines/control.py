"""ControlNet in the pipelines: attaching ControlNets to a model, checking a call's control arguments,
and the residuals each UNet call adds (diffusers' StableDiffusionControlNet* semantics).

    pipe = load_pipeline(model, controlnet=["canny-folder", "control_depth.safetensors"])
    pipe("a house", control_image=[edges, depth], controlnet_conditioning_scale=[1.0, 0.5],
         control_guidance_start=[0.0, 0.2], control_guidance_end=[1.0, 0.8], guess_mode=False)

Control images are RGB in [0, 1] (no normalisation), at the output's size: nothing is resized, a
mismatch is an error. With classifier-free guidance they are duplicated for both halves; in guess mode
the ControlNets run on the conditional half only and the unconditional half gets zeros. Step i of N
keeps ControlNet k when start_k <= i / N and (i + 1) / N <= end_k (diffusers' `controlnet_keep`); the
residuals of several ControlNets are summed (its MultiControlNetModel).
"""
from __future__ import annotations

import hashlib
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CONTROL_KEYS = ("context", "context_mask", "y")  # what a ControlNet reads beside x and t (diffusers passes these)


@dataclass
class AttachedControlNet:
    """A ControlNet in a pipeline, with what recipes record of it."""

    model: Any  # latentloom.unet.ControlNet
    name: str  # absolute path of its folder or file, "bundled:controlnet", or "in-memory" for a module passed in
    weights_hash: str  # first 10 hex digits of the SHA-256 of its weight file ("unknown" in memory)


def load_controlnet(source: Any, *, dtype: torch.dtype | None = None) -> AttachedControlNet:
    """A ControlNet from a diffusers ControlNetModel folder, an original single file (.safetensors),
    "bundled:controlnet" (the bundled model's), a latentloom ControlNet or a diffusers ControlNetModel module."""
    from latentloom.unet import ControlNet

    if isinstance(source, ControlNet):
        return AttachedControlNet(source, "in-memory", "unknown")
    if type(source).__name__ == "ControlNetModel":
        return AttachedControlNet(ControlNet.from_diffusers(source, dtype=dtype), "in-memory", "unknown")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"controlnet must be a path (a ControlNetModel folder or a .safetensors file), a ControlNet, "
                        f"or a list of them; got {type(source).__name__}")
    path, name = locate_controlnet(source)
    if path.is_dir():
        return _from_folder(path, name, dtype=dtype)
    return AttachedControlNet(ControlNet.from_single_file(path, dtype=dtype), name, weights_hash(path))


def locate_controlnet(source: str | os.PathLike) -> tuple[Path, str]:
    """(folder or file, the name recipes give it) of a ControlNet source: a diffusers ControlNetModel folder,
    an original .safetensors file, or "bundled:controlnet"; checked without reading the weights (errors name
    the source and what is accepted)."""
    if isinstance(source, str) and source.startswith("bundled:"):
        from latentloom.weights import BUNDLED_CONTROLNET, bundled_controlnet_dir

        if source != BUNDLED_CONTROLNET:
            raise ValueError(f"unknown bundled ControlNet {source!r}; the bundled one is {BUNDLED_CONTROLNET!r}")
        folder = bundled_controlnet_dir()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{BUNDLED_CONTROLNET} is not in this install (expected {folder}/config.json)")
        return folder, source
    path = Path(source).resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            hint = " (a pipeline folder: its ControlNet loads with it)" if (path / "model_index.json").is_file() else ""
            raise FileNotFoundError(f"controlnet {str(source)!r} is a folder without config.json, so not a "
                                    f"diffusers ControlNetModel folder{hint}")
        return path, str(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"controlnet {str(source)!r}: only .safetensors single files are read (pickle files "
                             "can run code); convert it first")
        return path, str(path)
    raise FileNotFoundError(f"no ControlNet at {str(source)!r}: give a diffusers ControlNetModel folder or an "
                            "original .safetensors file")


def weights_file(path: Path) -> Path | None:
    """The file whose SHA-256 names a ControlNet in recipes (and in serve's model list): a single file
    itself, a folder's first *.safetensors (None: it has none)."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        return files[0] if files else None
    return path


def weights_hash(path: Path) -> str:
    """What recipes record of a ControlNet's weights: the first 10 hex digits of `weights_file`'s SHA-256
    ("unknown" when there is none)."""
    from latentloom.pipelines.control_maps import file_sha256

    found = weights_file(path)
    return file_sha256(found)[:10] if found is not None else "unknown"


def _from_folder(folder: Path, name: str, *, dtype: torch.dtype | None) -> AttachedControlNet:
    from latentloom.unet import ControlNet

    return AttachedControlNet(ControlNet.from_diffusers(folder, dtype=dtype), name, weights_hash(folder))


def folder_controlnets(folder: Path, index: dict[str, Any], *, dtype: torch.dtype | None = None) -> list:
    """The ControlNet(s) a diffusers StableDiffusionControlNet*Pipeline folder saved: controlnet/ (a
    ControlNetModel), or controlnet/, controlnet_1/, ... (a MultiControlNetModel)."""
    entry = index.get("controlnet")
    if not entry or entry[-1] is None:
        return []
    kind = entry[-1]
    if kind not in ("ControlNetModel", "MultiControlNetModel"):
        raise ValueError(f"{folder}/model_index.json: controlnet {kind!r} is not supported (ControlNetModel and "
                         "MultiControlNetModel are)")
    parts = [folder / "controlnet"]
    if kind == "MultiControlNetModel":
        while (folder / f"controlnet_{len(parts)}").is_dir():
            parts.append(folder / f"controlnet_{len(parts)}")
    return [load_controlnet(p, dtype=dtype) for p in parts]


def check_fits(pipe, attached: AttachedControlNet) -> None:
    """A ControlNet must match the UNet's skips and text width, and read control images at the VAE's factor."""
    net, unet = attached.model, pipe.unet
    shapes = unet.skip_shapes(8, 8)
    want = [c for c, _, _ in shapes[:-1]]
    have = [m.out_channels for m in net.controlnet_down_blocks]
    where = f"ControlNet {attached.name}"
    if have != want or net.config.channels[-1] != unet.config.channels[-1]:
        raise ValueError(f"{where} makes residuals of {have} channels; this model's UNet has skips of {want}: "
                         "it was made for another base model")
    if net.config.context_dim != unet.config.context_dim:
        raise ValueError(f"{where} reads text {net.config.context_dim} wide; this model's is "
                         f"{unet.config.context_dim}")
    if net.config.adm_in_channels != unet.config.adm_in_channels:
        raise ValueError(f"{where} reads vector conditioning of width {net.config.adm_in_channels}; this model's "
                         f"UNet reads {unet.config.adm_in_channels}")
    if net.config.in_channels != pipe.latent_channels:
        raise ValueError(f"{where} reads {net.config.in_channels} latent channels; this model has "
                         f"{pipe.latent_channels}")
    if net.config.control_downscale != pipe.vae_scale_factor:
        raise ValueError(f"{where} reads control images {net.config.control_downscale}x the latents; this model's "
                         f"VAE factor is {pipe.vae_scale_factor}")


def attach(pipe, controlnet: Any, *, dtype: torch.dtype | None = None) -> None:
    """Set pipe.controlnets from `controlnet` (one source or a list), each checked against the model."""
    sources = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
    if not sources:
        raise ValueError("controlnet is an empty list; give a ControlNet path, or leave it out")
    attached = [load_controlnet(s, dtype=dtype) for s in sources]
    for a in attached:
        check_fits(pipe, a)
    pipe.controlnets = attached


# ---------------------------------------------------------------------- a call's arguments
def _per_net(value: Any, n: int, name: str, *, low: float | None = None, high: float | None = None) -> list[float]:
    """A number or a list of one number per ControlNet -> n floats."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values ({list(value)!r}) for {n} ControlNet(s); give one "
                         "number, or one per ControlNet")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or v != v:
            raise TypeError(f"{name} must be numbers, got {v!r}")
        if (low is not None and v < low) or (high is not None and v > high):
            raise ValueError(f"{name} must be in [{low}, {high}], got {v!r}")
        out.append(float(v))
    return out


def _read_images(image: Any, n_prompts: int, k: int, n_nets: int) -> tuple[torch.Tensor, list[dict]]:
    """One ControlNet's control image(s): one for every prompt or one per prompt -> (n, 3, H, W) in [0, 1]
    and, per image, what the recipe records (absolute path and SHA-256 of a file; SHA-256 of the pixels)."""
    from PIL import Image

    from latentloom.pipelines.control_maps import file_sha256, load_control_image
    from latentloom.pipelines.image_input import images_to_tensor, per_prompt_images

    name = "control_image" if n_nets == 1 else f"control_image[{k}]"
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    tensors, sources = [], []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            path = Path(item).resolve()
            tensors.append(images_to_tensor(load_control_image(path), name=name))
            sources.append({"image": str(path), "image_sha256": file_sha256(path)})
            continue
        # PIL maps as load_control_image reads them (RGB, transparent = black); arrays and tensors as
        # image_input reads them (in [0, 1] or 0-255)
        pixels = images_to_tensor(load_control_image(item) if isinstance(item, Image.Image) else item, name=name)
        tensors.append(pixels)
        for p in pixels:
            array = (p.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            sources.append({"image": None, "image_sha256": hashlib.sha256(array.tobytes()).hexdigest()})
    sizes = {tuple(t.shape[2:]) for t in tensors}
    if len(sizes) > 1:
        raise ValueError(f"the images in {name} have different sizes {sorted(sizes)}; give them one size")
    pixels = per_prompt_images(torch.cat(tensors), n_prompts, name=name)
    return pixels, sources


@dataclass
class Control:
    """A call's checked control arguments, and the residuals of each of its UNet calls (`__call__`)."""

    nets: list  # AttachedControlNet, in order
    images: list[torch.Tensor]  # per net (n, 3, H, W) float32 in [0, 1], n = 1 or one per prompt
    sources: list[list[dict]]  # per net, per image: recorded path and hash
    scales: list[float]
    starts: list[float]
    ends: list[float]
    guess_mode: bool
    batch: int = 0  # images the call makes (set by `bind`)
    steps: int = 1  # sampler steps of the run (set by `start`)
    calls_per_step: int = 1
    _done: int | None = None
    _since: int = 0
    _ready: list[torch.Tensor] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the control images."""
        return int(self.images[0].shape[2]), int(self.images[0].shape[3])

    def bind(self, call, *, height: int, width: int, device: torch.device) -> None:
        """Check the images against the output size and lay them out for the call's batch."""
        from latentloom.pipelines.image_input import expand_to_batch

        for k, img in enumerate(self.images):
            h, w = int(img.shape[2]), int(img.shape[3])
            if (h, w) != (height, width):
                name = "control_image" if len(self.images) == 1 else f"control_image[{k}]"
                raise ValueError(f"{name} is {w}x{h} but the output is {width}x{height}; give a control image of "
                                 "the output's size (latentloom does not resize control images)")
        self.batch = call.batch
        self._ready = [expand_to_batch(img, call.batch).to(device=device, dtype=a.model.dtype)
                       for img, a in zip(self.images, self.nets)]  # (B, 3, H, W), prompt-major

    def start(self, steps: int, calls_per_step: int) -> None:
        """A sampler run of `steps` steps begins (control_guidance_start / end are fractions of its UNet calls)."""
        self.steps, self.calls_per_step, self._done, self._since = max(1, steps), calls_per_step, None, 0

    @property
    def calls(self) -> int:
        """UNet calls of the run, as diffusers counts its timesteps: Heun's N steps make 2N - 1 (the last
        step, to sigma 0, is one Euler call)."""
        return self.steps * self.calls_per_step - (self.calls_per_step - 1)

    def step_done(self, i: int) -> None:
        """Step i made its first UNet call (the sampler's per-step callback ran)."""
        self._done, self._since = int(i), 0

    def _call_index(self) -> int:
        # step i's first call is call i * calls_per_step; this call follows the one the callback reported
        if self._done is None:
            return 0
        index = self._done * self.calls_per_step + 1 + min(self._since, self.calls_per_step - 1)
        self._since += 1
        return index

    def keep(self, index: int) -> list[float]:
        """diffusers' controlnet_keep for UNet call `index` of the run, per ControlNet."""
        n = self.calls
        return [1.0 - float(index / n < s or (index + 1) / n > e) for s, e in zip(self.starts, self.ends)]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]):
        """The summed residuals (down list, mid) for this UNet call, or None when no ControlNet acts."""
        scales = [s * k for s, k in zip(self.scales, self.keep(self._call_index()))]
        if not any(scales):
            return None
        B = x.shape[0]
        halves = B == 2 * self.batch  # classifier-free guidance: [uncond, cond] in one batch
        net_cond = {k: v for k, v in cond.items() if k in CONTROL_KEYS}
        if self.guess_mode and halves:  # the conditional half alone
            x = x[self.batch:]
            t = t[self.batch:] if torch.is_tensor(t) and t.ndim == 1 and t.shape[0] == B else t
            net_cond = {k: v[self.batch:] for k, v in net_cond.items()}
        down = mid = None
        for a, image, scale in zip(self.nets, self._ready, scales):
            if scale == 0:  # diffusers runs it and adds zeros: the same sum
                continue
            if halves and not self.guess_mode:
                image = torch.cat([image, image])
            # the ControlNet reads the latents only: inpainting's concat channels come after them
            d, m = a.model(x[:, :a.model.config.in_channels], t, net_cond["context"], image,
                           conditioning_scale=scale, guess_mode=self.guess_mode,
                           context_mask=net_cond.get("context_mask"), y=net_cond.get("y"))
            down, mid = (d, m) if down is None else ([p + q for p, q in zip(down, d)], mid + m)
        if self.guess_mode and halves:  # zeros for the unconditional half
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return down, mid

    def recipe(self, prompt_index: int) -> dict[str, Any]:
        """What the recipe of an image made for prompt `prompt_index` records."""
        entries = []
        for a, sources, s, lo, hi in zip(self.nets, self.sources, self.scales, self.starts, self.ends):
            source = sources[prompt_index if len(sources) > 1 else 0]
            entries.append({"model": a.name, "model_hash": a.weights_hash, **source, "scale": s, "start": lo,
                            "end": hi})
        return {"controlnets": entries, "guess_mode": self.guess_mode}


def parse_control(pipe, n_prompts: int, *, control_image: Any, scale: Any, start: Any, end: Any,
                  guess_mode: Any) -> Control | None:
    """Check a call's control arguments (None when the pipeline has no ControlNet and none were given)."""
    from latentloom.pipelines.arguments import check_bool

    nets = list(getattr(pipe, "controlnets", None) or [])
    guess_mode = check_bool(guess_mode, "guess_mode")
    if not nets:
        if control_image is not None or guess_mode:
            raise ValueError("control_image / guess_mode given, but this pipeline has no ControlNet; load one with "
                             "load_pipeline(model, controlnet=PATH)")
        return None
    n = len(nets)
    if control_image is None:
        raise ValueError(f"this pipeline has {n} ControlNet(s): pass control_image= (one per ControlNet, in order)")
    if n == 1:
        per_net = [control_image]
    elif not isinstance(control_image, (list, tuple)) or len(control_image) != n:
        got = len(control_image) if isinstance(control_image, (list, tuple)) else 1
        raise ValueError(f"got {got} control image(s) for {n} ControlNets; pass a list of {n}, one per ControlNet "
                         "(each an image, or a list of one per prompt)")
    else:
        per_net = list(control_image)
    scales = _per_net(scale, n, "controlnet_conditioning_scale")
    if isinstance(start, (list, tuple)) != isinstance(end, (list, tuple)):  # diffusers repeats the lone one
        start = [start] * len(end) if isinstance(end, (list, tuple)) else start
        end = [end] * len(start) if isinstance(start, (list, tuple)) else end
    starts = _per_net(start, n, "control_guidance_start", low=0.0, high=1.0)
    ends = _per_net(end, n, "control_guidance_end", low=0.0, high=1.0)
    for k, (s, e) in enumerate(zip(starts, ends)):
        if s >= e:
            which = "" if n == 1 else f" (ControlNet {k})"
            raise ValueError(f"control_guidance_start {s} must be below control_guidance_end {e}{which}")
    images, sources = [], []
    for k, item in enumerate(per_net):
        pixels, recorded = _read_images(item, n_prompts, k, n)
        images.append(pixels)
        sources.append(recorded)
    # a pooled ControlNet (1.1 shuffle) always runs in guess mode, as diffusers decides from the first
    guess_mode = guess_mode or bool(nets[0].model.config.global_pool_conditions)
    return Control(nets, images, sources, scales, starts, ends, guess_mode)
