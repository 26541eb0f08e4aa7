"""The denoising run every pipeline shares: the UNet as the sampler's model (with its float32 fallback),
the prompts' conditioning, the (CFG-)guided denoiser on the call's resolved schedule, the sigma ladder,
and the solver run with a progress bar."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from latentloom.pipelines.arguments import CallArgs, check_callback
from latentloom.samplers import calls_per_step, get_sampler
from latentloom.samplers.denoiser import Denoiser
from latentloom.samplers.guidance import CFGDenoiser
from latentloom.samplers.schedules import ScheduleConfig
from latentloom.unet.step_cache import DeepCache

class UNetCall:
    """The UNet as the Denoiser's model: casts inputs to the UNet's dtype and the output back,
    so the sampler's arithmetic stays in the latents' dtype (float32).

    A float16 / bfloat16 forward that overflows (inf or NaN in the prediction) would turn the
    latents, and so the image, black. Then this step and the rest of the call run on a float32
    copy of the UNet, with a warning; one made for one call and dropped with it.
    """

    def __init__(self, unet, *, cache=None, token_merge_ratio: float = 0.0, control=None) -> None:
        self.unet = unet
        self.fp32_unet = None
        self.cache = cache  # step caching's `DeepCache`, or None
        self.token_merge_ratio = token_merge_ratio  # 0: exact (the UNet is not even told)
        self.control = control  # the call's `control.Control` (ControlNets), or None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        if self.control is not None:  # once per call: a float32 retry reuses them
            residuals = self.control(x, t, cond)
            if residuals is not None:
                cond["control"] = residuals
        if self.fp32_unet is None:
            out = self._forward(self.unet, x, t, cond)
            if torch.isfinite(out).all():
                return out
            dtype = next(self.unet.parameters()).dtype
            if dtype == torch.float32:
                raise FloatingPointError("the UNet predicted non-finite values in float32 (broken weights or "
                                         "inputs); no image is made")
            warnings.warn(f"the UNet overflowed in {dtype} (non-finite prediction); running this call's "
                          "remaining steps in float32", RuntimeWarning, stacklevel=2)
            self.fp32_unet = copy.deepcopy(self.unet).float()
            if self.cache is not None:  # the stored feature is low-precision (maybe not finite): remake it
                self.cache.forget(redo=True)
        out = self._forward(self.fp32_unet, x, t, cond)
        if not torch.isfinite(out).all():
            raise FloatingPointError("the UNet predicted non-finite values even in float32; no image is made")
        return out

    def _forward(self, unet, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        dtype = next(unet.parameters()).dtype
        cond = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in cond.items()}
        if self.cache is not None:
            cond["cache"] = self.cache
        if self.token_merge_ratio > 0:
            cond["token_merge_ratio"] = self.token_merge_ratio
        return unet(x.to(dtype), t, **cond).to(x.dtype)


def text_conditions(pipe, prompts: list[str], negatives: list[str] | None, *, guided: bool,
                    prompts_2: list[str] | None = None, negatives_2: list[str] | None = None,
                    micro=None) -> tuple[dict, dict | None]:
    """Encode prompts (and negatives, when guidance needs them) into UNet keyword arguments; for SDXL
    also y, the pooled text with each branch's micro-conditioning numbers."""
    encoder = pipe.text_encoder
    # only SDXL's encoder pair takes second prompts
    second = {"prompts_2": prompts_2} if micro is not None else {}
    if guided:
        negative_second = {"negative_prompts_2": negatives_2} if micro is not None else {}
        cond_emb, uncond_emb = encoder.encode_pair(prompts, negatives, **second, **negative_second)
    else:
        cond_emb, uncond_emb = encoder.encode(prompts, **second), None
    if hasattr(encoder, "release_weights") and pipe.releases_text_encoders():
        encoder.release_weights()  # until a prompt not in the cache needs them again

    def as_kwargs(emb, *, negative: bool) -> dict:
        kwargs = {"context": emb.hidden.to(pipe.device)}
        if pipe.use_context_mask:
            kwargs["context_mask"] = emb.mask.to(pipe.device)
        if micro is not None:
            pooled = emb.pooled.to(pipe.device)
            numbers = torch.tensor([micro.numbers(negative=negative)], dtype=pooled.dtype, device=pipe.device)
            kwargs["y"] = pipe.unet.vector_conditioning(pooled, numbers.expand(pooled.shape[0], -1))
        return kwargs

    return (as_kwargs(cond_emb, negative=False),
            as_kwargs(uncond_emb, negative=True) if uncond_emb is not None else None)


def repeat_cond(cond: dict, repeats: int) -> dict:
    """Repeat each prompt's conditioning `repeats` times (num_images_per_prompt), prompt-major."""
    return {k: v.repeat_interleave(repeats, dim=0) for k, v in cond.items()}


def build_denoiser(pipe, *, cond: dict, uncond: dict | None, guidance_scale: float, guidance_rescale: float,
                   schedule: ScheduleConfig, extra: dict | None = None, cache=None,
                   token_merge_ratio: float = 0.0,
                   control=None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The guided denoiser (x, sigma) -> x0 for this call, on the call's resolved `schedule`.
    `extra` holds conditioning shared by both halves (concat channels, class labels); `cache`, a
    `DeepCache` the UNet calls share (step caching), or None; `token_merge_ratio`, the UNet's
    token merging (0: exact); `control`, the call's ControlNets (`control.Control`), or None."""
    model = UNetCall(pipe.unet, cache=cache, token_merge_ratio=token_merge_ratio, control=control)
    denoiser = Denoiser(model, pipe.discrete_schedule(schedule), prediction_type=schedule.prediction_type)
    extra = extra or {}
    if uncond is None:
        return lambda x, sigma: denoiser(x, sigma, **cond, **extra)
    return CFGDenoiser(denoiser, cond={**cond, **extra}, uncond={**uncond, **extra},
                       scale=guidance_scale, rescale=guidance_rescale)


def guided_denoiser(pipe, call: CallArgs, *, extra: dict | None = None):
    """Encode the prompts and build the (CFG-)guided denoiser; `extra` as in `build_denoiser`. With
    call.cache_interval > 1 the denoiser's UNet calls share a new `DeepCache`, kept as call.step_cache
    for `run_sampler` to tell it where each sampler step ends."""
    cond, uncond = text_conditions(pipe, call.prompts, call.negatives, guided=call.guidance_mode == "cfg",
                                   prompts_2=call.prompts_2, negatives_2=call.negatives_2, micro=call.micro)
    cond = repeat_cond(cond, call.per_prompt)
    uncond = repeat_cond(uncond, call.per_prompt) if uncond is not None else None
    if call.guidance_embedded:  # w = scale - 1, diffusers' LCM convention
        cond["guidance"] = torch.full((call.batch,), call.scale - 1.0, device=pipe.device)
    call.step_cache = None
    if call.cache_interval > 1:
        call.step_cache = DeepCache(call.cache_interval, calls_per_step=calls_per_step(call.sampler))
    return build_denoiser(pipe, cond=cond, uncond=uncond, guidance_scale=call.scale,
                          guidance_rescale=call.rescale, schedule=call.schedule, extra=extra,
                          cache=call.step_cache, token_merge_ratio=call.token_merge_ratio, control=call.control)


def call_sigmas(pipe, call: CallArgs) -> torch.Tensor:
    """The full sigma ladder (N + 1,) for this call's sampler, step count and resolved schedule."""
    from latentloom.samplers.schedules import custom_sigmas, make_sigmas

    cfg = call.schedule
    if call.timesteps is not None or call.sigmas is not None:
        return custom_sigmas(pipe.discrete_schedule(cfg), sampler=call.sampler, timesteps=call.timesteps,
                             sigmas=call.sigmas, set_alpha_to_one=cfg.set_alpha_to_one)
    return make_sigmas(pipe.discrete_schedule(cfg), call.steps, sampler=call.sampler,
                       timestep_spacing=cfg.timestep_spacing, steps_offset=cfg.steps_offset, karras=call.karras,
                       set_alpha_to_one=cfg.set_alpha_to_one, original_inference_steps=cfg.original_inference_steps)


def run_sampler(pipe, call: CallArgs, denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                callback: Callable | None, progress: bool, options: dict[str, Any] | None = None) -> torch.Tensor:
    """Run the call's sampler on the pipeline's device with a tqdm bar over its steps (off with
    progress=False), with the options its resolved schedule asks for (clip_sample), what the
    consistency samplers need beside the sigmas (LCM the integer timestep of each step and its time
    scale, TCD the level each step jumps to), and the caller's `options`."""
    check_callback(callback)
    schedule = call.schedule
    extra = {"clip_denoised": schedule.clip_sample_range} if schedule.clip_sample else {}
    if call.sampler in ("lcm", "tcd"):
        from latentloom.samplers.consistency import consistency_options

        extra.update(consistency_options(call.sampler, pipe.discrete_schedule(schedule), sigmas,
                                         timestep_scaling=schedule.timestep_scaling, eta=call.eta))
    options = {**extra, **(options or {})}
    sample = get_sampler(call.sampler)
    bar = tqdm(total=len(sigmas) - 1, desc=f"latentloom {call.sampler}", disable=not progress, leave=False)

    cache, control = call.step_cache, call.control
    if control is not None:  # control_guidance_start / end are fractions of the steps this run walks
        control.start(len(sigmas) - 1, calls_per_step(call.sampler))

    def on_step(i, sigma, x_i, denoised):
        if cache is not None:  # step i made its first UNet call: the cache counts sampler steps
            cache.step_done(i)
        if control is not None:
            control.step_done(i)
        bar.update(1)
        if callback is not None:
            callback(i, sigma, x_i, denoised)

    try:
        return sample(denoiser, x, sigmas.to(pipe.device), generator=call.generator, callback=on_step, **options)
    finally:
        bar.close()
