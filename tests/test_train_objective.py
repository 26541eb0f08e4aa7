"""Training pieces that need no model: the DDPM objective, min-SNR, LR schedule, data order, config."""
import math

import pytest
import torch

from latentloom.training.config import TrainConfig
from latentloom.training.data_order import PositionedDataset, StreamBatchSampler
from latentloom.training.lr_schedule import lr_factor, make_lr_scheduler
from latentloom.training.objective import add_noise, diffusion_loss, min_snr_weight


def linear_alphas_cumprod(T=1000):
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noised_batch_is_consistent(prediction_type):
    ac = linear_alphas_cumprod()
    x0 = torch.randn(4, 3, 8, 8)
    b = add_noise(x0, alphas_cumprod=ac, prediction_type=prediction_type, generator=torch.Generator().manual_seed(0))
    ab = ac[b.t].float().view(-1, 1, 1, 1)
    eps = (b.x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
    if prediction_type == "epsilon":
        torch.testing.assert_close(b.target, eps, atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(b.target, ab.sqrt() * eps - (1 - ab).sqrt() * x0, atol=1e-4, rtol=1e-4)
        # x0 = sqrt(ab) x_t - sqrt(1 - ab) v
        torch.testing.assert_close(ab.sqrt() * b.x_t - (1 - ab).sqrt() * b.target, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.snr, (ab / (1 - ab)).flatten())


def test_noise_offset_shifts_channel_means():
    ac = torch.full((10,), 0.5, dtype=torch.float64)
    x0 = torch.zeros(64, 2, 16, 16)
    plain = add_noise(x0, alphas_cumprod=ac, prediction_type="epsilon", generator=torch.Generator().manual_seed(0))
    offset = add_noise(x0, alphas_cumprod=ac, prediction_type="epsilon", generator=torch.Generator().manual_seed(0),
                       noise_offset=1.0)
    # the spread of per-image channel means grows from ~1/16 to ~1
    assert plain.target.mean((2, 3)).std() < 0.2
    assert offset.target.mean((2, 3)).std() > 0.6


def test_min_snr_weights():
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0])
    torch.testing.assert_close(min_snr_weight(snr, gamma=5.0, prediction_type="epsilon"),
                               torch.tensor([1.0, 1.0, 1.0, 0.1]))
    torch.testing.assert_close(min_snr_weight(snr, gamma=5.0, prediction_type="v_prediction"),
                               torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 51]))
    with pytest.raises(ValueError, match="x0"):
        min_snr_weight(snr, gamma=5.0, prediction_type="x0")


def test_diffusion_loss_is_zero_for_the_perfect_predictor_and_weights_apply():
    ac = linear_alphas_cumprod()
    x0 = torch.randn(8, 3, 4, 4)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    captured = {}

    def oracle(x_t, t):
        ab = ac[t].float().view(-1, 1, 1, 1)
        captured["t"] = t
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    assert diffusion_loss(oracle, x0, alphas_cumprod=ac, prediction_type="epsilon", generator=gen()) < 1e-6
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    plain = diffusion_loss(zero, x0, alphas_cumprod=ac, prediction_type="epsilon", generator=gen())
    weighted = diffusion_loss(zero, x0, alphas_cumprod=ac, prediction_type="epsilon", generator=gen(), min_snr_gamma=1.0)
    assert weighted < plain
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_loss(zero, x0, alphas_cumprod=ac, prediction_type="sample", generator=gen())


def test_x0_weighting_scores_the_implied_x0_error():
    ac = linear_alphas_cumprod()
    x0 = torch.randn(8, 3, 4, 4)
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    seen = {}

    def off_by_one(x_t, t):  # the true v plus 1 everywhere: x0_hat is off by sqrt(1 - alpha_bar)
        ab = ac[t].float().view(-1, 1, 1, 1)
        seen["ab"] = ab.flatten()
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0 + 1.0

    plain = diffusion_loss(off_by_one, x0, alphas_cumprod=ac, prediction_type="v_prediction", generator=gen())
    weighted = diffusion_loss(off_by_one, x0, alphas_cumprod=ac, prediction_type="v_prediction", generator=gen(),
                              x0_weighting=True)
    assert abs(plain.item() - 1.0) < 1e-5
    # (x0_hat - x0)^2 = 1 - alpha_bar per element: the mean over the batch of 1 - alpha_bar
    assert abs(weighted.item() - (1 - seen["ab"]).mean().item()) < 1e-5
    for bad in ({"prediction_type": "epsilon"}, {"prediction_type": "v_prediction", "min_snr_gamma": 5.0}):
        with pytest.raises(ValueError, match="x0_weighting needs prediction_type='v_prediction' and no min_snr_gamma"):
            diffusion_loss(off_by_one, x0, alphas_cumprod=ac, generator=gen(), x0_weighting=True,
                           **{"prediction_type": "v_prediction", **bad})


def test_lr_schedules():
    assert lr_factor(0, kind="cosine", warmup_steps=4, total_steps=14) == pytest.approx(0.25)
    assert lr_factor(3, kind="cosine", warmup_steps=4, total_steps=14) == pytest.approx(1.0)
    assert lr_factor(9, kind="cosine", warmup_steps=4, total_steps=14) == pytest.approx(0.5)
    assert lr_factor(14, kind="cosine", warmup_steps=4, total_steps=14) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(100, kind="constant", warmup_steps=4, total_steps=14) == 1.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = make_lr_scheduler(opt, kind="cosine", warmup_steps=0, total_steps=2)
    assert opt.param_groups[0]["lr"] == 2.0
    opt.step(); sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="linear"):
        make_lr_scheduler(opt, kind="linear", warmup_steps=0, total_steps=2)


def test_stream_sampler_covers_each_epoch_and_resumes_anywhere():
    sampler = StreamBatchSampler(10, batch_size=3, seed=7)
    full = iter(sampler)
    batches = [sampler.indices(next(full)) for _ in range(10)]  # 30 items = 3 epochs
    stream = [i for b in batches for i in b]
    for epoch in range(3):
        assert sorted(stream[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # reshuffled each epoch
    resumed = iter(StreamBatchSampler(10, batch_size=3, seed=7, position=12))
    assert [sampler.indices(next(resumed)) for _ in range(6)] == batches[4:]
    # two processes split each global batch
    r0 = iter(StreamBatchSampler(10, batch_size=3, seed=7, rank=0, world_size=2))
    r1 = iter(StreamBatchSampler(10, batch_size=3, seed=7, rank=1, world_size=2))
    merged = sampler.indices([i for _ in range(5) for i in next(r0) + next(r1)])
    assert merged == stream


def test_stream_sampler_errors():
    with pytest.raises(ValueError, match="empty"):
        StreamBatchSampler(0, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="rank"):
        StreamBatchSampler(4, batch_size=1, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="multiple"):
        StreamBatchSampler(4, batch_size=2, seed=0, position=3)


def test_config_validation():
    assert TrainConfig(data="d").model == "unet"
    for bad, match in [
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"prediction_type": "x0"}, "prediction_type"),
        ({"model": "gan"}, "model"),
        ({"steps": 0}, "steps"),
        ({"caption_dropout": 1.5}, "caption_dropout"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"min_snr_gamma": 0.0}, "min_snr_gamma"),
        ({"lr": 0.0}, "lr"),
        ({"noise_offset": -1.0}, "noise_offset"),
        ({"lora_rank": 4, "model": "vae"}, "LoRA trains the UNet"),
        ({"lora_rank": 4}, "pretrained"),
        ({"crop": "left"}, "crop"),
        ({"beta_schedule": "cosine"}, "beta_schedule"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"threads": 0}, "threads"),
        ({"stop_after": 0}, "stop_after"),
        ({"x0_weighting": True}, "x0_weighting needs prediction_type='v_prediction'"),
        ({"x0_weighting": True, "prediction_type": "v_prediction", "min_snr_gamma": 5.0}, "and no min_snr_gamma"),
    ]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(data="d", **bad)
    with pytest.raises(ValueError, match="needs data"):
        TrainConfig()
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"data": "d", "learning_rate": 1.0})
    cfg = TrainConfig(data="d", steps=3)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert math.isclose(cfg.lr, 1e-4)


def test_positioned_dataset_sets_the_epoch_before_reading():
    class Recorder:
        epoch = 0

        def __len__(self):
            return 4

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __getitem__(self, index):
            return (self.epoch, index)

    ds = PositionedDataset(Recorder(), num_items=4, seed=3)
    order = StreamBatchSampler(4, batch_size=1, seed=3)
    assert [ds[p] for p in range(9)] == [(p // 4, order.index_at(p)) for p in range(9)]
