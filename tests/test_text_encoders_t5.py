"""T5Encoder: attention mask honoured, padding zeroed, one window with a warning when cut."""
import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from latentloom.text_encoders import T5Encoder

# Tiny T5 encoder and tokenizer, from a config and the vocabulary in tests/data (no hub).
DATA = Path(__file__).resolve().parent / "data"
PROMPTS = ["the red cat on a blue Background", "a dog", ""]


def t5_tokenizer() -> T5Tokenizer:
    """Unigram vocabulary of single characters and a few words (<pad>=0, </s>=1, <unk>=2)."""
    pieces = json.loads((DATA / "t5_vocab.json").read_text(encoding="utf-8"))
    return T5Tokenizer(vocab=[(piece, float(score)) for piece, score in pieces], extra_ids=0)


def t5_model(seed: int = 0) -> T5EncoderModel:
    vocab_size = len(json.loads((DATA / "t5_vocab.json").read_text(encoding="utf-8")))
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.5,  # dropout > 0: eval mode must matter
    )
    return T5EncoderModel(config)


@pytest.fixture(scope="module")
def tokenizer():
    return t5_tokenizer()


@pytest.fixture(scope="module")
def model():
    return t5_model()


def test_equals_the_model_with_its_attention_mask(model, tokenizer):
    encoder = T5Encoder(model, tokenizer, max_length=64)
    emb = encoder.encode(PROMPTS)
    inputs = tokenizer(PROMPTS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        expected = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).last_hidden_state
    expected = expected * inputs.attention_mask[..., None]
    assert emb.hidden.shape == (3, inputs.input_ids.shape[1], 32) and emb.pooled is None
    assert torch.equal(emb.mask, inputs.attention_mask)
    torch.testing.assert_close(emb.hidden, expected, rtol=0, atol=1e-6)
    assert emb.hidden[emb.mask == 0].eq(0).all()  # padded positions zeroed
    assert emb.mask[2].sum() == 1  # the empty prompt is just </s>
    assert encoder.hidden_size == 32 and encoder.dtype == torch.float32


def test_padding_does_not_change_real_tokens(model, tokenizer):
    encoder = T5Encoder(model, tokenizer, cache_size=0)
    alone = encoder.encode(["a dog"])
    batched = encoder.encode(["a dog", "the red cat on a blue background and a dog"])
    n = alone.hidden.shape[1]
    torch.testing.assert_close(batched.hidden[0, :n], alone.hidden[0], rtol=0, atol=1e-6)
    assert batched.hidden[0, n:].eq(0).all() and batched.mask[0, n:].eq(0).all()


def test_300_token_prompt_fits_in_the_default_window(model, tokenizer):
    text = "a " * 300
    n_ids = len(tokenizer(text, add_special_tokens=False).input_ids)
    assert n_ids == 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb = T5Encoder(model, tokenizer).encode([text])
    assert emb.hidden.shape == (1, 301, 32) and emb.mask.sum() == 301


def test_too_long_prompt_is_cut_with_a_warning_naming_the_cut_text(model, tokenizer):
    encoder = T5Encoder(model, tokenizer, max_length=8)
    with pytest.warns(UserWarning, match=r"at most 7 tokens of text; cut 3 tokens from prompt 1: 'cat on a'"):
        emb = encoder.encode(["a", "the red a blue dog the red cat on a"])
    assert emb.hidden.shape == (2, 8, 32)
    ids = tokenizer("the red a blue dog the red", return_tensors="pt").input_ids  # what was kept, + </s>
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(emb.hidden[1:], expected, rtol=0, atol=1e-6)


def test_weights_scale_token_states(model, tokenizer):
    encoder = T5Encoder(model, tokenizer)
    plain = encoder.encode(["a red cat"]).hidden[0]
    weighted = encoder.encode(["a (red:2) (cat:0.5) (dog:0)"]).hidden[0]
    reference = encoder.encode(["a red cat dog"]).hidden[0]
    assert weighted.shape[0] == reference.shape[0] == 5  # ▁a ▁red ▁cat ▁dog </s>
    torch.testing.assert_close(weighted[1], reference[1] * 2)
    torch.testing.assert_close(weighted[2], reference[2] * 0.5)
    assert weighted[3].eq(0).all()  # weight 0: nothing said there
    assert torch.equal(weighted[0], reference[0]) and torch.equal(weighted[4], reference[4])
    assert not torch.equal(plain, weighted[:3])
    unweighted = T5Encoder(model, tokenizer, weighting=False).encode(["a red cat"]).hidden[0]
    assert torch.equal(plain, unweighted)


def test_unweighted_prompt_is_identical_to_plain_path(model, tokenizer):
    a = T5Encoder(model, tokenizer).encode(PROMPTS)
    b = T5Encoder(model, tokenizer, weighting=False).encode(PROMPTS)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.mask, b.mask)


def test_frozen_in_eval_mode(tokenizer):
    model = t5_model()
    model.train()
    encoder = T5Encoder(model, tokenizer, cache_size=0)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    model.train()
    first = encoder.encode(PROMPTS)
    second = encoder.encode(PROMPTS)  # dropout 0.5 would make these differ in train mode
    assert torch.equal(first.hidden, second.hidden) and not first.hidden.requires_grad


def test_cache_skips_the_model(tokenizer):
    model = t5_model()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    encoder = T5Encoder(model, tokenizer)
    encoder.encode(["a dog"])
    encoder.encode(["a dog"])
    assert len(calls) == 1
    encoder.encode(["a dog", "a cat", "a cat"])  # only "a cat" is new: one call
    assert len(calls) == 2


def test_tokenizer_without_end_token(model):
    broken = t5_tokenizer()
    broken.eos_token = None
    with pytest.raises(ValueError, match="a T5 tokenizer needs an eos token"):
        T5Encoder(model, broken)


@pytest.mark.parametrize("bad", [1, 0, -5, True, 8.0, None])
def test_bad_max_length(model, tokenizer, bad):
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        T5Encoder(model, tokenizer, max_length=bad)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (None, TypeError, "got None"),
        (3.5, TypeError, "prompts must be a list of str, got float"),
        (["ok", 1], TypeError, r"prompts\[1\] must be a str, got int"),
        ([], ValueError, "empty list"),
    ],
)
def test_bad_prompts(model, tokenizer, bad, error, message):
    with pytest.raises(error, match=message):
        T5Encoder(model, tokenizer).encode(bad)
