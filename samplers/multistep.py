"""Multistep exponential-integrator solvers (DPM-Solver++, UniPC) in the k-diffusion form.

Same calling convention as `solvers.py`. In VE variables the data-prediction solvers
need only lambda = -log(sigma): with h = lambda_next - lambda, the first-order update is
x_next = (sigma_next / sigma) x - (e^{-h} - 1) x0, exactly DDIM. History (previous x0
estimates and step sizes) is a local variable. The step that lands on sigma 0 is first
order and returns the x0 estimate, as diffusers' lower_order_final does.
"""
from __future__ import annotations

import torch

from .noise import Generator, randn
from .solvers import Callback, Denoise, _check, _s


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                    callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, midpoint form); = diffusers DPMSolverMultistepScheduler "dpmsolver++"."""
    x, sigmas, dtype = _check(x, sigmas)
    old_denoised, h_last = None, None
    for i in range(sigmas.numel() - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _s(sigma, x))
        if callback is not None:
            callback(i, sigma, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        if old_denoised is None:
            x = (sigma_next / sigma) * x - (torch.exp(-h) - 1.0) * denoised
        else:
            r = h_last / h
            d1 = (1.0 / r) * (denoised - old_denoised)
            x = (sigma_next / sigma) * x - (torch.exp(-h) - 1.0) * denoised - 0.5 * (torch.exp(-h) - 1.0) * d1
        old_denoised, h_last = denoised, h
    return x.to(dtype)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                        callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, eq. 18 family, midpoint); = diffusers "sde-dpmsolver++" with per-step randn noise."""
    x, sigmas, dtype = _check(x, sigmas)
    old_denoised, h_last = None, None
    for i in range(sigmas.numel() - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _s(sigma, x))
        if callback is not None:
            callback(i, sigma, x, denoised)
        # diffusers draws float32 noise at every step, the last included
        noise = randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        e2h = 1.0 - torch.exp(-2.0 * h)
        x = (sigma_next / sigma * torch.exp(-h)) * x + e2h * denoised
        if old_denoised is not None:
            r = h_last / h
            x = x + 0.5 * e2h * ((1.0 / r) * (denoised - old_denoised))
        x = x + sigma_next * torch.sqrt(e2h) * noise
        old_denoised, h_last = denoised, h
    return x.to(dtype)


def _unipc_rhos(h: torch.Tensor, rks: list[torch.Tensor], order: int, *, corrector: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UniPC-bh2 coefficients (Zhao et al. 2023, Alg. 2 / eq. 8): (rhos, h_phi_1, B_h) for a data-prediction step."""
    hh = -h
    h_phi_1 = torch.expm1(hh)  # e^{hh} - 1
    h_phi_k = h_phi_1 / hh - 1
    B_h = torch.expm1(hh)
    r = torch.stack(rks + [torch.ones_like(h)])  # (order,)
    R, b, factorial = [], [], 1
    for k in range(1, order + 1):
        R.append(r ** (k - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(R), torch.stack(b)
    if corrector:
        rhos = torch.full((1,), 0.5, dtype=h.dtype, device=h.device) if order == 1 else torch.linalg.solve(R, b)
    elif order == 1:
        rhos = h.new_zeros(0)
    elif order == 2:
        rhos = torch.full((1,), 0.5, dtype=h.dtype, device=h.device)
    else:
        rhos = torch.linalg.solve(R[:-1, :-1], b[:-1])
    return rhos, h_phi_1, B_h


def _weighted(rhos: torch.Tensor, terms: list[torch.Tensor]) -> torch.Tensor | float:
    out: torch.Tensor | float = 0.0
    for rho, term in zip(rhos, terms):
        out = out + rho * term
    return out


@torch.no_grad()
def sample_unipc(denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                 callback: Callback = None, order: int = 2, steps_after: int = 0) -> torch.Tensor:
    """UniPC-bh2 predictor-corrector (Zhao et al. 2023) of `order`; = diffusers UniPCMultistepScheduler.

    steps_after: steps of the schedule that follow `sigmas` (a base stopped by `denoising_end`), so the
    order is lowered only near the schedule's real end, as diffusers' lower_order_final does."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    x, sigmas, dtype = _check(x, sigmas)
    lambdas = -sigmas.log()  # (N + 1,); inf at sigma 0
    n = sigmas.numel() - 1
    history: list[torch.Tensor] = []  # x0 estimates, oldest first
    last_x, last_order = None, 0
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _s(sigma, x))
        if callback is not None:
            callback(i, sigma, x, denoised)
        if last_x is not None:
            # UniC: correct the previous predictor's result with the new model evaluation
            m0 = history[-1]
            h = lambdas[i] - lambdas[i - 1]
            rks = [(lambdas[i - 1 - k] - lambdas[i - 1]) / h for k in range(1, last_order)]
            d1s = [(history[-1 - k] - m0) / rk for k, rk in zip(range(1, last_order), rks)]
            rhos, h_phi_1, B_h = _unipc_rhos(h, rks, last_order, corrector=True)
            x_pred = (sigma / sigmas[i - 1]) * last_x - h_phi_1 * m0
            x = x_pred - B_h * (_weighted(rhos[:-1], d1s) + rhos[-1] * (denoised - m0))
        history = (history + [denoised])[-order:]
        # warm up from first order; lower the order on the final steps (lower_order_final)
        this_order = min(order, n + steps_after - i, len(history))
        last_x, last_order = x, this_order
        if sigma_next == 0:
            x = denoised
            continue
        m0 = history[-1]
        h = lambdas[i + 1] - lambdas[i]
        rks = [(lambdas[i - k] - lambdas[i]) / h for k in range(1, this_order)]
        d1s = [(history[-1 - k] - m0) / rk for k, rk in zip(range(1, this_order), rks)]
        rhos, h_phi_1, B_h = _unipc_rhos(h, rks, this_order, corrector=False)
        x = (sigma_next / sigma) * x - h_phi_1 * m0 - B_h * _weighted(rhos, d1s)
    return x.to(dtype)
