"""parse_prompt_weights: the (word:1.3) / (word) / [word] syntax, nesting, escapes, bad brackets."""
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentloom.text_encoders import parse_prompt_weights

R = 1.1
S = 1 / 1.1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a red cat", [("a red cat", 1.0)]),
        ("", [("", 1.0)]),
        ("a (red:1.3) cat", [("a ", 1.0), ("red", 1.3), (" cat", 1.0)]),
        ("(red)", [("red", R)]),
        ("[red]", [("red", S)]),
        ("((red))", [("red", R * R)]),
        ("[[red]]", [("red", S * S)]),
        ("((red:1.5) cat)", [("red", 1.5 * R), (" cat", R)]),
        ("(a [b] c)", [("a ", R), ("b", R * S), (" c", R)]),
        ("(red: 1.5 )", [("red", 1.5)]),
        ("(red:.5)", [("red", 0.5)]),
        ("(red:+2)", [("red", 2.0)]),
        ("(red:0)", [("red", 0.0)]),
        ("(red:-1.5) cat", [("red", -1.5), (" cat", 1.0)]),
        ("style: photo", [("style: photo", 1.0)]),  # a colon in text stays text
        ("(a:b)", [("a:b", R)]),  # not a number: the colon is text, ")" closes with 1.1
        ("()", [("", 1.0)]),
        ("a () b", [("a  b", 1.0)]),
    ],
)
def test_weights(text, expected):
    got = parse_prompt_weights(text)
    assert [f for f, _ in got] == [f for f, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"a \(cat\)", [("a (cat)", 1.0)]),
        (r"\[x\]", [("[x]", 1.0)]),
        (r"a \\ b", [("a \\ b", 1.0)]),
        (r"(a\)b)", [("a)b", R)]),
        (r"(a\:2)", [("a:2", R)]),
        (r"x\y", [("x\\y", 1.0)]),  # a backslash before an ordinary character stays
        ("trailing\\", [("trailing\\", 1.0)]),
    ],
)
def test_escapes(text, expected):
    assert parse_prompt_weights(text) == expected


def test_unclosed_opener_weights_the_rest_and_warns():
    with pytest.warns(UserWarning, match=r"1 '\(' and 0 '\[' never closed"):
        got = parse_prompt_weights("a (red cat")
    assert got == [("a ", 1.0), ("red cat", pytest.approx(R))]
    with pytest.warns(UserWarning, match=r"0 '\(' and 1 '\[' never closed"):
        assert parse_prompt_weights("[x") == [("x", pytest.approx(S))]


def test_unmatched_closer_stays_text_and_warns():
    with pytest.warns(UserWarning, match=r"unmatched closers kept as text: \['\)'\]"):
        assert parse_prompt_weights("a) b") == [("a) b", 1.0)]
    with pytest.warns(UserWarning, match=r"\[':2\)'\]"):
        assert parse_prompt_weights("a:2)") == [("a:2)", 1.0)]
    with pytest.warns(UserWarning, match=r"\['\]'\]"):
        assert parse_prompt_weights("(a]") == [("a]", pytest.approx(R))]


def test_no_text_is_lost():
    text = "((a)) [b] (c:2) d) (e \\( f"
    with pytest.warns(UserWarning):
        got = parse_prompt_weights(text)
    assert "".join(f for f, _ in got) == "a b c d) e ( f"


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["a"]])
def test_non_string_is_a_type_error(bad):
    with pytest.raises(TypeError, match="prompt must be a str"):
        parse_prompt_weights(bad)


# ---- properties -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="()[]\\"), max_size=60))
def test_text_without_syntax_is_one_run_of_weight_one(text):
    assert parse_prompt_weights(text) == [(text, 1.0)]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab :.1-()[]\\", max_size=40))
def test_any_text_parses_and_keeps_every_letter(text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = parse_prompt_weights(text)
    assert runs and all(isinstance(f, str) and isinstance(w, float) for f, w in runs)
    joined = "".join(f for f, _ in runs)
    assert [c for c in joined if c in "ab"] == [c for c in text if c in "ab"]
    assert all(runs[i][1] != runs[i + 1][1] for i in range(len(runs) - 1))  # runs are merged
