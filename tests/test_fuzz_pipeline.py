"""Property test over the pipeline arguments (hypothesis, a tiny model, at most 3 steps): every call
returns valid images, or raises a documented ValueError / TypeError before making any."""
import math

import numpy as np
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from latentloom.samplers import SAMPLERS

PROPERTY = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MISSING = object()  # leave the argument out


# name: (valid values, invalid values); MISSING leaves the argument out
ARGUMENTS = dict(
    prompt=(st.one_of(st.text(max_size=30), st.lists(st.text(max_size=12), min_size=1, max_size=2),
                      st.sampled_from(["(weighted:1.4) [less]", "x" * 400])),
            st.sampled_from([[], None, 3, b"bytes", ["ok", None], "bad \ud800"])),
    negative_prompt=(st.one_of(st.sampled_from([MISSING, None, [""]]), st.text(max_size=10)),
                     st.sampled_from([["a", "b", "c"], 5])),
    num_inference_steps=(st.sampled_from([MISSING, 1, 2, 3]), st.sampled_from([0, -1, 2.0, "2", None, 10**6])),
    guidance_scale=(st.sampled_from([MISSING, 0.0, 1.0, 4.5, 7]),
                    st.sampled_from([math.nan, math.inf, -1.0, "7", None])),
    guidance_rescale=(st.sampled_from([MISSING, 0.0, 0.7]), st.sampled_from([1.5, -0.1, math.nan, "0.5"])),
    height=(st.sampled_from([MISSING, 2, 8, 16, 24]), st.sampled_from([0, -8, 15, 16.0, "16", None, True, 2**40])),
    width=(st.sampled_from([MISSING, 2, 8, 16]), st.sampled_from([0, 9, -2, 8.5])),
    sampler=(st.sampled_from([MISSING, *sorted(SAMPLERS)]), st.sampled_from(["nope", 3, ""])),
    karras_sigmas=(st.sampled_from([MISSING, None, True, False]), st.sampled_from(["yes", 1])),
    seed=(st.sampled_from([MISSING, 0, 7, 2**31]), st.sampled_from([-1, 1.5, "3", 2**64])),
    num_images_per_prompt=(st.sampled_from([MISSING, 1, 2]), st.sampled_from([0, 65, 1.0])),
    output_type=(st.sampled_from([MISSING, "np", "pil", "latent"]), st.sampled_from(["jpeg", None])),
    clip_guidance_scale=(st.sampled_from([MISSING, 0.0]), st.sampled_from([1.0, math.nan])),
)


@st.composite
def calls(draw):
    """Half the calls are valid throughout; the others break one or two arguments."""
    names = sorted(ARGUMENTS)
    broken = draw(st.one_of(st.just(()), st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True)))
    values = {name: draw(ARGUMENTS[name][name in broken]) for name in names}
    return {k: v for k, v in values.items() if v is not MISSING}


@PROPERTY
@given(kwargs=calls())
def test_every_call_gives_images_or_a_documented_error(pipe, kwargs):
    prompt = kwargs.pop("prompt")
    # keep the model's defaults small: they are a 512 image and 30 steps for real models
    kwargs.setdefault("height", 16)
    kwargs.setdefault("width", 16)
    kwargs.setdefault("num_inference_steps", 2)
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = pipe(prompt, progress=False, **kwargs)
    except (ValueError, TypeError) as err:
        event(f"refused: {type(err).__name__}")
        assert str(err)  # a message, naming what was wrong
        # only the prompt-weighting check happens at encoding time; every other one before the model
        assert not calls or "prompt weight" in str(err)
        return
    finally:
        handle.remove()
    event("images")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    batch = len(prompts) * kwargs.get("num_images_per_prompt", 1)
    height, width = kwargs["height"], kwargs["width"]
    assert len(out.recipes) == batch
    output_type = kwargs.get("output_type", "pil")
    if output_type == "latent":
        f = pipe.vae_scale_factor
        assert out.images.shape == (batch, 4, height // f, width // f) and torch.isfinite(out.images).all()
        return
    images = out.images if output_type == "np" else np.stack([np.asarray(i, dtype=np.float32) / 255 for i in out.images])
    assert images.shape == (batch, height, width, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
