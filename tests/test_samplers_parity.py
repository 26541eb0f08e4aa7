"""Each latentloom solver walks the same trajectory as its diffusers scheduler.

Same deterministic toy model, same initial noise (`randn` with per-sample generators), same
generators for the stochastic steps; every intermediate sample is compared (in diffusers'
own space: VP samplers divide by sqrt(sigma^2 + 1)) and every timestep the model sees.
"""
import warnings

import diffusers
import pytest
import torch

from latentloom.samplers import SAMPLERS
from latentloom.samplers.denoiser import Denoiser
from latentloom.samplers.forward import add_noise
from latentloom.samplers.noise import final_latents, initial_latents, randn, sigmas_for_strength
from latentloom.samplers.schedules import VP_SAMPLERS, DiscreteSchedule, ScheduleConfig, make_sigmas

TOL = 1e-5
SCHEDULERS = {
    "ddpm": diffusers.DDPMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler,
    "heun": diffusers.HeunDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "dpmpp_2m_sde": diffusers.DPMSolverMultistepScheduler,
    "unipc": diffusers.UniPCMultistepScheduler,
}
STOCHASTIC = ("ddpm", "euler_a", "dpmpp_2m_sde")
KARRAS = ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc")  # where diffusers offers Karras sigmas


class ToyModel(torch.nn.Module):
    """Deterministic, nonlinear in x and t, near-identity like a trained eps model; records every t."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.w = torch.randn(channels, channels, generator=torch.Generator().manual_seed(0)) * 0.5
        self.seen_t: list[torch.Tensor] = []

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        self.seen_t.append(t[0].clone())
        h = torch.einsum("oc,bchw->bohw", self.w, x)
        return 0.9 * x + 0.3 * torch.tanh(h + torch.cos(t * 0.01)[:, None, None, None])


def diffusers_config(sampler, pred, karras, spacing, **extra):
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=pred,
               timestep_spacing=spacing, steps_offset=1, **extra)
    if sampler in ("ddim", "ddpm"):
        cfg.setdefault("clip_sample", False)
    if sampler == "ddim":
        cfg.setdefault("set_alpha_to_one", True)
    if sampler == "dpmpp_2m_sde":
        cfg["algorithm_type"] = "sde-dpmsolver++"
    if karras:
        cfg["use_karras_sigmas"] = True
    return cfg


def gens(seed, b):
    return [torch.Generator().manual_seed(seed + i) for i in range(b)]


def run_diffusers(sampler, cfg, n, x0=None, strength=None, b=2, seed=0):
    sched = SCHEDULERS[sampler](**cfg)
    sched.set_timesteps(n)
    model = ToyModel()
    g = gens(seed, b)
    noise = randn((b, 4, 8, 8), generator=g)
    timesteps = sched.timesteps
    if strength is None:
        lat = noise * sched.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        init = min(int(n * strength), n)
        t_start = max(n - init, 0)
        timesteps = sched.timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        lat = sched.add_noise(x0, noise, timesteps[:1].repeat(b))
    traj = []
    for t in timesteps:
        out = model(sched.scale_model_input(lat, t), t)
        kw = {"generator": g} if sampler in STOCHASTIC else {}
        lat = sched.step(out, t, lat, **kw).prev_sample
        if sampler != "heun" or sched.state_in_first_order:
            traj.append(lat)
    if sampler == "heun" and not sched.state_in_first_order:
        traj.append(lat)  # the last step is a plain Euler step
    return traj, torch.stack(model.seen_t)


def run_latentloom(sampler, cfg, n, x0=None, strength=None, b=2, seed=0, **sample_kw):
    config = ScheduleConfig.from_diffusers_config(cfg)
    schedule = DiscreteSchedule.from_config(config)
    sigmas = make_sigmas(schedule, n, sampler=sampler, timestep_spacing=config.timestep_spacing,
                         steps_offset=config.steps_offset, karras=config.use_karras_sigmas,
                         set_alpha_to_one=config.set_alpha_to_one)
    model = ToyModel()
    denoiser = Denoiser(model, schedule, prediction_type=config.prediction_type)
    g = gens(seed, b)
    noise = randn((b, 4, 8, 8), generator=g)
    if strength is None:
        x = initial_latents(noise, sigmas, sampler=sampler, timestep_spacing=config.timestep_spacing)
    else:
        sigmas = sigmas_for_strength(sigmas, strength, sampler=sampler)
        x = add_noise(x0, noise, sigmas[0])
    states = []
    x = SAMPLERS[sampler](denoiser, x, sigmas, generator=g, callback=lambda i, s, xi, d: states.append(xi))
    states = states[1:] + [x]  # the sample after each step
    if sampler in VP_SAMPLERS:  # to diffusers' VP space
        states = [s / (1 + sigmas[i + 1] ** 2) ** 0.5 for i, s in enumerate(states)]
        states[-1] = final_latents(x, sigmas)
    return states, torch.stack(model.seen_t)


def compare(sampler, cfg, n=10, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref, ref_t = run_diffusers(sampler, cfg, n, **kw)
    ours, our_t = run_latentloom(sampler, cfg, n, **kw)
    assert len(ours) == len(ref)
    assert torch.equal(our_t, ref_t.float()), (our_t, ref_t)  # the model sees exactly diffusers' timesteps
    return max((a - b).abs().max().item() for a, b in zip(ours, ref))


CASES = [
    (s, p, k, sp)
    for s in SCHEDULERS
    for p in ("epsilon", "v_prediction")
    for k in ((False, True) if s in KARRAS else (False,))
    for sp in ("leading", "trailing", "linspace")
    if not (s == "ddim" and sp == "linspace")  # diffusers' DDIM steps by T // N there (see test below)
]


@pytest.mark.parametrize("sampler,pred,karras,spacing", CASES)
def test_trajectory_matches_diffusers(sampler, pred, karras, spacing):
    err = compare(sampler, diffusers_config(sampler, pred, karras, spacing))
    assert err <= TOL, f"{sampler} {pred} karras={karras} {spacing}: max abs diff {err:.3g}"


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler"])
def test_sample_prediction_matches_diffusers(sampler):
    assert compare(sampler, diffusers_config(sampler, "sample", False, "leading")) <= TOL


def test_ddim_eta_matches_diffusers():
    cfg = diffusers_config("ddim", "epsilon", False, "leading")
    ref = SCHEDULERS["ddim"](**cfg)
    ref.set_timesteps(8)
    model, g = ToyModel(), gens(5, 2)
    lat = randn((2, 4, 8, 8), generator=g)
    for t in ref.timesteps:
        lat = ref.step(model(lat, t), t, lat, eta=0.7, generator=g).prev_sample
    schedule = DiscreteSchedule.from_config(ScheduleConfig.from_diffusers_config(cfg))
    sigmas = make_sigmas(schedule, 8, sampler="ddim")
    g = gens(5, 2)
    x = initial_latents(randn((2, 4, 8, 8), generator=g), sigmas, sampler="ddim")
    x = SAMPLERS["ddim"](Denoiser(ToyModel(), schedule, prediction_type="epsilon"), x, sigmas, generator=g, eta=0.7)
    assert (x - lat).abs().max() <= TOL


def test_ddim_without_final_alpha_one_matches_diffusers():
    # SD's scheduler configs say set_alpha_to_one=False: the last step lands on sigma(t=0)
    cfg = diffusers_config("ddim", "epsilon", False, "leading", set_alpha_to_one=False)
    assert compare("ddim", cfg) <= TOL


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "unipc"])
def test_zero_terminal_snr_matches_diffusers(sampler):
    cfg = diffusers_config(sampler, "v_prediction", False, "trailing", rescale_betas_zero_snr=True)
    assert compare(sampler, cfg) <= TOL


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_img2img_strength_matches_diffusers(sampler):
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    cfg = diffusers_config(sampler, "epsilon", False, "leading")
    assert compare(sampler, cfg, n=12, x0=x0, strength=0.6) <= TOL


def test_squaredcos_and_linear_schedules_match_diffusers():
    for beta_schedule in ("linear", "squaredcos_cap_v2"):
        # (diffusers' multistep schedulers fail with Karras sigmas on the cosine schedule: duplicate timesteps)
        cfg = diffusers_config("dpmpp_2m", "epsilon", False, "leading")
        cfg.update(beta_schedule=beta_schedule, beta_start=0.0001, beta_end=0.02)
        assert compare("dpmpp_2m", cfg) <= TOL
        cfg = diffusers_config("euler", "epsilon", True, "linspace")
        cfg.update(beta_schedule=beta_schedule, beta_start=0.0001, beta_end=0.02)
        assert compare("euler", cfg) <= TOL


def test_ddim_spacing_where_diffusers_skips_warns():
    schedule = DiscreteSchedule.from_config(ScheduleConfig())
    with pytest.warns(UserWarning, match="DDIMScheduler steps"):
        make_sigmas(schedule, 10, sampler="ddim", timestep_spacing="linspace")


def parity_summary():
    """Print the worst trajectory difference per solver over all configurations above."""
    worst = {}
    for sampler, pred, karras, spacing in CASES:
        err = compare(sampler, diffusers_config(sampler, pred, karras, spacing))
        worst[sampler] = max(worst.get(sampler, 0.0), err)
    print("\nsolver         max |latentloom - diffusers| over eps/v x spacings x Karras")
    for sampler, err in worst.items():
        print(f"{sampler:14s} {err:.2e}")


if __name__ == "__main__":  # HF_HUB_OFFLINE=1 .venv/bin/python tests/test_samplers_parity.py
    parity_summary()


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_generators_end_in_diffusers_state(sampler):
    # a generator shared with later work must be left where diffusers leaves it
    cfg = diffusers_config(sampler, "epsilon", False, "leading")
    ref = SCHEDULERS[sampler](**cfg)
    ref.set_timesteps(6)
    g_ref = torch.Generator().manual_seed(9)
    lat = randn((1, 4, 8, 8), generator=g_ref) * ref.init_noise_sigma
    model = ToyModel()
    for t in ref.timesteps:
        lat = ref.step(model(ref.scale_model_input(lat, t), t), t, lat, generator=g_ref).prev_sample
    schedule = DiscreteSchedule.from_config(ScheduleConfig.from_diffusers_config(cfg))
    sigmas = make_sigmas(schedule, 6, sampler=sampler)
    g = torch.Generator().manual_seed(9)
    x = initial_latents(randn((1, 4, 8, 8), generator=g), sigmas, sampler=sampler)
    SAMPLERS[sampler](Denoiser(ToyModel(), schedule, prediction_type="epsilon"), x, sigmas, generator=g)
    assert torch.equal(g.get_state(), g_ref.get_state())
