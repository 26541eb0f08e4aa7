"""Discrete noise schedules (DDPM betas) and the sigma sequences each sampler walks.

latentloom samples in the k-diffusion ("VE") form x = x0 + sigma * eps. A discrete
VP schedule with cumulative alphas a_t maps to it through sigma_t = sqrt((1 - a_t) / a_t).
`make_sigmas` reproduces, number for number, the sigma and timestep sequence that the
diffusers scheduler matching a sampler name builds for the same config, and records the
timestep diffusers would hand the model for every sigma so that `Denoiser` passes the
very same `t` (integer timesteps from the spacing, or the log-sigma-interpolated
fractional / rounded `t` for Karras sigmas).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Samplers whose diffusers counterpart lives in VP space with init_noise_sigma == 1.
VP_SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lcm", "tcd")
# Samplers whose diffusers counterpart (Euler family) lives in VE space.
VE_SAMPLERS = ("euler", "euler_a", "heun")
SAMPLER_NAMES = ("ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lcm", "tcd")
# Samplers of consistency-distilled models: their timesteps come from the teacher's grid
CONSISTENCY_SAMPLERS = ("lcm", "tcd")
# alphas_cumprod[-1] after a zero-terminal-SNR rescale: sigma would be infinite at a_T == 0,
# which the VE form cannot hold; diffusers' Euler / DPM / UniPC schedulers use this value.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def make_betas(
    kind: str,
    *,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> torch.Tensor:
    """Betas (T,) float32 for a DDPM schedule: linear, scaled_linear (SD) or squaredcos_cap_v2 (Nichol & Dhariwal 2021)."""
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if kind == "scaled_linear":
        # linear in sqrt(beta), as the original Stable Diffusion training code
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        T = num_train_timesteps
        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unknown beta schedule {kind!r}; expected one of {BETA_SCHEDULES}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, "Common Diffusion Noise Schedules...", Alg. 1)."""
    sqrt_ac = torch.cumprod(1.0 - betas, dim=0).sqrt()  # (T,)
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    # shift so the last is 0, then scale so the first keeps its value
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


# diffusers config keys latentloom does not model, with the values that leave the math unchanged.
_NEUTRAL_SETTINGS: dict[str, tuple] = {
    "thresholding": (False,), "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None), "use_lu_lambdas": (False, None), "use_flow_sigmas": (False, None),
    "timestep_type": ("discrete",), "interpolation_type": ("linear", None), "final_sigmas_type": ("zero",),
    "variance_type": (None, "fixed_small"), "euler_at_final": (False,), "use_dynamic_shifting": (False,),
    "sigma_min": (None,), "sigma_max": (None,), "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
    "solver_order": (2,), "solver_type": ("midpoint", "bh2"), "lower_order_final": (True,),
    "predict_x0": (True,), "lambda_min_clipped": (float("-inf"),),
}


# What a recipe records of the schedule a call ran with (`ScheduleConfig.settings`); trained
# betas come from the model, the Karras switch is the call's own `karras_sigmas`.
RECIPE_KEYS = ("prediction_type", "beta_schedule", "beta_start", "beta_end", "num_train_timesteps",
               "timestep_spacing", "steps_offset", "rescale_betas_zero_snr", "set_alpha_to_one", "clip_sample",
               "clip_sample_range")


@dataclass
class ScheduleConfig:
    """The scheduler settings of a model (what a diffusers `scheduler_config.json` says).

    `stated` holds the keys its source stated (None: all, as for a config built in code).
    Sampling never uses a left-out key's field value: `for_sampler` fills it with the default
    of the diffusers class behind the sampler, as diffusers' `from_config` does. The field
    defaults below are what latentloom filled in before it followed that rule; `legacy_settings`
    keeps them so that older recipes replay as they were made.
    """

    prediction_type: str = "epsilon"
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    rescale_betas_zero_snr: bool = False
    use_karras_sigmas: bool = False
    # DDIM only: False makes its last step land on sigma(t=0) instead of 0 (SD configs say False)
    set_alpha_to_one: bool = True
    # DDPM / DDIM / Heun: clamp the x0 estimate to [-clip_sample_range, clip_sample_range]
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    # LCM / TCD: the teacher's grid (original_inference_steps timesteps) their steps are taken from,
    # and LCM's boundary-condition time scale
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    trained_betas: list[float] | None = field(default=None, repr=False)
    stated: frozenset[str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} not in {PREDICTION_TYPES}")
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule {self.beta_schedule!r} not in {BETA_SCHEDULES}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} not in {TIMESTEP_SPACINGS}")
        if not (isinstance(self.clip_sample_range, (int, float)) and self.clip_sample_range > 0):
            raise ValueError(f"clip_sample_range must be a number > 0, got {self.clip_sample_range!r}")
        if self.stated is not None:
            self.stated = frozenset(self.stated)

    @classmethod
    def from_diffusers_config(cls, d: dict[str, Any]) -> "ScheduleConfig":
        """Build from a diffusers scheduler config dict, remembering which keys it states. Keys
        this class does not model are ignored; a warning names those whose value would change
        the sampling math. A live scheduler's `.config` lists the keys its class filled in under
        `_use_default_values`: those count as left out, as they do for diffusers' `from_config`."""
        names = {f.name for f in fields(cls)} - {"stated"}
        kwargs = {k: v for k, v in d.items() if k in names}
        defaulted = set(d.get("_use_default_values") or ())
        ignored = [f"{k}={d[k]!r}" for k, ok in _NEUTRAL_SETTINGS.items() if k in d and d[k] not in ok]
        if ignored:
            warnings.warn(
                f"scheduler config settings not supported by latentloom samplers are ignored: {', '.join(ignored)}",
                stacklevel=2,
            )
        return cls(**kwargs, stated=frozenset(kwargs) - defaulted)

    def is_stated(self, key: str) -> bool:
        return self.stated is None or key in self.stated

    def with_settings(self, settings: dict[str, Any]) -> "ScheduleConfig":
        """A copy with `settings` (scheduler_config.json keys, e.g. from a recipe) stated over these."""
        names = {f.name for f in fields(self)} - {"stated"}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ValueError(f"unknown scheduler settings {unknown}; expected keys among {sorted(names)}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        stated = None if self.stated is None else self.stated | set(settings)
        return ScheduleConfig(**{**values, **settings, "stated": stated})

    def for_sampler(self, sampler: str) -> "ScheduleConfig":
        """The settings diffusers' scheduler for `sampler` runs with when swapped in by
        `Cls.from_config(this config)`: each stated key the class accepts, else that class's
        default; keys the class does not accept are off (see `scheduler_defaults`)."""
        from .scheduler_defaults import NOT_ACCEPTED, class_defaults

        defaults = class_defaults(sampler)
        values = {}
        for f in fields(self):
            if f.name == "stated":
                continue
            if f.name not in defaults:
                values[f.name] = NOT_ACCEPTED[f.name]
            elif self.is_stated(f.name):
                values[f.name] = getattr(self, f.name)
            else:
                values[f.name] = defaults[f.name]
        return ScheduleConfig(**values)

    def settings(self) -> dict[str, Any]:
        """The values a recipe records (`RECIPE_KEYS`, and the consistency samplers' grid and time scale
        where they are not their defaults); replayed through `with_settings`."""
        values = {k: getattr(self, k) for k in RECIPE_KEYS}
        for key, default in (("original_inference_steps", 50), ("timestep_scaling", 10.0)):
            if getattr(self, key) != default:
                values[key] = getattr(self, key)
        return values

    def legacy_settings(self) -> dict[str, Any]:
        """What latentloom sampled with before it followed diffusers' rule, for every sampler: a
        left-out key took this class's field default, and clip_sample was not applied."""
        return {**self.settings(), "clip_sample": False}


class DiscreteSchedule:
    """A discrete-time VP schedule seen in sigma space, with the sigma <-> timestep maps.

    `alphas_cumprod` (T,) float32; `sigmas` (T,) ascending in t. `sigma_to_t` first looks up
    sigmas registered by `make_sigmas` (so the model gets exactly diffusers' timestep for
    that sampler) and otherwise interpolates linearly in log sigma (k-diffusion / diffusers).
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float32).clone()
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D tensor with >= 2 entries, got shape {tuple(ac.shape)}")
        if not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1); rescale_zero_terminal_snr schedules must clamp a_T")
        self.alphas_cumprod = ac
        self.sigmas = ((1 - ac) / ac) ** 0.5  # (T,) float32, same arithmetic as diffusers
        self.log_sigmas = np.log(self.sigmas.numpy())  # (T,) float32
        self._t_of_sigma: dict[float, float] = {}

    @classmethod
    def from_betas(cls, betas: torch.Tensor, *, rescale_betas_zero_snr: bool = False) -> "DiscreteSchedule":
        betas = torch.as_tensor(betas, dtype=torch.float32)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        ac = torch.cumprod(1.0 - betas, dim=0)
        if rescale_betas_zero_snr:
            ac[-1] = ZERO_SNR_ALPHA_CUMPROD
        return cls(ac)

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> "DiscreteSchedule":
        if config.trained_betas is not None:
            betas = torch.tensor(config.trained_betas, dtype=torch.float32)
        else:
            betas = make_betas(
                config.beta_schedule, num_train_timesteps=config.num_train_timesteps,
                beta_start=config.beta_start, beta_end=config.beta_end,
            )
        return cls.from_betas(betas, rescale_betas_zero_snr=config.rescale_betas_zero_snr)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def register(self, sigmas: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Remember which model timestep belongs to each sigma (the latest registration wins)."""
        for s, t in zip(sigmas.tolist(), timesteps.tolist()):
            self._t_of_sigma[s] = t

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Timesteps (same shape as sigma, float32) the model expects for these noise levels."""
        flat = sigma.detach().to("cpu", torch.float32).reshape(-1)
        out = []
        for s in flat.tolist():
            t = self._t_of_sigma.get(s)
            out.append(t if t is not None else float(log_sigma_to_t(np.float64(s), self.log_sigmas)))
        return torch.tensor(out, dtype=torch.float32, device=sigma.device).reshape(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at (possibly fractional) timesteps, linear interpolation as diffusers' Euler."""
        t_np = np.asarray(torch.as_tensor(t).detach().cpu().numpy(), dtype=np.float64)
        s = np.interp(t_np, np.arange(self.num_train_timesteps), self.sigmas.numpy())
        return torch.as_tensor(s, dtype=torch.float32)


def log_sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of sigma by linear interpolation of log sigma over the training table."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]  # (T, n)
    # last training index whose log sigma is <= ours, kept one below the end
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, *, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM) eq. 5 noise levels, n of them, descending, float64."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _spaced_timesteps(spacing: str, n: int, T: int, steps_offset: int, *, kind: str) -> np.ndarray:
    """The descending timesteps of each diffusers scheduler family for `n` steps.

    kind "ddim": DDIM/DDPM (integers); "euler": Euler/Heun (float32, linspace fractional);
    "multistep": DPM-Solver/UniPC, which space n + 1 points and drop the last.
    """
    if spacing == "linspace":
        if kind == "euler":
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        if kind == "ddim":
            return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        if kind == "multistep":
            ratio = T // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        else:
            ratio = T // n
            ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
        return ts + steps_offset
    if spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        return ts
    raise ValueError(f"timestep_spacing {spacing!r} not in {TIMESTEP_SPACINGS}")


def _check_range(ts: np.ndarray, T: int, steps_offset: int) -> None:
    outside = np.asarray(ts)[(np.asarray(ts) > T - 1) | (np.asarray(ts) < 0)]
    if outside.size:
        shown = ", ".join(str(v) for v in outside[:5].tolist()) + (" ..." if outside.size > 5 else "")
        raise ValueError(
            f"{outside.size} of {np.asarray(ts).size} timesteps fall outside [0, {T - 1}] ({shown}): lower "
            f"steps_offset ({steps_offset}) or num_inference_steps"
        )


def lcm_timesteps(T: int, n: int, original_inference_steps: int, *, strength: float = 1.0) -> np.ndarray:
    """LCM's and TCD's n descending timesteps: evenly spaced indices into the teacher's grid of
    `original_inference_steps` timesteps k - 1, 2k - 1, ..., T - 1 (k = T // original), as
    diffusers' LCMScheduler / TCDScheduler pick them; `strength` < 1 keeps the grid's lower
    int(original x strength) points (diffusers' `set_timesteps(strength=)`, its LCM img2img)."""
    original = int(original_inference_steps)
    if not 1 <= original <= T:
        raise ValueError(f"original_inference_steps must be in [1, {T}], got {original_inference_steps!r}")
    points = int(original * strength)
    if n > points:
        raise ValueError(f"num_inference_steps {n} cannot exceed the {points} points of the teacher's grid "
                         f"(original_inference_steps {original} x strength {strength})")
    k = T // original
    grid = (np.arange(1, points + 1) * k - 1)[::-1]
    return grid[np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)].copy()


def tcd_sigmas_s(schedule: DiscreteSchedule, timesteps: torch.Tensor, eta: float) -> torch.Tensor:
    """(N,) the level each TCD step jumps to: sigma of floor((1 - eta) t_next), t_next = 0 after the last."""
    ts = torch.as_tensor(timesteps).to(torch.float64)
    following = torch.cat([ts[1:], ts.new_zeros(1)])
    s = torch.floor((1 - eta) * following).long()
    return schedule.sigmas[s].float()


# samplers whose diffusers scheduler rounds the timestep of a given sigma (multistep ones), or steps on
# integer timesteps; the Euler family keeps the fractional one
_ROUNDED_T = ("dpmpp_2m", "dpmpp_2m_sde", "unipc", "ddim", "ddpm", "lcm", "tcd")


def custom_sigmas(
    schedule: DiscreteSchedule,
    *,
    sampler: str,
    timesteps: list[float] | None = None,
    sigmas: list[float] | None = None,
    set_alpha_to_one: bool = True,
) -> torch.Tensor:
    """Sigmas (N + 1,) for a caller's own descending `timesteps` (diffusers' `timesteps=`: N steps, each
    t's noise level interpolated in the training table, then 0, or timestep 0's level for "ddim"
    with set_alpha_to_one=False and for "tcd", as `make_sigmas`) or `sigmas` (diffusers' Euler
    `sigmas=`: the whole ladder, its last entry where sampling ends, often 0; the steps' timesteps
    by log-sigma interpolation). Registers each sigma's timestep."""
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLER_NAMES}")
    if (timesteps is None) == (sigmas is None):
        raise ValueError("give exactly one of timesteps and sigmas")
    name = "timesteps" if timesteps is not None else "sigmas"
    values = np.asarray(timesteps if timesteps is not None else sigmas, dtype=np.float64)
    if values.ndim != 1 or values.size < 1 or not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be a non-empty list of numbers, got {timesteps if sigmas is None else sigmas!r}")
    if np.any(np.diff(values) >= 0):
        raise ValueError(f"{name} must be strictly descending, got {values.tolist()}")
    T = schedule.num_train_timesteps
    train = schedule.sigmas.numpy().astype(np.float64)
    if timesteps is not None:
        if values[0] > T - 1 or values[-1] < 0:
            raise ValueError(f"timesteps must lie in [0, {T - 1}], got {values.tolist()}")
        ts = values
        sig = np.interp(ts, np.arange(0, T), train)
        last = float(train[0]) if sampler == "tcd" or (sampler == "ddim" and not set_alpha_to_one) else 0.0
    else:
        if values.size < 2 or values[-1] < 0:
            raise ValueError(f"sigmas is the whole ladder, from the first step's noise level down to where sampling "
                             f"ends (>= 0, usually 0): at least 2 entries, got {values.tolist()}")
        sig, last = values[:-1].astype(np.float32), float(np.float32(values[-1]))
        ts = np.array([log_sigma_to_t(v, schedule.log_sigmas) for v in sig], dtype=np.float64)
        if sampler in _ROUNDED_T:
            ts = ts.round()
    out = torch.from_numpy(np.concatenate([sig, [last]]).astype(np.float32))
    schedule.register(out[:-1], torch.from_numpy(ts.astype(np.float32)))
    return out


def make_sigmas(
    schedule: DiscreteSchedule,
    num_inference_steps: int,
    *,
    sampler: str,
    timestep_spacing: str = "leading",
    steps_offset: int = 1,
    karras: bool = False,
    set_alpha_to_one: bool = True,
    original_inference_steps: int = 50,
) -> torch.Tensor:
    """Sigmas (N + 1,) float32, descending, for `sampler`: exactly the noise levels (and, recorded
    on `schedule`, the model timesteps) of the diffusers scheduler for that sampler and config.

    The last entry is 0, except for "ddim" with set_alpha_to_one=False, whose last step lands
    on sigma(t=0) as diffusers' DDIMScheduler does (see `noise.final_latents`), and "tcd", which
    ends at sigma(t=0) too. "lcm" / "tcd" take their steps from `lcm_timesteps`.
    """
    sigmas, timesteps = sigmas_and_timesteps(
        schedule, num_inference_steps, sampler=sampler, timestep_spacing=timestep_spacing,
        steps_offset=steps_offset, karras=karras, set_alpha_to_one=set_alpha_to_one,
        original_inference_steps=original_inference_steps,
    )
    return sigmas


def sigmas_and_timesteps(
    schedule: DiscreteSchedule,
    num_inference_steps: int,
    *,
    sampler: str,
    timestep_spacing: str = "leading",
    steps_offset: int = 1,
    karras: bool = False,
    set_alpha_to_one: bool = True,
    original_inference_steps: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`make_sigmas` plus the model timesteps (N,) float32 that go with sigmas[:-1]."""
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLER_NAMES}")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing {timestep_spacing!r} not in {TIMESTEP_SPACINGS}")
    T = schedule.num_train_timesteps
    n = int(num_inference_steps)
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
    train = schedule.sigmas.numpy()  # (T,) float32
    grid = np.arange(0, T)
    last = 0.0

    if sampler in CONSISTENCY_SAMPLERS:
        if karras:
            raise ValueError(f"karras_sigmas does not apply to {sampler!r}: its steps come from the teacher's grid")
        ts = lcm_timesteps(T, n, original_inference_steps)
        sig = train[ts].astype(np.float64)
        if sampler == "tcd":
            last = float(train[0])  # its last step lands on timestep 0's level
    elif sampler in ("dpmpp_2m", "dpmpp_2m_sde", "unipc"):
        ts = _spaced_timesteps(timestep_spacing, n, T, steps_offset, kind="multistep")
        if karras:
            # these diffusers schedulers span the whole training range and round t
            sig = karras_sigmas(float(train[0]), float(train[-1]), n)
            ts = np.array([log_sigma_to_t(s, schedule.log_sigmas) for s in sig]).round()
        else:
            sig = np.interp(ts, grid, train)
    elif sampler in ("euler", "euler_a", "heun") or karras:
        # Euler family: interpolate at the (possibly fractional) spaced timesteps; Karras spans
        # those sigmas and takes un-rounded log-interpolated t. ddim/ddpm/euler_a with karras=True
        # follow the same rule (diffusers has no Karras option for them).
        ts = _spaced_timesteps(timestep_spacing, n, T, steps_offset, kind="euler")
        sig = np.interp(ts, grid, train)
        if karras:
            sig = karras_sigmas(float(sig[-1]), float(sig[0]), n)
            ts = np.array([log_sigma_to_t(s, schedule.log_sigmas) for s in sig])
    else:  # ddim, ddpm: integer timesteps
        ts = _spaced_timesteps(timestep_spacing, n, T, steps_offset, kind="ddim")
        _check_range(ts, T, steps_offset)
        sig = train[ts].astype(np.float64)
        if sampler == "ddim":
            ratio = T // n
            nxt = np.concatenate([ts[1:], [-1]])
            prev = ts - ratio
            if np.any(np.where(prev >= 0, prev, -1) != nxt):
                warnings.warn(
                    f"diffusers' DDIMScheduler steps from t to t - {ratio} rather than to the next timestep of "
                    f"{timestep_spacing!r} spacing with {n} steps; latentloom follows the schedule, so results "
                    "differ from diffusers here (use leading spacing, or trailing with a divisor of "
                    f"{T} steps, for parity)",
                    stacklevel=2,
                )
            if not set_alpha_to_one:
                last = float(train[0])
    _check_range(ts, T, steps_offset)
    sigmas = torch.from_numpy(np.concatenate([sig, [last]]).astype(np.float32))
    timesteps = torch.from_numpy(np.asarray(ts).astype(np.float32))
    schedule.register(sigmas[:-1], timesteps)
    return sigmas, timesteps
