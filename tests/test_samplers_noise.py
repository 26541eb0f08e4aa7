"""Noise drawing, determinism, batch independence, img2img strength, the Denoiser and the registry."""
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from latentloom.samplers import SAMPLERS, get_sampler
from latentloom.samplers.consistency import consistency_options
from latentloom.samplers.denoiser import Denoiser
from latentloom.samplers.forward import add_noise
from latentloom.samplers.noise import (
    final_latents,
    init_noise_sigma,
    initial_latents,
    randn,
    sigmas_for_strength,
)
from latentloom.samplers.schedules import DiscreteSchedule, ScheduleConfig, make_sigmas

SHAPE = (3, 4, 8, 8)


class ToyModel(torch.nn.Module):
    def __init__(self, in_channels=4, out_channels=4):
        super().__init__()
        self.w = torch.randn(out_channels, in_channels, generator=torch.Generator().manual_seed(0)) * 0.5
        self.calls = []

    def forward(self, x, t, **cond):
        self.calls.append((x, t, cond))
        h = torch.einsum("oc,bchw->bohw", self.w, x)
        return 0.9 * x[:, : h.shape[1]] + 0.3 * torch.tanh(h + torch.cos(t * 0.01)[:, None, None, None])


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_randn_equals_diffusers_randn_tensor():
    assert torch.equal(randn(SHAPE, generator=gens([1, 2, 3])), randn_tensor(SHAPE, generator=gens([1, 2, 3])))
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(randn(SHAPE, generator=g1), randn_tensor(SHAPE, generator=g2))
    out = randn(SHAPE, generator=gens([5]) * 1, dtype=torch.float64)
    assert out.dtype == torch.float64


def test_randn_errors():
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3"):
        randn(SHAPE, generator=gens([1, 2]))
    class CudaGenerator:  # stands in for a torch.cuda generator on a CPU-only machine
        device = torch.device("cuda")

    with pytest.raises(ValueError, match="cannot draw a cpu tensor from a cuda generator"):
        randn(SHAPE, generator=CudaGenerator())


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_same_seed_same_result_and_batch_equals_alone(name):
    schedule = DiscreteSchedule.from_config(ScheduleConfig())
    sigmas = make_sigmas(schedule, 6, sampler=name)
    denoiser = Denoiser(ToyModel(), schedule, prediction_type="epsilon")

    options = consistency_options(name, schedule, sigmas) if name in ("lcm", "tcd") else {}

    def run(seeds):
        g = gens(seeds)
        x = initial_latents(randn((len(seeds), 4, 8, 8), generator=g), sigmas, sampler=name)
        return SAMPLERS[name](denoiser, x, sigmas, generator=g, **options)

    batch = run([10, 11, 12])
    assert torch.equal(batch, run([10, 11, 12]))
    alone = run([11])
    assert torch.allclose(batch[1:2], alone, atol=1e-6, rtol=0)  # same image alone as in the batch
    assert not torch.allclose(batch[0], batch[1])


def test_init_noise_sigma_follows_diffusers():
    schedule = DiscreteSchedule.from_config(ScheduleConfig())
    sigmas = make_sigmas(schedule, 10, sampler="euler", timestep_spacing="trailing")
    assert init_noise_sigma(sigmas, sampler="euler", timestep_spacing="trailing") == float(sigmas[0])
    lead = init_noise_sigma(sigmas, sampler="euler", timestep_spacing="leading")
    assert abs(lead - (float(sigmas[0]) ** 2 + 1) ** 0.5) < 1e-5
    # VP samplers start at x_vp = noise, i.e. noise * sqrt(sigma^2 + 1) in VE space
    assert abs(init_noise_sigma(sigmas, sampler="ddim", timestep_spacing="trailing") - lead) < 1e-5
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        init_noise_sigma(sigmas, sampler="plms")
    with pytest.raises(ValueError, match="timestep_spacing 'odd'"):
        init_noise_sigma(sigmas, sampler="euler", timestep_spacing="odd")


def test_sigmas_for_strength_and_add_noise():
    sigmas = torch.linspace(10, 0, 11)
    tail = sigmas_for_strength(sigmas, 0.6, sampler="heun")
    assert torch.equal(tail, sigmas[4:])  # int(10 * 0.6) = 6 steps
    assert torch.equal(sigmas_for_strength(sigmas, 1.0, sampler="euler"), sigmas)
    x0, noise = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    assert torch.equal(add_noise(x0, noise, tail[0]), x0 + float(tail[0]) * noise)
    with pytest.raises(ValueError, match="strength must be in"):
        sigmas_for_strength(sigmas, 1.5, sampler="euler")
    with pytest.raises(ValueError, match="leaves no denoising step"):
        sigmas_for_strength(sigmas, 0.05, sampler="euler")
    with pytest.raises(ValueError, match="unknown sampler"):
        sigmas_for_strength(sigmas, 0.5, sampler="nope")


def test_final_latents():
    x = torch.full((1, 1, 1, 1), 2.0)
    assert torch.equal(final_latents(x, torch.tensor([3.0, 0.0])), x)
    assert torch.allclose(final_latents(x, torch.tensor([3.0, 0.75])), x / 1.25)


def test_denoiser_prediction_types_and_cond_forwarding():
    schedule = DiscreteSchedule.from_config(ScheduleConfig())
    model = ToyModel(in_channels=6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([3.0, 3.0])
    concat = torch.randn(2, 2, 8, 8)
    context = torch.randn(2, 5, 16)
    out = {}
    for pred in ("epsilon", "v_prediction", "sample"):
        d = Denoiser(model, schedule, prediction_type=pred)
        raw = d.predict(x, sigma, concat=concat, context=context)
        out[pred] = d(x, sigma, concat=concat, context=context)
        assert torch.allclose(d.from_x0(x, sigma, out[pred]), raw, atol=1e-5)
    x_in, t, cond = model.calls[-1]
    # c_in applies to the latents only; concat is appended after scaling; cond passes untouched
    assert torch.allclose(x_in[:, :4], x / (3.0**2 + 1) ** 0.5) and torch.equal(x_in[:, 4:], concat)
    assert cond == {"context": context} and t.shape == (2,)
    raw = model(x_in, t)
    assert torch.allclose(out["epsilon"], x - 3.0 * raw, atol=1e-6)
    assert torch.allclose(out["v_prediction"], x / 10 - raw * 3 / 10**0.5, atol=1e-6)
    assert torch.equal(out["sample"], raw)


def test_denoiser_errors():
    schedule = DiscreteSchedule.from_config(ScheduleConfig())
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        Denoiser(ToyModel(), schedule, prediction_type="flow")
    with pytest.raises(TypeError, match="DiscreteSchedule"):
        Denoiser(ToyModel(), "sd", prediction_type="epsilon")
    d = Denoiser(ToyModel(in_channels=6), schedule, prediction_type="epsilon")
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="concat must match"):
        d(x, 1.0, concat=torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"sigma must be a scalar or have shape \(2,\)"):
        d(x, torch.ones(3))


def test_registry_and_errors():
    assert set(SAMPLERS) == {"ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lcm",
                             "tcd"}
    assert get_sampler("heun") is SAMPLERS["heun"]
    with pytest.raises(ValueError, match=r"unknown sampler 'lms'; expected one of \['ddim'"):
        get_sampler("lms")
    with pytest.raises(ValueError, match="sigmas must be 1-D with at least 2"):
        SAMPLERS["euler"](lambda x, s: x, torch.zeros(1, 1), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="UniPC order must be 1, 2 or 3"):
        SAMPLERS["unipc"](lambda x, s: x, torch.zeros(1, 1), torch.tensor([1.0, 0.0]), order=4)
    with pytest.raises(ValueError, match=r"sample_lcm needs timesteps, one per step \(1\)"):
        SAMPLERS["lcm"](lambda x, s: x, torch.zeros(1, 1), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="TCD's gamma\) must be in \[0, 1\]"):
        SAMPLERS["tcd"](lambda x, s: x, torch.zeros(1, 1), torch.tensor([1.0, 0.0]), sigmas_s=torch.zeros(1), eta=2.0)


def test_callback_sees_every_step():
    seen = []
    sigmas = torch.tensor([5.0, 2.0, 1.0, 0.0])
    SAMPLERS["heun"](lambda x, s: 0.5 * x, torch.ones(2, 1), sigmas,
                     callback=lambda i, s, x, d: seen.append((i, float(s), x.shape, d.shape)))
    assert [(i, s) for i, s, _, _ in seen] == [(0, 5.0), (1, 2.0), (2, 1.0)]
    assert all(xs == ds == (2, 1) for _, _, xs, ds in seen)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "unipc"])
def test_solvers_keep_dtype_and_device(name):
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    out = SAMPLERS[name](lambda x, s: 0.5 * x, x, torch.tensor([5.0, 1.0, 0.0]))
    assert out.dtype == torch.float64 and out.device == x.device


def test_half_precision_latents_are_walked_in_float32():
    schedule = DiscreteSchedule.from_config(ScheduleConfig())
    sigmas = make_sigmas(schedule, 5, sampler="euler")
    model = ToyModel()
    denoiser = Denoiser(model, schedule, prediction_type="epsilon")
    x = (torch.randn(1, 4, 8, 8) * 14).to(torch.bfloat16)
    out = SAMPLERS["euler"](denoiser, x, sigmas)
    ref = SAMPLERS["euler"](denoiser, x.float(), sigmas)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.to(torch.bfloat16))
    # the model saw diffusers' registered timesteps, not bf16-rounded sigmas' interpolations
    assert model.calls[0][1][0] == 801.0  # leading spacing, 5 steps: 800 + steps_offset
