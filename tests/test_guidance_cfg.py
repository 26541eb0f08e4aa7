"""Classifier-free guidance: one batched forward, diffusers' formula and ordering, rescale, padding."""
import diffusers
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from latentloom.samplers import SAMPLERS
from latentloom.samplers.denoiser import Denoiser
from latentloom.samplers.guidance import CFGDenoiser, merge_cond, rescale_guidance
from latentloom.samplers.noise import initial_latents, randn
from latentloom.samplers.schedules import DiscreteSchedule, ScheduleConfig, make_sigmas


class TextToyModel(torch.nn.Module):
    """eps/v model that reads a (masked) mean of the context; records its inputs."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(4, 4, generator=g) * 0.5
        self.proj = torch.randn(8, 4, generator=g)
        self.calls = []

    def forward(self, x, t, context, context_mask=None, class_labels=None):
        self.calls.append({"x": x, "t": t, "context": context, "context_mask": context_mask})
        if context_mask is None:
            pooled = context.mean(1)
        else:
            m = context_mask.to(context.dtype)[..., None]
            pooled = (context * m).sum(1) / m.sum(1)
        h = torch.einsum("oc,bchw->bohw", self.w, x) + (pooled @ self.proj)[:, :, None, None]
        return 0.9 * x + 0.3 * torch.tanh(h + torch.cos(t * 0.01)[:, None, None, None])


def setup(pred="epsilon"):
    schedule = DiscreteSchedule.from_config(ScheduleConfig(prediction_type=pred))
    model = TextToyModel()
    g = torch.Generator().manual_seed(1)
    cond = {"context": torch.randn(2, 6, 8, generator=g)}
    uncond = {"context": torch.randn(2, 6, 8, generator=g)}
    return schedule, model, Denoiser(model, schedule, prediction_type=pred), cond, uncond


def test_scale_one_is_the_conditional_denoiser_and_skips_uncond():
    schedule, model, denoiser, cond, uncond = setup()
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor(2.5)
    out = CFGDenoiser(denoiser, cond=cond, uncond=uncond, scale=1.0)(x, sigma)
    assert len(model.calls) == 1 and model.calls[0]["x"].shape[0] == 2
    assert torch.equal(out, denoiser(x, sigma, **cond))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_one_batched_forward_uncond_first_and_diffusers_formula(pred):
    schedule, model, denoiser, cond, uncond = setup(pred)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor(2.5)
    out = CFGDenoiser(denoiser, cond=cond, uncond=uncond, scale=7.5, rescale=0.0)(x, sigma)
    assert len(model.calls) == 1  # ONE forward of 2B
    call = model.calls[0]
    assert call["x"].shape[0] == 4 and torch.equal(call["context"], torch.cat([uncond["context"], cond["context"]]))
    # diffusers: noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond), then to x0
    e_u, e_c = denoiser.predict(x, sigma, **uncond), denoiser.predict(x, sigma, **cond)
    expected = denoiser.to_x0(x, sigma, e_u + 7.5 * (e_c - e_u))
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)


def test_rescale_equals_diffusers_rescale_noise_cfg():
    schedule, model, denoiser, cond, uncond = setup("v_prediction")
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor(4.0)
    out = CFGDenoiser(denoiser, cond=cond, uncond=uncond, scale=5.0, rescale=0.7)(x, sigma)
    v_u, v_c = denoiser.predict(x, sigma, **uncond), denoiser.predict(x, sigma, **cond)
    expected = denoiser.to_x0(x, sigma, rescale_noise_cfg(v_u + 5.0 * (v_c - v_u), v_c, guidance_rescale=0.7))
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)
    plain = CFGDenoiser(denoiser, cond=cond, uncond=uncond, scale=5.0)(x, sigma)
    assert not torch.allclose(out, plain)
    guided = torch.randn(2, 3, 4)
    assert torch.equal(rescale_guidance(guided, torch.randn(2, 3, 4), 0.0), guided)


def test_rescale_zero_equals_plain_cfg_on_any_denoiser():
    # wrapping a plain callable: guidance acts on x0
    den = lambda x, sigma, context: x * context.mean((1, 2))[:, None]  # noqa: E731
    c, u = {"context": torch.full((1, 3, 2), 2.0)}, {"context": torch.full((1, 3, 2), 1.0)}
    x = torch.randn(1, 5)
    out = CFGDenoiser(den, cond=c, uncond=u, scale=3.0, rescale=0.0)(x, torch.tensor(1.0))
    assert torch.allclose(out, x + 3.0 * (2 * x - x))


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim"])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_cfg_sampling_matches_a_diffusers_pipeline_loop(sampler, rescale):
    cls = {"euler": diffusers.EulerDiscreteScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
           "ddim": diffusers.DDIMScheduler}[sampler]
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
               timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False)
    ref = cls.from_config(cfg)
    ref.set_timesteps(8)
    schedule, model, denoiser, cond, uncond = setup()
    g = [torch.Generator().manual_seed(s) for s in (3, 4)]
    noise = randn((2, 4, 8, 8), generator=g)
    lat = noise * ref.init_noise_sigma
    ctx = torch.cat([uncond["context"], cond["context"]])
    for t in ref.timesteps:
        inp = ref.scale_model_input(torch.cat([lat] * 2), t)
        e_u, e_c = model(inp, t.reshape(1).float().expand(4), ctx).chunk(2)
        e = e_u + 6.0 * (e_c - e_u)
        if rescale:
            e = rescale_noise_cfg(e, e_c, guidance_rescale=rescale)
        lat = ref.step(e, t, lat).prev_sample
    sigmas = make_sigmas(schedule, 8, sampler=sampler, set_alpha_to_one=False)
    x = initial_latents(noise, sigmas, sampler=sampler)
    guided = CFGDenoiser(denoiser, cond=cond, uncond=uncond, scale=6.0, rescale=rescale)
    x = SAMPLERS[sampler](guided, x, sigmas)
    x = x / (1 + sigmas[-1] ** 2) ** 0.5 if sampler != "euler" else x
    assert (x - lat).abs().max() <= 1e-5


def test_different_context_lengths_are_padded_with_a_mask():
    schedule, model, denoiser, cond, _ = setup()
    uncond = {"context": torch.randn(1, 3, 8)}  # shorter and shared by the batch
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor(1.5)
    out = CFGDenoiser(denoiser, cond=cond, uncond=uncond, scale=4.0)(x, sigma)
    call = model.calls[-1]
    assert call["context"].shape == (4, 6, 8)
    assert torch.equal(call["context_mask"][:2], torch.tensor([[1, 1, 1, 0, 0, 0]] * 2))
    assert torch.equal(call["context_mask"][2:], torch.ones(2, 6, dtype=torch.long))
    # with the mask, padding changes nothing: equal to running the halves separately
    e_u = denoiser.predict(x, sigma, context=uncond["context"].expand(2, -1, -1))
    e_c = denoiser.predict(x, sigma, **cond)
    assert torch.allclose(out, denoiser.to_x0(x, sigma, e_u + 4.0 * (e_c - e_u)), atol=1e-6, rtol=0)


def test_merge_cond_keeps_given_masks_labels_and_concat():
    c = {"context": torch.ones(2, 4, 3), "context_mask": torch.tensor([[1, 1, 0, 0]] * 2), "class_labels": torch.tensor([1, 2]),
         "concat": torch.ones(2, 5, 4, 4)}
    u = {"context": torch.zeros(2, 2, 3), "class_labels": torch.tensor([0, 0]), "concat": torch.zeros(2, 5, 4, 4)}
    m = merge_cond(u, c, 2)
    assert m["context"].shape == (4, 4, 3)
    assert m["context_mask"].tolist() == [[1, 1, 0, 0]] * 2 + [[1, 1, 0, 0]] * 2
    assert m["class_labels"].tolist() == [0, 0, 1, 2] and m["concat"].shape == (4, 5, 4, 4)


def test_merge_cond_stacks_each_sides_vector_conditioning():
    """SDXL: the negative branch has its own y (negative prompt's pooled text, negative size numbers)."""
    c = {"context": torch.ones(2, 4, 3), "y": torch.full((2, 6), 1.0)}
    u = {"context": torch.zeros(2, 4, 3), "y": torch.full((1, 6), -1.0)}  # one shared by the batch
    m = merge_cond(u, c, 2)
    assert m["y"].tolist() == [[-1.0] * 6] * 2 + [[1.0] * 6] * 2


def test_cfg_errors():
    schedule, model, denoiser, cond, uncond = setup()
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="rescale must be in"):
        CFGDenoiser(denoiser, cond=cond, uncond=uncond, scale=5.0, rescale=1.5)
    with pytest.raises(ValueError, match=r"unknown keys \['prompt'\]"):
        CFGDenoiser(denoiser, cond={**cond, "prompt": "x"}, uncond=uncond, scale=5.0)(x, 1.0)
    with pytest.raises(ValueError, match="same keys"):
        CFGDenoiser(denoiser, cond={**cond, "class_labels": torch.zeros(2)}, uncond=uncond, scale=5.0)(x, 1.0)
    with pytest.raises(ValueError, match="differ in width"):
        CFGDenoiser(denoiser, cond=cond, uncond={"context": torch.zeros(2, 6, 5)}, scale=5.0)(x, 1.0)
    with pytest.raises(ValueError, match="uncond context has batch 3, expected 2"):
        CFGDenoiser(denoiser, cond=cond, uncond={"context": torch.zeros(3, 6, 8)}, scale=5.0)(x, 1.0)
