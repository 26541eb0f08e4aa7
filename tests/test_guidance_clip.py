"""CLIP guidance (GLIDE-style) with a tiny transformers CLIPModel built from a config."""
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from latentloom.samplers import SAMPLERS
from latentloom.samplers.clip_guidance import CLIPGuidance, _features, make_cutouts
from latentloom.samplers.denoiser import Denoiser
from latentloom.samplers.guidance import CFGDenoiser
from latentloom.samplers.schedules import DiscreteSchedule, ScheduleConfig

IDS = torch.tensor([[1, 5, 9, 13, 2]])
SIGMAS = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.4, 0.0])


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    return CLIPModel(cfg).eval().requires_grad_(False)


PROJ = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)) * 0.5


def decode(z):
    """Stands in for the VAE decoder: latents (B, 4, 8, 8) -> images (B, 3, 32, 32) in [-1, 1]."""
    return torch.tanh(F.interpolate(torch.einsum("oc,bchw->bohw", PROJ, z), scale_factor=4, mode="bilinear"))


def gaussian(x, sigma):  # exact denoiser for data ~ N(0, 1)
    return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


def score(clip, latents):
    judge = CLIPGuidance(gaussian, clip_model=clip, decode=decode, scale=0.0, text_inputs={"input_ids": IDS},
                         num_cutouts=1, cut_power=0.0)  # one full-image cutout
    with torch.no_grad():
        return judge.similarity(decode(latents))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_clip_guidance_raises_similarity_with_every_solver(clip, name):
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 14.6

    options = {}
    if name in ("lcm", "tcd"):  # they also read each step's timestep: SD's schedule gives them
        from latentloom.samplers.consistency import consistency_options
        from latentloom.samplers.schedules import DiscreteSchedule, ScheduleConfig

        options = consistency_options(name, DiscreteSchedule.from_config(ScheduleConfig()), SIGMAS)

    def run(den):
        gens = [torch.Generator().manual_seed(i) for i in range(3)]
        return SAMPLERS[name](den, x, SIGMAS, generator=gens, **options)

    plain = run(gaussian)
    guided_den = CLIPGuidance(gaussian, clip_model=clip, decode=decode, scale=5.0, text_inputs={"input_ids": IDS},
                              num_cutouts=2)
    guided = run(guided_den)
    assert not guided.requires_grad and guided.grad_fn is None  # no graph kept across steps
    assert all(p.grad is None for p in clip.parameters())
    assert bool((score(clip, guided) > score(clip, plain)).all()), (score(clip, plain), score(clip, guided))


def test_gradient_through_denoiser_matches_x0_shortcut_for_unit_gaussian(clip):
    # for D(x) = x / (1 + sigma^2), grad_x = grad_x0 / (1 + sigma^2): both modes give the same shift
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor(3.0)
    kw = dict(clip_model=clip, decode=decode, scale=2.0, text_inputs={"input_ids": IDS})
    a = CLIPGuidance(gaussian, generator=torch.Generator().manual_seed(0), through_denoiser=True, **kw)(x, sigma)
    b = CLIPGuidance(gaussian, generator=torch.Generator().manual_seed(0), through_denoiser=False, **kw)(x, sigma)
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, gaussian(x, sigma.expand(2)))


def test_composes_with_cfg_and_a_denoiser(clip):
    class Model(torch.nn.Module):
        def forward(self, x, t, context):
            return 0.9 * x + 0.1 * context.mean((1, 2))[:, None, None, None]

    schedule = DiscreteSchedule.from_config(ScheduleConfig())
    den = CFGDenoiser(Denoiser(Model(), schedule, prediction_type="epsilon"),
                      cond={"context": torch.ones(2, 3, 4)}, uncond={"context": torch.zeros(2, 3, 4)}, scale=3.0)
    guided = CLIPGuidance(den, clip_model=clip, decode=decode, scale=1.0, text_inputs={"input_ids": IDS})
    out = SAMPLERS["euler"](guided, torch.randn(2, 4, 8, 8) * 14.6, SIGMAS)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_any_model_with_the_two_methods_works():
    class Duck:  # not a CLIPModel: returns plain tensors
        def get_text_features(self, input_ids):
            return torch.ones(1, 3)

        def get_image_features(self, pixel_values):
            return pixel_values.mean((2, 3))

    g = CLIPGuidance(gaussian, clip_model=Duck(), decode=decode, scale=1.0, text_inputs={"input_ids": IDS}, cut_size=8)
    assert g(torch.randn(1, 4, 8, 8), torch.tensor(2.0)).shape == (1, 4, 8, 8)


def test_cutouts_shape_and_batch_independence():
    images = torch.rand(3, 3, 32, 32)
    cuts = make_cutouts(images, cut_size=16, num_cutouts=4, generator=torch.Generator().manual_seed(0))
    alone = make_cutouts(images[1:2], cut_size=16, num_cutouts=4, generator=torch.Generator().manual_seed(0))
    assert cuts.shape == (12, 3, 16, 16)
    assert torch.equal(cuts.view(4, 3, 3, 16, 16)[:, 1], alone.view(4, 3, 16, 16))


def test_clip_guidance_errors(clip):
    class TextOnly:
        def get_text_features(self, input_ids):
            return torch.ones(1, 3)

    with pytest.raises(TypeError, match="must have a get_image_features"):
        CLIPGuidance(gaussian, clip_model=TextOnly(), decode=decode, scale=1.0, text_features=torch.ones(1, 16))
    with pytest.raises(ValueError, match="exactly one of text_features or text_inputs"):
        CLIPGuidance(gaussian, clip_model=clip, decode=decode, scale=1.0)
    with pytest.raises(ValueError, match="num_cutouts must be >= 1"):
        CLIPGuidance(gaussian, clip_model=clip, decode=decode, scale=1.0, text_features=torch.ones(1, 16), num_cutouts=0)
    g = CLIPGuidance(gaussian, clip_model=clip, decode=decode, scale=1.0, text_features=torch.ones(2, 16))
    with pytest.raises(ValueError, match="text_features has batch 2, expected 1 or 3"):
        g(torch.randn(3, 4, 8, 8), torch.tensor(1.0))
    with pytest.raises(TypeError, match="expected embeddings"):
        _features("not a tensor")
