"""Prompt weighting syntax, as A1111 and ComfyUI users write it.

    (word:1.3)   weight 1.3
    (word)       weight 1.1
    [word]       weight 1 / 1.1
    ((word))     nesting multiplies: 1.1 * 1.1
    \\( \\) \\[ \\] \\\\ \\:   a literal bracket, backslash or colon

Unbalanced brackets never lose text: a closer with no opener stays as literal text, an
opener that is never closed weights the rest of the prompt (A1111's rule); both warn.
Weights may be 0 or negative; what they do to an embedding is the encoder's business
(see FrozenTextEncoder: hidden = reference + (hidden - reference) * weight).
"""
from __future__ import annotations

import math
import re
import warnings

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One lexical token per match. The explicit weight ":1.3)" is one token so that a colon
# inside plain text ("style: photo") stays text.
_TOKEN = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\:])
  | (?P<weight>:\s*(?P<number>[+-]?(?:\d+\.?\d*|\.\d+))\s*\))
  | (?P<open_round>\()
  | (?P<close_round>\))
  | (?P<open_square>\[)
  | (?P<close_square>\])
  | (?P<text>[^\\()\[\]:]+|[\\:])
    """,
    re.VERBOSE,
)


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (fragment, weight) runs; adjacent runs of equal weight are merged.

    A prompt without weighting syntax gives [(text, 1.0)]; the empty prompt gives [("", 1.0)].
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}: {text!r}")
    runs: list[list] = []  # [fragment, weight], weights multiplied in place as groups close
    open_round: list[int] = []  # index in runs where each open "(" group starts
    open_square: list[int] = []
    unmatched: list[str] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _TOKEN.finditer(text):
        kind = match.lastgroup if match.lastgroup != "number" else "weight"
        token = match.group(0)
        if kind == "escape":
            runs.append([token[1], 1.0])
        elif kind == "open_round":
            open_round.append(len(runs))
        elif kind == "open_square":
            open_square.append(len(runs))
        elif kind == "weight" and open_round:
            multiply(open_round.pop(), float(match.group("number")))
        elif kind == "close_round" and open_round:
            multiply(open_round.pop(), ROUND_MULTIPLIER)
        elif kind == "close_square" and open_square:
            multiply(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            if kind in ("weight", "close_round", "close_square"):
                unmatched.append(token)
            runs.append([token, 1.0])

    # A1111 applies an unclosed group to everything after its opener.
    for start in open_round:
        multiply(start, ROUND_MULTIPLIER)
    for start in open_square:
        multiply(start, SQUARE_MULTIPLIER)
    if unmatched or open_round or open_square:
        warnings.warn(
            f"unbalanced brackets in prompt {text!r}: "
            f"{len(open_round)} '(' and {len(open_square)} '[' never closed (they weight the rest of "
            f"the prompt), unmatched closers kept as text: {unmatched}. Write \\( \\) \\[ \\] for literal brackets.",
            UserWarning,
            stacklevel=2,
        )

    # "(a:999...9)" or thousands of nested brackets overflow a float: an inf or NaN weight would
    # turn the embedding, and so the image, into NaN
    broken = [(fragment, weight) for fragment, weight in runs if fragment and not math.isfinite(weight)]
    if broken:
        fragment, weight = broken[0]
        raise ValueError(f"prompt weight {weight} of {fragment[:40]!r} is not a finite number (too large a "
                         "weight or too deep a nesting of brackets); weights must stay within float range")
    merged: list[tuple[str, float]] = []
    for fragment, weight in runs:
        if not fragment:
            continue
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + fragment, weight)
        else:
            merged.append((fragment, weight))
    return merged or [("", 1.0)]
