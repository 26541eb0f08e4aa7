"""Schedules: betas, zero-terminal-SNR, sigma/timestep sequences and configs equal diffusers'."""
import warnings

import diffusers
import numpy as np
import pytest
import torch

from latentloom.samplers.schedules import (
    DiscreteSchedule,
    ScheduleConfig,
    make_betas,
    make_sigmas,
    rescale_zero_terminal_snr,
    sigmas_and_timesteps,
)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_equal_diffusers(kind):
    ref = diffusers.DDPMScheduler(beta_schedule=kind, beta_start=0.00085, beta_end=0.012).betas
    assert torch.equal(make_betas(kind), ref)


def test_zero_terminal_snr_equals_diffusers_and_reaches_zero():
    betas = make_betas("scaled_linear")
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  rescale_betas_zero_snr=True).betas
    out = rescale_zero_terminal_snr(betas)
    assert torch.allclose(out, ref, atol=0, rtol=0)
    assert torch.cumprod(1 - out, 0)[-1].abs() < 1e-12
    # the VE form clamps the last alpha_cumprod (sigma would be infinite), as diffusers' Euler does
    schedule = DiscreteSchedule.from_betas(betas, rescale_betas_zero_snr=True)
    assert schedule.alphas_cumprod[-1] == 2.0**-24


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("karras", [False, True])
def test_euler_sigmas_and_timesteps_equal_diffusers(spacing, karras):
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing,
               steps_offset=1, use_karras_sigmas=karras)
    ref = diffusers.EulerDiscreteScheduler(**cfg)
    ref.set_timesteps(25)
    schedule = DiscreteSchedule.from_config(ScheduleConfig.from_diffusers_config(cfg))
    sigmas, ts = sigmas_and_timesteps(schedule, 25, sampler="euler", timestep_spacing=spacing, karras=karras)
    assert torch.equal(sigmas, ref.sigmas)
    assert torch.equal(ts, ref.timesteps)
    assert sigmas[-1] == 0 and sigmas.ndim == 1


@pytest.mark.parametrize("sampler,cls,extra", [
    ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, {}),
    ("unipc", diffusers.UniPCMultistepScheduler, {}),
    ("ddim", diffusers.DDIMScheduler, {"clip_sample": False}),
    ("ddpm", diffusers.DDPMScheduler, {"clip_sample": False}),
])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_vp_timesteps_equal_diffusers(sampler, cls, extra, spacing):
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing,
               steps_offset=1, **extra)
    ref = cls(**cfg)
    ref.set_timesteps(20)
    schedule = DiscreteSchedule.from_config(ScheduleConfig.from_diffusers_config(cfg))
    sigmas, ts = sigmas_and_timesteps(schedule, 20, sampler=sampler, timestep_spacing=spacing)
    assert torch.equal(ts, ref.timesteps.float())
    expected = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5
    assert torch.allclose(sigmas[:-1], expected[ref.timesteps], rtol=1e-6, atol=0)


def test_sigma_to_t_uses_registered_timesteps_and_interpolates_otherwise():
    schedule = DiscreteSchedule.from_config(ScheduleConfig())
    sigmas, ts = sigmas_and_timesteps(schedule, 10, sampler="euler", karras=True)
    assert torch.equal(schedule.sigma_to_t(sigmas[:-1]), ts)
    # an unregistered sigma: log-linear interpolation between training sigmas
    mid = (schedule.sigmas[100] * schedule.sigmas[101]) ** 0.5
    assert abs(schedule.sigma_to_t(mid.reshape(1)).item() - 100.5) < 1e-3
    assert torch.allclose(schedule.t_to_sigma(torch.tensor([100.0])), schedule.sigmas[100:101])


def test_schedule_config_from_sd_scheduler_config():
    sd = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
          "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
          "steps_offset": 1, "trained_betas": None, "prediction_type": "v_prediction", "timestep_spacing": "leading"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here changes the math: no warning
        cfg = ScheduleConfig.from_diffusers_config(sd)
    assert cfg.prediction_type == "v_prediction" and cfg.set_alpha_to_one is False and cfg.steps_offset == 1
    schedule = DiscreteSchedule.from_config(cfg)
    assert torch.equal(schedule.alphas_cumprod, torch.cumprod(1 - make_betas("scaled_linear"), 0))


def test_schedule_config_warns_about_unsupported_settings():
    # clip_sample is modelled (DDPM / DDIM / Heun clamp x0); dynamic thresholding is not
    with pytest.warns(UserWarning, match="thresholding=True"):
        ScheduleConfig.from_diffusers_config({"thresholding": True})


def test_trained_betas_are_used():
    betas = np.linspace(1e-4, 2e-2, 50).tolist()
    schedule = DiscreteSchedule.from_config(ScheduleConfig(trained_betas=betas))
    assert schedule.num_train_timesteps == 50
    assert torch.allclose(schedule.alphas_cumprod, torch.cumprod(1 - torch.tensor(betas, dtype=torch.float32), 0))


@pytest.mark.parametrize("kwargs,match", [
    ({"prediction_type": "flow"}, "prediction_type"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing"),
])
def test_schedule_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig(**kwargs)


def test_errors_name_the_bad_value():
    schedule = DiscreteSchedule.from_config(ScheduleConfig())
    with pytest.raises(ValueError, match="unknown beta schedule 'cubic'"):
        make_betas("cubic")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        make_betas("linear", num_train_timesteps=1)
    with pytest.raises(ValueError, match="unknown sampler 'lms'"):
        make_sigmas(schedule, 10, sampler="lms")
    with pytest.raises(ValueError, match="timestep_spacing 'even'"):
        make_sigmas(schedule, 10, sampler="euler", timestep_spacing="even")
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        make_sigmas(schedule, 0, sampler="euler")
    with pytest.raises(ValueError, match="outside"):
        make_sigmas(schedule, 1000, sampler="ddim", steps_offset=1)
    with pytest.raises(ValueError, match=r"alphas_cumprod must lie in \(0, 1\)"):
        DiscreteSchedule(torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="1-D"):
        DiscreteSchedule(torch.ones(2, 2) * 0.5)
