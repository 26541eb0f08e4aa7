"""SDXL's text encoder pair gives what diffusers' StableDiffusionXLPipeline.encode_prompt gives
(tiny encoders built here): penultimate layers concatenated, the second encoder's projected pooled
vector, prompt_2, negatives, force_zeros_for_empty_prompt, the refiner's single encoder."""
import pytest
import torch

from builders import sdxl_text_encoders, tiny_vae
from latentloom.text_encoders.clip import CLIPEncoder
from latentloom.text_encoders.sdxl import SDXL_CLIP_SKIP, SDXL_FINAL_LAYER_NORM, SDXLTextEncoders


def diffusers_sdxl(*, force_zeros: bool = True, refiner: bool = False):
    """A diffusers SDXL (or refiner) pipeline on the tiny encoders; its UNet is never run here."""
    import diffusers

    first, tok, second, tok2 = sdxl_text_encoders()
    context = 32 if refiner else 64
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2, cross_attention_dim=context, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + (5 if refiner else 6) * 8,
    )
    common = dict(vae=tiny_vae(), text_encoder_2=second, tokenizer_2=tok2, unet=unet,
                  scheduler=diffusers.EulerDiscreteScheduler())
    if refiner:
        return diffusers.StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None,
                                                          requires_aesthetics_score=True,
                                                          force_zeros_for_empty_prompt=force_zeros, **common)
    return diffusers.StableDiffusionXLPipeline(text_encoder=first, tokenizer=tok, force_zeros_for_empty_prompt=force_zeros,
                                               add_watermarker=False, **common)


def ours_for(pipe, *, force_zeros: bool = True) -> SDXLTextEncoders:
    kw = dict(clip_skip=SDXL_CLIP_SKIP, final_layer_norm=SDXL_FINAL_LAYER_NORM)
    first = CLIPEncoder(pipe.text_encoder, pipe.tokenizer, **kw) if pipe.text_encoder is not None else None
    return SDXLTextEncoders(first, CLIPEncoder(pipe.text_encoder_2, pipe.tokenizer_2, **kw),
                            force_zeros_for_empty_prompt=force_zeros)


def theirs(pipe, prompt, negative=None, prompt_2=None, negative_2=None):
    with torch.no_grad():
        return pipe.encode_prompt(prompt=prompt, prompt_2=prompt_2, device="cpu", num_images_per_prompt=1,
                                  do_classifier_free_guidance=True, negative_prompt=negative,
                                  negative_prompt_2=negative_2)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("force_zeros", [True, False])
def test_prompt_and_default_negative_match_diffusers(force_zeros):
    pipe = diffusers_sdxl(force_zeros=force_zeros)
    ours = ours_for(pipe, force_zeros=force_zeros)
    embeds, negative, pooled, negative_pooled = theirs(pipe, ["a red circle", "two blue stars"])
    cond, uncond = ours.encode_pair(["a red circle", "two blue stars"])
    assert cond.hidden.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
    close(cond.hidden, embeds)
    close(cond.pooled, pooled)
    close(uncond.hidden, negative)
    close(uncond.pooled, negative_pooled)
    assert bool((uncond.hidden == 0).all()) is force_zeros  # forced zeros, or the empty prompt's encoding


def test_negative_prompts_and_second_prompts_match_diffusers():
    pipe = diffusers_sdxl()
    ours = ours_for(pipe)
    args = dict(prompt=["a red circle"], negative=["blurry"], prompt_2=["a watercolor"], negative_2=["dark"])
    embeds, negative, pooled, negative_pooled = theirs(pipe, **args)
    cond, uncond = ours.encode_pair(["a red circle"], ["blurry"], prompts_2=["a watercolor"],
                                    negative_prompts_2=["dark"])
    for a, b in ((cond.hidden, embeds), (uncond.hidden, negative), (cond.pooled, pooled),
                 (uncond.pooled, negative_pooled)):
        close(a, b)
    # prompt_2 reaches only the second encoder's half of the features
    same_first = ours.encode(["a red circle"], ["something else"]).hidden
    assert torch.equal(same_first[..., :32], cond.hidden[..., :32])
    assert not torch.equal(same_first[..., 32:], cond.hidden[..., 32:])


def test_refiner_reads_the_second_encoder_only():
    pipe = diffusers_sdxl(refiner=True)
    ours = ours_for(pipe)
    assert ours.hidden_size == 32 and ours.pooled_size == 32
    embeds, negative, pooled, negative_pooled = theirs(pipe, ["a red circle"], negative=["blurry"])
    cond, uncond = ours.encode_pair(["a red circle"], ["blurry"])
    for a, b in ((cond.hidden, embeds), (uncond.hidden, negative), (cond.pooled, pooled),
                 (uncond.pooled, negative_pooled)):
        close(a, b)


def test_from_pretrained_reads_a_saved_sdxl_folder(tmp_path):
    pipe = diffusers_sdxl(force_zeros=False)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    ours = SDXLTextEncoders.from_pretrained(tmp_path)
    assert ours.force_zeros_for_empty_prompt is False and ours.hidden_size == 64
    embeds, _, pooled, _ = theirs(pipe, ["a red circle"])
    cond = ours.encode(["a red circle"])
    close(cond.hidden, embeds)
    close(cond.pooled, pooled)


def test_long_prompts_get_windows_on_both_encoders_and_errors_are_named():
    pipe = diffusers_sdxl()
    ours = ours_for(pipe)
    long = " ".join(["a red circle on a blue background"] * 20)
    emb = ours.encode([long, "short"])
    assert emb.hidden.shape[1] % 77 == 0 and emb.hidden.shape[1] > 77
    with pytest.raises(ValueError, match="got 2 prompts_2 for 1 prompts"):
        ours.encode(["a"], ["b", "c"])
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        SDXLTextEncoders(None, ours.encoder_1)
