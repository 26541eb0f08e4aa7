"""Solvers against closed forms: for data ~ N(mu, s^2) the exact denoiser is
D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the probability-flow ODE keeps
(x - mu) / sqrt(s^2 + sigma^2) constant along a trajectory.
"""
import math

import pytest
import torch

from latentloom.samplers import SAMPLERS
from latentloom.samplers.schedules import DiscreteSchedule, ScheduleConfig, karras_sigmas, make_sigmas

MU, S = 0.5, 0.8
SIGMA_MAX, SIGMA_MIN = 20.0, 0.05
DETERMINISTIC_ORDER = {"euler": 1.0, "ddim": 1.0, "heun": 2.0, "dpmpp_2m": 2.0, "unipc": 3.0}


def gaussian_denoiser(x, sigma):
    sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def ode_solution(x, sigma_from, sigma_to):
    return MU + (x - MU) * math.sqrt(S**2 + sigma_to**2) / math.sqrt(S**2 + sigma_from**2)


def start(n, *, sigma=SIGMA_MAX, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 2, 2, generator=g, dtype=dtype) * math.sqrt(S**2 + sigma**2) + MU


def ode_error(name, steps):
    # a grid that stops at SIGMA_MIN > 0: the final jump to 0 would add an N-independent error
    sigmas = torch.tensor(karras_sigmas(SIGMA_MIN, SIGMA_MAX, steps + 1), dtype=torch.float64)
    x = start(64)
    out = SAMPLERS[name](gaussian_denoiser, x, sigmas)
    return (out - ode_solution(x, SIGMA_MAX, SIGMA_MIN)).abs().max().item()


def measured_order(name, steps=(16, 32, 64)):
    """Least-squares slope of -log2(error) against log2(steps)."""
    xs = [math.log2(n) for n in steps]
    ys = [-math.log2(ode_error(name, n)) for n in steps]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


@pytest.mark.parametrize("name,order", list(DETERMINISTIC_ORDER.items()))
def test_convergence_order(name, order):
    measured = measured_order(name)
    assert abs(measured - order) < 0.35, f"{name}: measured order {measured:.2f}, theory {order}"


@pytest.mark.parametrize("name", list(DETERMINISTIC_ORDER))
def test_error_falls_with_steps(name):
    errors = [ode_error(name, n) for n in (8, 16, 32, 64)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("name,tol", [("euler", 0.15), ("ddim", 0.15), ("heun", 0.015), ("dpmpp_2m", 0.02), ("unipc", 0.005)])
def test_sd_schedule_reaches_the_ode_solution(name, tol):
    # the real thing: SD's schedule with Karras sigmas, 30 steps, down to sigma 0, in float32
    # (x spans about +-40 here, so these are relative errors of 0.3% and below)
    schedule = DiscreteSchedule.from_config(ScheduleConfig())
    sigmas = make_sigmas(schedule, 30, sampler=name, karras=True)
    x = start(64, sigma=float(sigmas[0]), dtype=torch.float32)
    out = SAMPLERS[name](gaussian_denoiser, x, sigmas)
    err = (out - ode_solution(x, float(sigmas[0]), 0.0)).abs().max().item()
    assert err < tol, f"{name}: {err:.3g}"


@pytest.mark.parametrize("name,steps,std_tol", [("ddpm", 400, 0.015), ("euler_a", 400, 0.015), ("dpmpp_2m_sde", 50, 0.015)])
def test_stochastic_solvers_sample_the_data_distribution(name, steps, std_tol):
    n = 20000
    sigmas = torch.tensor([*karras_sigmas(0.03, SIGMA_MAX, steps), 0.0], dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, generator=g) * math.sqrt(SIGMA_MAX**2 + S**2) + MU
    out = SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=g)
    assert abs(out.mean().item() - MU) < 4 * S / math.sqrt(n) + 0.01
    assert abs(out.std().item() - S) < std_tol


def test_stochastic_std_error_falls_with_steps():
    sigmas_of = lambda n: torch.tensor([*karras_sigmas(0.03, SIGMA_MAX, n), 0.0], dtype=torch.float32)  # noqa: E731
    errs = []
    for n in (10, 40, 160):
        g = torch.Generator().manual_seed(2)
        x = torch.randn(20000, 1, generator=g) * math.sqrt(SIGMA_MAX**2 + S**2) + MU
        errs.append(abs(SAMPLERS["euler_a"](gaussian_denoiser, x, sigmas_of(n), generator=g).std().item() - S))
    assert errs[0] > errs[1] > errs[2], errs


def order_summary():
    """Print the measured convergence order of every deterministic solver."""
    print("\nsolver     measured order (theory)   errors at 16 / 32 / 64 steps")
    for name, order in DETERMINISTIC_ORDER.items():
        measured = measured_order(name)
        errors = " / ".join(f"{ode_error(name, n):.2e}" for n in (16, 32, 64))
        print(f"{name:10s} {measured:5.2f} ({order:.0f})              {errors}")


if __name__ == "__main__":  # .venv/bin/python tests/test_samplers_analytic.py
    order_summary()


@pytest.mark.parametrize("steps", [1, 4])
def test_consistency_sampler_with_the_exact_consistency_function_lands_on_the_data(steps):
    """Data ~ N(mu, s^2): the exact consistency function maps x at sigma along the probability-flow
    ODE to sigma 0. A model whose output makes LCM's c_skip z + c_out x0 equal to it takes pure
    noise to the data distribution in one step, and stays there over several (re-noised) steps."""
    from latentloom.samplers.consistency import consistency_options, lcm_scalings

    schedule = DiscreteSchedule.from_config(ScheduleConfig())
    sigmas = make_sigmas(schedule, steps, sampler="lcm")
    options = consistency_options("lcm", schedule, sigmas)

    def exact_consistency_model(x, sigma):
        s = float(sigma.flatten()[0])
        t = float(schedule.sigma_to_t(torch.tensor([s]))[0].round())
        c_skip, c_out = lcm_scalings(t, 10.0)
        target = ode_solution(x, s, 0.0)  # f(x, sigma): the ODE's end point
        return (target - c_skip * x / math.sqrt(1 + s**2)) / c_out

    g = torch.Generator().manual_seed(3)
    x = start(20000, sigma=float(sigmas[0]), seed=4)
    out = SAMPLERS["lcm"](exact_consistency_model, x, sigmas, generator=g, **options)
    assert abs(out.mean().item() - MU) < 0.02 and abs(out.std().item() - S) < 0.02
    if steps == 1:  # deterministic in one step: exactly the ODE's end point of each sample
        torch.testing.assert_close(out, ode_solution(x, float(sigmas[0]), 0.0), rtol=1e-6, atol=1e-6)
