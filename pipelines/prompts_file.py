"""Reading a prompts file for `latentloom generate --prompts FILE`: plain text or JSONL, checked whole
before any image is made.

Plain text: one prompt per line; blank lines and lines starting with `#` are skipped. JSONL (a
`.jsonl` file): one JSON object per line with `prompt` and any of `OVERRIDES`, which replace the
command's options for that line. Entries are numbered from 0 in file order, counting prompts only,
so a comment added between prompts renames no image and moves no seed.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# key -> (accepted Python types, what the error message calls them)
OVERRIDES: dict[str, tuple[tuple[type, ...], str]] = {
    "negative_prompt": ((str, type(None)), "a string or null"),
    "prompt_2": ((str, type(None)), "a string or null (SDXL's second text encoder)"),
    "negative_prompt_2": ((str, type(None)), "a string or null (SDXL's second text encoder)"),
    "seed": ((numbers.Integral,), "an integer >= 0"),
    "num_inference_steps": ((numbers.Integral,), "an integer >= 1"),
    "guidance_scale": ((numbers.Real,), "a number >= 0"),
    "height": ((numbers.Integral,), "an integer"),
    "width": ((numbers.Integral,), "an integer"),
    "sampler": ((str,), "a sampler name"),
}


@dataclass
class PromptEntry:
    """One prompt of the file: its number among the prompts, its line in the file, its overrides."""

    index: int
    line: int  # 1-based, for messages
    prompt: str
    overrides: dict[str, Any] = field(default_factory=dict)


def read_prompts(path: str | Path) -> list[PromptEntry]:
    """The entries of a prompts file; FileNotFoundError / ValueError naming the file and line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist" if not path.exists()
                                else f"prompts file {str(path)!r} is a folder, not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None
    jsonl = path.suffix.lower() == ".jsonl"
    entries: list[PromptEntry] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip() or (not jsonl and text.lstrip().startswith("#")):
            continue
        prompt, overrides = _parse_json_line(path, number, text) if jsonl else (text.strip(), {})
        entries.append(PromptEntry(len(entries), number, prompt, overrides))
    if not entries:
        raise ValueError(f"{path} holds no prompts (blank lines{'' if jsonl else ' and # comments'} are skipped)")
    return entries


def _parse_json_line(path: Path, number: int, text: str) -> tuple[str, dict[str, Any]]:
    where = f"{path}, line {number}"
    try:
        item = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be a JSON object with a \"prompt\", got {type(item).__name__}")
    unknown = sorted(set(item) - {"prompt", *OVERRIDES})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; accepted: 'prompt', {', '.join(map(repr, OVERRIDES))}")
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: \"prompt\" must be a non-empty string, got {prompt!r}")
    overrides = {k: v for k, v in item.items() if k != "prompt"}
    for key, value in overrides.items():
        types, wanted = OVERRIDES[key]
        bad = isinstance(value, bool) or not isinstance(value, types)
        if not bad and key == "seed":
            bad = value < 0
        elif not bad and key == "num_inference_steps":
            bad = value < 1
        elif not bad and key == "guidance_scale":
            bad = not 0 <= value < float("inf")
        if bad:
            raise ValueError(f"{where}: {key!r} must be {wanted}, got {value!r}")
    return prompt, overrides
