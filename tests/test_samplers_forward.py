"""The forward process in one place: the two noising views agree, and a network that outputs its
training target exactly is turned back into x0 by the sampler's Denoiser, for every prediction type."""
import pytest
import torch

from latentloom.samplers.denoiser import Denoiser
from latentloom.samplers.forward import add_noise, add_noise_at_timestep, alpha_bar_at, prediction_target
from latentloom.samplers.schedules import DiscreteSchedule, ScheduleConfig


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64), torch.randn(3, 4, 6, 6, generator=g,
                                                                                    dtype=torch.float64)


def test_timestep_and_sigma_views_are_one_process(batch):
    x0, noise = batch
    schedule = DiscreteSchedule.from_config(ScheduleConfig())
    t = torch.tensor([0, 400, 999])
    ab = alpha_bar_at(schedule.alphas_cumprod.double(), t, x0)
    x_t = add_noise_at_timestep(x0, noise, schedule.alphas_cumprod.double(), t)
    sigma = ((1 - ab) / ab).sqrt().flatten()
    torch.testing.assert_close(x_t / ab.sqrt(), add_noise(x0, noise, sigma))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_denoiser_inverts_the_training_target(batch, prediction_type):
    x0, noise = batch
    schedule = DiscreteSchedule.from_config(ScheduleConfig())
    t = torch.tensor([10, 500, 990])
    ac = schedule.alphas_cumprod.double()
    ab = alpha_bar_at(ac, t, x0)
    target = prediction_target(x0, noise, ab, prediction_type=prediction_type)
    sigma = ((1 - ab) / ab).sqrt().flatten()
    x = add_noise(x0, noise, sigma)  # the same sample in the samplers' variables
    denoiser = Denoiser(lambda *a, **k: target, schedule, prediction_type=prediction_type)
    torch.testing.assert_close(denoiser.to_x0(x, sigma, target), x0)


def test_an_unknown_prediction_type_is_named(batch):
    x0, noise = batch
    with pytest.raises(ValueError, match="prediction_type 'x_start'"):
        prediction_target(x0, noise, torch.tensor(0.5, dtype=torch.float64), prediction_type="x_start")
