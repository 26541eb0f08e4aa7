"""CLIPEncoder: Stable Diffusion parity, clip_skip, long prompts in windows, weights, cache, loading."""
import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from latentloom.text_encoders import CLIPEncoder

# Tiny CLIP text model and tokenizer, from configs and the vocabulary in tests/data (no hub).
DATA = Path(__file__).resolve().parent / "data"


def clip_tokenizer() -> CLIPTokenizer:
    """Character-level CLIP BPE (a few merges), lower case, 77-token window like SD's."""
    vocab = json.loads((DATA / "clip_vocab.json").read_text())
    lines = (DATA / "clip_merges.txt").read_text().splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#")]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def clip_config(**overrides) -> CLIPTextConfig:
    vocab_size = len(json.loads((DATA / "clip_vocab.json").read_text()))
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    kwargs.update(overrides)
    return CLIPTextConfig(**kwargs)


def clip_model(seed: int = 0, **overrides) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(clip_config(**overrides)).eval()


PROMPTS = ["a red cat", "the dog and the cat on a blue background, photo"]


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def model():
    return clip_model()


def padded_ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def tiny_sd_pipeline(text_encoder, tokenizer):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def test_equals_diffusers_encode_prompt(model, tokenizer):
    pipe = tiny_sd_pipeline(model, tokenizer)
    expected_cond, expected_uncond = pipe.encode_prompt(
        PROMPTS, torch.device("cpu"), 1, True, negative_prompt=["", "blurry"]
    )
    encoder = CLIPEncoder(model, tokenizer)
    cond, uncond = encoder.encode_pair(PROMPTS, ["", "blurry"])
    assert cond.hidden.shape == expected_cond.shape == (2, 77, 32)
    assert torch.equal(cond.hidden, expected_cond)
    assert torch.equal(uncond.hidden, expected_uncond)
    # mask: start token, text, end token
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) + 2 for p in PROMPTS]
    assert cond.mask.sum(1).tolist() == lengths
    assert cond.mask.dtype == torch.long and cond.mask[0, : lengths[0]].eq(1).all()
    # and the same prompts encoded alone (a fresh encoder, no cache) give the same numbers
    alone = CLIPEncoder(model, tokenizer, cache_size=0).encode([PROMPTS[1]])
    torch.testing.assert_close(alone.hidden[0], expected_cond[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_follows_diffusers_steps(model, tokenizer, clip_skip):
    # diffusers 0.42.1's own clip_skip path calls text_encoder.text_model.final_layer_norm, which
    # transformers 5 no longer has on CLIPTextModel; so reproduce its documented steps here.
    ids = padded_ids(tokenizer, PROMPTS)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        expected = model.final_layer_norm(out[-1][-(clip_skip + 1)])
    got = CLIPEncoder(model, tokenizer, clip_skip=clip_skip).encode(PROMPTS)
    assert torch.equal(got.hidden, expected)
    last = CLIPEncoder(model, tokenizer, clip_skip=None).encode(PROMPTS)
    assert torch.equal(last.hidden, out.last_hidden_state)
    assert not torch.allclose(got.hidden, last.hidden)


def test_sdxl_style_penultimate_layer_without_final_norm(model, tokenizer):
    ids = padded_ids(tokenizer, PROMPTS)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states[-2]
    got = CLIPEncoder(model, tokenizer, clip_skip=1, final_layer_norm=False).encode(PROMPTS)
    assert torch.equal(got.hidden, expected)


def test_with_projection_pools_text_embeds(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(clip_config(projection_dim=24)).eval()
    ids = padded_ids(tokenizer, PROMPTS)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    emb = CLIPEncoder(model, tokenizer, clip_skip=1).encode(PROMPTS)
    assert emb.pooled.shape == (2, 24) and torch.equal(emb.pooled, out.text_embeds)
    assert torch.equal(emb.hidden, model.text_model.final_layer_norm(out.hidden_states[-2]))
    # from_pretrained picks the class from config.json's architectures (SDXL's text_encoder_2)
    model.save_pretrained(tmp_path / "text_encoder_2")
    tokenizer.save_pretrained(tmp_path / "tokenizer_2")
    loaded = CLIPEncoder.from_pretrained(
        tmp_path, clip_skip=1, text_encoder_subfolder="text_encoder_2", tokenizer_subfolder="tokenizer_2"
    )
    assert isinstance(loaded.model, CLIPTextModelWithProjection)
    assert torch.equal(loaded.encode(PROMPTS).pooled, out.text_embeds)


def test_pooled_is_the_first_windows_pooler_output(model, tokenizer):
    ids = padded_ids(tokenizer, PROMPTS)
    with torch.no_grad():
        expected = model(ids).pooler_output
    emb = CLIPEncoder(model, tokenizer, clip_skip=1).encode(PROMPTS)
    assert torch.equal(emb.pooled, expected)


def test_empty_prompt_is_diffusers_unconditional(model, tokenizer):
    emb = CLIPEncoder(model, tokenizer).encode([""])
    with torch.no_grad():
        expected = model(padded_ids(tokenizer, [""])).last_hidden_state
    assert torch.equal(emb.hidden, expected)
    assert emb.mask.sum().item() == 2


def long_prompt(tokenizer, n_tokens):
    # the tiny tokenizer is character-level: "ab " is two tokens ("a", "b</w>")
    text = " ".join(["ab"] * (n_tokens // 2))
    assert len(tokenizer(text, add_special_tokens=False).input_ids) == n_tokens
    return text


def test_300_token_prompt_is_split_into_windows(model, tokenizer):
    text = long_prompt(tokenizer, 300)  # 150 words of 2 tokens
    encoder = CLIPEncoder(model, tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be cut
        emb = encoder.encode([text])
    # a window holds 75 tokens; cutting after 75 would split a word, so each takes 37 words
    per_window = 74
    windows = math.ceil(300 / per_window)
    assert emb.hidden.shape == (1, 77 * windows, 32)
    assert emb.mask.sum().item() == 300 + 2 * windows  # every token, plus start/end per window
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for w in range(windows):
        chunk = [bos] + ids[per_window * w : per_window * (w + 1)] + [eos]
        chunk = chunk + [tokenizer.pad_token_id] * (77 - len(chunk))
        with torch.no_grad():
            expected = model(torch.tensor([chunk])).last_hidden_state[0]
        torch.testing.assert_close(emb.hidden[0, 77 * w : 77 * (w + 1)], expected, rtol=0, atol=1e-6)


def test_windows_keep_words_whole_unless_a_word_is_very_long(tokenizer):
    encoder = CLIPEncoder(clip_model(), tokenizer)
    ids = tokenizer(long_prompt(tokenizer, 160), add_special_tokens=False).input_ids
    assert encoder._spans(ids) == [(0, 74), (74, 148), (148, 160)]
    # one 100-letter word: no word end within 8 tokens of the cut, so it is split at 75
    ids = tokenizer("x" * 100, add_special_tokens=False).input_ids
    assert len(ids) == 100 and encoder._spans(ids) == [(0, 75), (75, 100)]
    assert encoder._spans([]) == [(0, 0)]


def test_batch_is_padded_with_empty_prompt_windows(model, tokenizer):
    encoder = CLIPEncoder(model, tokenizer)
    text = long_prompt(tokenizer, 160)  # three windows
    emb = encoder.encode(["a cat", text])
    assert emb.hidden.shape == (2, 231, 32)
    empty = encoder.encode([""]).hidden[0]  # (77, D)
    assert torch.equal(emb.hidden[0, 77:154], empty) and torch.equal(emb.hidden[0, 154:], empty)
    assert emb.mask[0, 77:].eq(0).all()
    torch.testing.assert_close(emb.hidden[0, :77], encoder.encode(["a cat"]).hidden[0], rtol=0, atol=1e-6)


def test_encode_pair_pads_cond_and_uncond_to_the_same_length(model, tokenizer):
    encoder = CLIPEncoder(model, tokenizer)
    text = long_prompt(tokenizer, 100)
    cond, uncond = encoder.encode_pair([text, "a cat"], "blurry")
    assert cond.hidden.shape == uncond.hidden.shape == (2, 154, 32)
    assert torch.equal(uncond.hidden[0], uncond.hidden[1])
    torch.testing.assert_close(uncond.hidden[:, :77], encoder.encode(["blurry"] * 2).hidden, rtol=0, atol=1e-6)
    _, uncond = encoder.encode_pair(["a cat"])
    assert torch.equal(uncond.hidden, encoder.encode([""]).hidden)
    with pytest.raises(ValueError, match="got 1 negative prompts for 2 prompts"):
        encoder.encode_pair(["a", "b"], ["c"])
    with pytest.raises(TypeError, match=r"prompts\[0\] must be a str"):
        encoder.encode_pair(["a"], [None])


def test_unweighted_prompt_is_identical_to_plain_path(model, tokenizer):
    weighted = CLIPEncoder(model, tokenizer, weighting=True).encode(PROMPTS)
    plain = CLIPEncoder(model, tokenizer, weighting=False).encode(PROMPTS)
    assert torch.equal(weighted.hidden, plain.hidden) and torch.equal(weighted.mask, plain.mask)


@pytest.mark.parametrize("weight", [1.5, 0.0, -1.0])
def test_weight_moves_tokens_away_from_the_empty_prompt(model, tokenizer, weight):
    encoder = CLIPEncoder(model, tokenizer)
    plain = encoder.encode(["a red cat"]).hidden[0]
    weighted = encoder.encode([f"a (red:{weight}) cat"]).hidden[0]
    empty = encoder.encode([""]).hidden[0]
    n_red = len(tokenizer("red", add_special_tokens=False).input_ids)
    red = slice(2, 2 + n_red)  # [bos, "a</w>", <tokens of "red">, <tokens of "cat">, eos, pad...]
    expected = empty[red] + (plain[red] - empty[red]) * weight
    torch.testing.assert_close(weighted[red], expected)
    keep = torch.ones(77, dtype=torch.bool)
    keep[red] = False
    assert torch.equal(weighted[keep], plain[keep])


def test_weighting_can_be_turned_off(model, tokenizer):
    raw = CLIPEncoder(model, tokenizer, weighting=False).encode(["a (red) cat"])
    with torch.no_grad():
        expected = model(padded_ids(tokenizer, ["a (red) cat"])).last_hidden_state
    assert torch.equal(raw.hidden, expected)


class CallCounter:
    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1


def test_cache_skips_the_model_for_a_repeated_prompt(tokenizer):
    model = clip_model()
    counter = CallCounter(model)
    encoder = CLIPEncoder(model, tokenizer, cache_size=2)
    first = encoder.encode(["a cat"])
    calls = counter.calls
    again = encoder.encode(["a cat"])
    assert counter.calls == calls
    assert torch.equal(first.hidden, again.hidden)
    # callers get copies: writing into a result does not change the cache
    again.hidden.zero_()
    assert torch.equal(encoder.encode(["a cat"]).hidden, first.hidden)
    # a batch reuses what it can and encodes only the rest, once per distinct prompt
    encoder.encode(["a cat", "a dog", "a dog"])
    assert counter.calls == calls + 1
    # LRU of 2: "a cat" and "a dog" are in; "a cow" evicts "a cat" (least recently used)
    encoder.encode(["a cow"])
    calls = counter.calls
    encoder.encode(["a dog"])
    assert counter.calls == calls
    encoder.encode(["a cat"])
    assert counter.calls == calls + 1


def test_cache_key_includes_settings_and_can_be_disabled(tokenizer):
    model = clip_model()
    counter = CallCounter(model)
    encoder = CLIPEncoder(model, tokenizer)
    last = encoder.encode(["a cat"])
    calls = counter.calls
    encoder.clip_skip = 1
    skipped = encoder.encode(["a cat"])
    assert counter.calls > calls and not torch.allclose(last.hidden, skipped.hidden)
    # the padding / weight reference (empty prompt window) follows the new setting too
    assert torch.equal(skipped.filler, CLIPEncoder(model, tokenizer, clip_skip=1).encode([""]).hidden[0])
    assert not torch.equal(last.filler, skipped.filler)
    uncached = CLIPEncoder(model, tokenizer, cache_size=0)
    uncached.encode(["a cat"])
    calls = counter.calls
    uncached.encode(["a cat"])
    assert counter.calls == calls + 1
    calls = counter.calls
    encoder.clear_cache()
    encoder.encode(["a cat"])
    assert counter.calls > calls


def test_frozen_eval_no_grad(tokenizer):
    model = clip_model(attention_dropout=0.5, dropout=0.5)
    encoder = CLIPEncoder(model, tokenizer, cache_size=0)
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    model.train()  # e.g. a training loop toggling modes: the encoder stays in eval
    with torch.enable_grad():
        a = encoder.encode(["a cat"])
    b = encoder.encode(["a cat"])
    assert not model.training
    assert torch.equal(a.hidden, b.hidden)
    assert not a.hidden.requires_grad and a.hidden.grad_fn is None


def test_to_moves_and_casts_and_reports(tokenizer):
    encoder = CLIPEncoder(clip_model(), tokenizer)
    fp32 = encoder.encode(["a cat"])
    assert encoder.device == torch.device("cpu") and encoder.dtype == torch.float32 and encoder.hidden_size == 32
    assert encoder.to(dtype=torch.float64) is encoder
    fp64 = encoder.encode(["a cat"])  # not the fp32 result from the cache
    assert encoder.dtype == torch.float64 and fp64.hidden.dtype == torch.float64 and fp64.pooled.dtype == torch.float64
    assert fp64.mask.dtype == torch.long
    torch.testing.assert_close(fp64.hidden.float(), fp32.hidden, rtol=1e-4, atol=1e-5)
    assert fp64.filler.dtype == torch.float64


@pytest.mark.parametrize("bad", [3, -1, True, 1.0, "1"])
def test_bad_clip_skip(model, tokenizer, bad):
    with pytest.raises(ValueError, match=r"clip_skip must be an int in \[0, 2\]"):
        CLIPEncoder(model, tokenizer, clip_skip=bad)


def test_bad_constructor_arguments(model, tokenizer):
    with pytest.raises(TypeError, match="model must be a transformers model"):
        CLIPEncoder(None, tokenizer)
    with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer"):
        CLIPEncoder(model, None)
    with pytest.raises(ValueError, match="cache_size must be an int >= 0"):
        CLIPEncoder(model, tokenizer, cache_size=-1)


def test_tokenizer_without_start_token(model):
    broken = clip_tokenizer()
    broken.bos_token = None
    with pytest.raises(ValueError, match="a CLIP tokenizer needs bos and eos tokens, got bos=None eos=1"):
        CLIPEncoder(model, broken)


def test_window_too_short_for_text(tokenizer):
    with pytest.raises(ValueError, match="leaves no room for text"):
        CLIPEncoder(clip_model(max_position_embeddings=2), tokenizer)


# ---- loading from a folder ------------------------------------------------------------------
def test_from_pretrained_diffusers_layout(tmp_path, model, tokenizer):
    model.save_pretrained(tmp_path / "text_encoder")
    # an SD folder's tokenizer/ holds vocab.json + merges.txt (no tokenizer.json)
    (tmp_path / "tokenizer").mkdir()
    shutil.copy(DATA / "clip_vocab.json", tmp_path / "tokenizer" / "vocab.json")
    shutil.copy(DATA / "clip_merges.txt", tmp_path / "tokenizer" / "merges.txt")
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 77}')
    loaded = CLIPEncoder.from_pretrained(tmp_path, clip_skip=1)
    assert loaded.clip_skip == 1 and loaded.window_length == 77
    expected = CLIPEncoder(model, tokenizer, clip_skip=1).encode(PROMPTS)
    got = loaded.encode(PROMPTS)
    assert torch.equal(got.hidden, expected.hidden) and torch.equal(got.mask, expected.mask)
    fp64 = CLIPEncoder.from_pretrained(tmp_path, dtype=torch.float64)
    assert fp64.dtype == torch.float64


def test_from_pretrained_flat_folder(tmp_path, model, tokenizer):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    got = CLIPEncoder.from_pretrained(tmp_path).encode(PROMPTS)
    assert torch.equal(got.hidden, CLIPEncoder(model, tokenizer).encode(PROMPTS).hidden)


def test_from_pretrained_errors(tmp_path, model, tokenizer):
    with pytest.raises(FileNotFoundError, match="needs a folder"):
        CLIPEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no CLIP text model"):
        CLIPEncoder.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path / "text_encoder")
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer"):
        CLIPEncoder.from_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    weights = tmp_path / "text_encoder" / "model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), tmp_path / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ValueError, match=r"only pickle weights \['pytorch_model.bin'\].*allow_pickle=True"):
        CLIPEncoder.from_pretrained(tmp_path)
    opted_in = CLIPEncoder.from_pretrained(tmp_path, allow_pickle=True)
    assert torch.equal(opted_in.encode(PROMPTS).hidden, CLIPEncoder(model, tokenizer).encode(PROMPTS).hidden)
    (tmp_path / "text_encoder" / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights \(\*.safetensors\)"):
        CLIPEncoder.from_pretrained(tmp_path)


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, error, message",
    [
        (None, TypeError, r'prompts must be a list of str \(use \[""\] for the unconditional embedding\), got None'),
        (5, TypeError, "prompts must be a list of str, got int: 5"),
        ({"a": 1}, TypeError, "prompts must be a list of str, got dict"),
        (["a cat", 3], TypeError, r"prompts\[1\] must be a str, got int: 3"),
        (["a cat", None], TypeError, r"prompts\[1\] must be a str, got NoneType"),
        ([b"bytes"], TypeError, r"prompts\[0\] must be a str, got bytes"),
        ([], ValueError, "prompts is an empty list"),
    ],
)
def test_bad_prompts(model, tokenizer, bad, error, message):
    with pytest.raises(error, match=message):
        CLIPEncoder(model, tokenizer).encode(bad)


def test_a_str_or_tuple_is_accepted(model, tokenizer):
    encoder = CLIPEncoder(model, tokenizer)
    listed = encoder.encode(["a cat"]).hidden
    assert torch.equal(encoder.encode("a cat").hidden, listed)
    assert torch.equal(encoder.encode(("a cat",)).hidden, listed)
