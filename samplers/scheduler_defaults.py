"""What each diffusers scheduler class assumes for the keys a scheduler_config.json leaves out.

diffusers swaps samplers with `Cls.from_config(pipe.scheduler.config)`. A key the file states
is carried over to every class that accepts it; a key the file leaves out (diffusers tracks
those as `_use_default_values`) takes the default of the class swapped in, whatever the
file's own class would have used. So Stable Diffusion 1.5's config, which has no
`timestep_spacing`, samples with "linspace" under Euler or DPM++ but "leading" under DDIM.
`ScheduleConfig.for_sampler` applies this rule from the table below, so the runtime never
imports diffusers; tests/test_scheduler_defaults.py compares the table with the installed
diffusers classes, so an upgrade that changes a default fails loudly.
"""
from __future__ import annotations

from typing import Any

# The diffusers class behind each latentloom sampler name.
DIFFUSERS_CLASS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
}

_COMMON = {"num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 0, "trained_betas": None}
_LINEAR = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
_CLIP_ON = {"clip_sample": True, "clip_sample_range": 1.0}
_CONSISTENCY = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
                "clip_sample_range": 1.0, "set_alpha_to_one": True, "timestep_spacing": "leading",
                "rescale_betas_zero_snr": False, "original_inference_steps": 50, "timestep_scaling": 10.0}

# diffusers 0.42.1 `__init__` defaults, for the keys `ScheduleConfig` models that each class accepts.
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDPMScheduler": {**_COMMON, **_LINEAR, **_CLIP_ON, "timestep_spacing": "leading",
                      "rescale_betas_zero_snr": False},
    "DDIMScheduler": {**_COMMON, **_LINEAR, **_CLIP_ON, "timestep_spacing": "leading",
                      "rescale_betas_zero_snr": False, "set_alpha_to_one": True},
    "EulerDiscreteScheduler": {**_COMMON, **_LINEAR, "timestep_spacing": "linspace",
                               "rescale_betas_zero_snr": False, "use_karras_sigmas": False},
    "EulerAncestralDiscreteScheduler": {**_COMMON, **_LINEAR, "timestep_spacing": "linspace",
                                        "rescale_betas_zero_snr": False},
    # Heun alone defaults to SD's betas (still a linear schedule), and has no zero-SNR rescale
    "HeunDiscreteScheduler": {**_COMMON, "beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012,
                              "clip_sample": False, "clip_sample_range": 1.0, "timestep_spacing": "linspace",
                              "use_karras_sigmas": False},
    "DPMSolverMultistepScheduler": {**_COMMON, **_LINEAR, "timestep_spacing": "linspace",
                                    "rescale_betas_zero_snr": False, "use_karras_sigmas": False},
    "UniPCMultistepScheduler": {**_COMMON, **_LINEAR, "timestep_spacing": "linspace",
                                "rescale_betas_zero_snr": False, "use_karras_sigmas": False},
    # the consistency schedulers default to SD's betas, and step on the teacher's grid
    "LCMScheduler": {**_COMMON, **_CONSISTENCY},
    "TCDScheduler": {**_COMMON, **_CONSISTENCY},
}

# A class that does not accept a key runs as if it were this (the setting is simply not there).
NOT_ACCEPTED = {"use_karras_sigmas": False, "clip_sample": False, "clip_sample_range": 1.0,
                "rescale_betas_zero_snr": False, "set_alpha_to_one": True, "original_inference_steps": 50,
                "timestep_scaling": 10.0}


def class_defaults(sampler: str) -> dict[str, Any]:
    """The defaults of the diffusers class behind `sampler`, for the keys it accepts."""
    try:
        return CLASS_DEFAULTS[DIFFUSERS_CLASS[sampler]]
    except KeyError:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(DIFFUSERS_CLASS)}") from None
