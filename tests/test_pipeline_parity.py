"""latentloom's pipeline on a diffusers Stable Diffusion folder gives diffusers' images."""
import numpy as np
import pytest
import torch

from builders import use_scheduler

SAMPLERS = ["ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]


def diffusers_images(pipe, sampler, **kwargs):
    use_scheduler(pipe, sampler)
    return pipe(output_type="np", **kwargs).images


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_images_as_diffusers(reference, ours, sampler):
    pipe, _ = reference
    args = dict(prompt=["a red circle", "a blue square on green"], num_inference_steps=6, guidance_scale=5.0,
                height=32, width=32, negative_prompt=["", "blurry"])
    expected = diffusers_images(pipe, sampler, generator=torch.Generator().manual_seed(3), **args)
    got = ours(**args, sampler=sampler, generator=torch.Generator().manual_seed(3), output_type="np",
               progress=False).images
    assert got.shape == expected.shape == (2, 32, 32, 3)
    assert np.abs(got - expected).max() < 1e-4


def test_same_images_with_guidance_rescale_and_generator_list(reference, ours):
    pipe, _ = reference
    args = dict(prompt="a star", num_inference_steps=5, guidance_scale=7.0, guidance_rescale=0.7, height=24,
                width=40, num_images_per_prompt=2)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (10, 11)]  # noqa: E731
    expected = diffusers_images(pipe, "euler_a", generator=gens(), **args)
    got = ours(**args, sampler="euler_a", generator=gens(), output_type="np", progress=False).images
    assert np.abs(got - expected).max() < 1e-4


def test_same_images_without_guidance(reference, ours):
    pipe, _ = reference
    args = dict(prompt="a circle", num_inference_steps=4, guidance_scale=1.0, height=16, width=16)
    expected = diffusers_images(pipe, "dpmpp_2m", generator=torch.Generator().manual_seed(0), **args)
    got = ours(**args, sampler="dpmpp_2m", generator=torch.Generator().manual_seed(0), output_type="np",
               progress=False).images
    assert np.abs(got - expected).max() < 1e-4


def test_karras_sigmas_match_diffusers(reference, ours):
    pipe, _ = reference
    args = dict(prompt="a circle", num_inference_steps=5, guidance_scale=4.0, height=16, width=16)
    use_scheduler(pipe, "dpmpp_2m")
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, use_karras_sigmas=True)
    expected = pipe(generator=torch.Generator().manual_seed(1), output_type="np", **args).images
    got = ours(**args, sampler="dpmpp_2m", karras_sigmas=True, generator=torch.Generator().manual_seed(1),
               output_type="np", progress=False).images
    assert np.abs(got - expected).max() < 1e-4
