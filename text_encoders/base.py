"""What every frozen text encoder shares: input checks, weighted tokenization, windows for
long prompts, one batched model call, a small LRU cache, and assembly into a TextEmbedding.

A prompt becomes token ids with one weight each (parse_prompt_weights, then each fragment
tokenized without special tokens). The ids are cut into windows of at most
`window_length - len(prefix) - len(suffix)` tokens, moving a cut back to a word boundary
rather than split a short word (see _spans); each window gets its own start/end tokens
and is encoded on its own, and the windows' hidden states are concatenated (the A1111 /
ComfyUI approach to prompts longer than CLIP's 77 tokens). An encoder that cannot take more
windows (T5: one) keeps what fits and warns with the text it cut.

Weights act on the hidden states, not on the ids:
    hidden = reference + (hidden - reference) * weight        (per token)
where the reference is the encoding of the empty prompt at the same position for CLIP
(ComfyUI's rule: weight 0 gives "nothing said here", weight < 0 pushes away) and zero for
T5 and MiniLM. A prompt with all weights 1 skips this step, so it is bit-identical to the
plain path.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING, NamedTuple, Sequence

from latentloom.text_encoders.embedding import TextEmbedding, pad_to_same_length
from latentloom.text_encoders.weighting import parse_prompt_weights

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def quiet_loading():
    """Hide transformers' "Loading weights" progress bar while a frozen encoder loads (it would
    print on every `latentloom generate`), restoring the user's setting afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class _Encoded(NamedTuple):
    """One prompt's encoding, as the cache stores it."""

    hidden: "torch.Tensor"  # (L, D)
    mask: "torch.Tensor"  # (L,)
    pooled: "torch.Tensor | None"  # (D',)


class _Window(NamedTuple):
    prompt: int  # index into the prompts being encoded
    ids: list[int]  # with start/end tokens, no padding
    weights: list[float]  # one per id


def check_prompts(prompts: object) -> list[str]:
    """A list (or tuple) of str; a bare str is one prompt. Anything else is a TypeError."""
    if prompts is None:
        raise TypeError('prompts must be a list of str (use [""] for the unconditional embedding), got None')
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}: {prompts!r}")
    if len(prompts) == 0:
        raise ValueError('prompts is an empty list; pass [""] for the unconditional embedding')
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(prompt).__name__}: {prompt!r}")
    return list(prompts)


class FrozenTextEncoder:
    """Base of CLIPEncoder, T5Encoder and MiniLMEncoder; subclasses say how to run the model.

    Subclasses set in __init__ (through `_setup`): the window length, the start (prefix) and
    end (suffix) ids, the padding id, and the class attributes below; and implement `_forward`.
    """

    pad_windows: bool = False  # pad each window to window_length (CLIP) or only to the batch's longest
    max_windows: int | None = None  # None: as many windows as the prompt needs
    max_word_tokens: int = 8  # a window boundary moves back rather than split a word this long or shorter

    def __init__(self, model, tokenizer, *, weighting: bool = True, cache_size: int = 32) -> None:
        if model is None or not hasattr(model, "parameters"):
            raise TypeError(f"model must be a transformers model (torch.nn.Module), got {type(model).__name__}")
        if tokenizer is None or not callable(tokenizer):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0 (0 disables the cache), got {cache_size!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.weighting = bool(weighting)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, _Encoded] = OrderedDict()
        self._empty_window: "tuple[tuple, torch.Tensor] | None" = None  # settings, (T, D): _empty_window_hidden
        # reload: builds the model again from its files (set by from_pretrained), so release_weights
        # can free it between calls; released: (device, dtype) the model had when it was freed
        self.reload = None
        self._released: "tuple[torch.device, torch.dtype] | None" = None
        # Frozen: no gradients, eval mode (dropout off); encode() also runs under no_grad.
        model.requires_grad_(False)
        model.eval()

    def _setup(self, *, window_length: int, prefix: list[int], suffix: list[int], pad_id: int) -> None:
        if window_length <= len(prefix) + len(suffix):
            raise ValueError(
                f"window length {window_length} leaves no room for text between {len(prefix) + len(suffix)} "
                "start/end tokens"
            )
        self.window_length = window_length
        self.prefix = list(prefix)
        self.suffix = list(suffix)
        self.pad_id = pad_id

    # ---- what subclasses provide -------------------------------------------------------------
    def _forward(self, input_ids: "torch.Tensor", attention_mask: "torch.Tensor"):
        """(N, T) ids and mask -> hidden (N, T, D) and per-window pooled (N, D') or None."""
        raise NotImplementedError

    def _pool(self, hiddens: list["torch.Tensor"], window_pooled: list["torch.Tensor | None"]):
        """One prompt's unweighted window hiddens [(T_w, D)] -> pooled (D',) or None."""
        return window_pooled[0]

    def _weight_reference(self, length: int) -> "torch.Tensor | None":
        """What weight 0 turns a token into: (length, D), or None for zero."""
        return None

    def _filler(self) -> "torch.Tensor | None":
        """The hidden states that mean padding, (Lf, D), or None for zeros (see TextEmbedding.filler)."""
        return None

    def _settings(self) -> tuple:
        """Everything besides the prompt that changes the result (part of the cache key)."""
        return (
            self.weighting, self.window_length, self.max_windows, self.max_word_tokens, str(self.device), self.dtype
        )

    # ---- the shared contract -----------------------------------------------------------------
    @property
    def device(self) -> "torch.device":
        return self._released[0] if self._released else next(self.model.parameters()).device

    @property
    def dtype(self) -> "torch.dtype":
        return self._released[1] if self._released else next(self.model.parameters()).dtype

    @property
    def released(self) -> bool:
        return self._released is not None

    def release_weights(self) -> bool:
        """Free the model's weights until the next prompt that is not cached needs them (they are read
        from the model's files again then). False, and nothing freed, where they cannot be read again:
        a model built in memory, or weights changed since loading (a merged LoRA)."""
        if self.reload is None or self._released is not None:
            return False
        self._released = (self.device, self.dtype)
        self.model.to("meta")  # the structure stays (config, hidden size); the storage is freed
        return True

    def restore_weights(self) -> None:
        """Read released weights back (a no-op unless `release_weights` freed them)."""
        if self._released is None:
            return
        device, dtype = self._released
        model = self.reload()
        model.requires_grad_(False)
        self.model = model.eval().to(device=device, dtype=dtype)
        self._released = None

    def weights_changed(self) -> None:
        """The weights were changed in place (a LoRA): forget cached encodings, and never release
        them (their files no longer hold them)."""
        self.restore_weights()
        self.reload = None
        self.clear_cache()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def to(self, device=None, dtype=None) -> "FrozenTextEncoder":
        """Move the model (e.g. to the pipeline's device); it may stay fp32 while the UNet does not."""
        import torch

        if self._released is not None:  # moved when it is read again
            old_device, old_dtype = self._released
            self._released = (torch.device(device) if device is not None else old_device, dtype or old_dtype)
        else:
            self.model.to(device=device, dtype=dtype)
        self.clear_cache()
        return self

    def clear_cache(self) -> None:
        """Forget cached encodings (call after changing the model's weights in place, e.g. a LoRA)."""
        self._cache.clear()
        self._empty_window = None

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """Encode a batch of prompts: hidden (B, L, D), mask (B, L), pooled (B, D') or None.

        Prompts of different lengths are padded to the longest (see TextEmbedding.filler).
        A prompt seen recently with the same settings comes from the cache, not the model.
        """
        import torch

        prompts = check_prompts(prompts)
        if self.model.training:  # someone called .train() on the model: stay frozen
            self.model.eval()
        settings = self._settings()
        found: dict[str, _Encoded] = {}
        missing: list[str] = []
        for prompt in dict.fromkeys(prompts):  # unique, in order
            key = (prompt, settings)
            if key in self._cache:
                self._cache.move_to_end(key)
                found[prompt] = self._cache[key]
            else:
                missing.append(prompt)
        if missing:
            with torch.no_grad():
                encoded = self._encode_uncached(missing)
            for prompt, result in zip(missing, encoded):
                found[prompt] = result
                if self.cache_size:
                    self._cache[(prompt, settings)] = result
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        filler = self._filler()
        singles = [
            TextEmbedding(
                found[p].hidden[None],
                found[p].mask[None],
                None if found[p].pooled is None else found[p].pooled[None],
                filler,
            )
            for p in prompts
        ]
        return TextEmbedding.cat(singles)  # torch.cat copies: callers cannot touch the cache

    def encode_pair(
        self, prompts: list[str], negative_prompts: "list[str] | str | None" = None
    ) -> tuple[TextEmbedding, TextEmbedding]:
        """(cond, uncond) for classifier-free guidance, padded to the same L.

        negative_prompts: None gives the empty prompt for each prompt; one str is used for all.
        """
        prompts = check_prompts(prompts)
        if negative_prompts is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompts, str):
            negatives = [negative_prompts] * len(prompts)
        else:
            negatives = check_prompts(negative_prompts)
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"got {len(negatives)} negative prompts for {len(prompts)} prompts; pass one per prompt, "
                    "one str for all, or None"
                )
        both = self.encode(prompts + negatives)
        batch = len(prompts)
        cond, uncond = (
            TextEmbedding(
                both.hidden[part],
                both.mask[part],
                None if both.pooled is None else both.pooled[part],
                both.filler,
            )
            for part in (slice(0, batch), slice(batch, None))
        )
        return cond, uncond

    # ---- the machinery -----------------------------------------------------------------------
    @property
    def content_length(self) -> int:
        """Tokens of text per window (the window less its start/end tokens)."""
        return self.window_length - len(self.prefix) - len(self.suffix)

    def _tokenize(self, prompt: str) -> tuple[list[int], list[float]]:
        """Token ids of the text (no start/end tokens) and one weight per id."""
        runs = parse_prompt_weights(prompt) if self.weighting else [(prompt, 1.0)]
        runs = [(text, weight) for text, weight in runs if text]
        if not runs:
            return [], []
        if len(runs) == 1:  # the plain path: exactly what tokenizer(prompt) gives, without specials
            pieces = [self.tokenizer(runs[0][0], add_special_tokens=False, verbose=False)["input_ids"]]
        else:
            pieces = self.tokenizer([text for text, _ in runs], add_special_tokens=False, verbose=False)["input_ids"]
        ids: list[int] = []
        weights: list[float] = []
        for piece, (_, weight) in zip(pieces, runs):
            ids += piece
            weights += [weight] * len(piece)
        return ids, weights

    def _spans(self, ids: list[int]) -> list[tuple[int, int]]:
        """Cut token ids into windows' [start, end) spans, at most content_length tokens each.

        A cut that would split a word moves back to the word's start when the word is at most
        `max_word_tokens` long (ComfyUI's rule), so a word stays whole in one window; longer
        words are split. No token is ever left out.
        """
        size = self.content_length
        if not ids:
            return [(0, 0)]  # the empty prompt is one empty window
        word_ends = self._word_ends(ids)
        spans = []
        start = 0
        while start < len(ids):
            end = min(start + size, len(ids))
            if end < len(ids):
                for cut in range(end, max(start, end - self.max_word_tokens), -1):
                    if word_ends[cut - 1]:
                        end = cut
                        break
            spans.append((start, end))
            start = end
        return spans

    def _word_ends(self, ids: list[int]) -> list[bool]:
        """True where a token ends a word (a window may end there). Default: anywhere."""
        return [True] * len(ids)

    def _windows(self, index: int, prompt: str) -> list[_Window]:
        ids, weights = self._tokenize(prompt)
        if self.max_windows is not None and len(ids) > self.max_windows * self.content_length:
            keep = self.max_windows * self.content_length
            cut = self.tokenizer.decode(ids[keep:])
            warnings.warn(
                f"{type(self).__name__} takes at most {keep} tokens of text; "
                f"cut {len(ids) - keep} tokens from prompt {index}: {cut!r}",
                UserWarning,
                stacklevel=5,
            )
            ids, weights = ids[:keep], weights[:keep]
        ones_prefix, ones_suffix = [1.0] * len(self.prefix), [1.0] * len(self.suffix)
        spans = self._spans(ids)
        if self.max_windows is not None and len(spans) > self.max_windows:
            # word-aware cuts took more windows than allowed: cut at the window size instead
            size = self.content_length
            spans = [(s, min(s + size, len(ids))) for s in range(0, len(ids), size)] or [(0, 0)]
        return [
            _Window(index, self.prefix + ids[s:e] + self.suffix, ones_prefix + weights[s:e] + ones_suffix)
            for s, e in spans
        ]

    def _run_windows(self, windows: Sequence[list[int]]):
        """Encode windows of ids in one batch -> hidden (N, T, D), mask (N, T), pooled (N, D') | None.

        Unpadded encoders run one batch per window length: padded to a batch mate's length, a
        window's numbers would change in the last bits with its company, and through the cache
        the same prompt would encode differently depending on earlier calls."""
        import torch

        lengths = sorted({len(w) for w in windows})
        if not self.pad_windows and len(lengths) > 1:
            groups = [[n for n, w in enumerate(windows) if len(w) == size] for size in lengths]
            parts = [self._run_windows([windows[n] for n in group]) for group in groups]
            hidden = parts[-1][0].new_zeros((len(windows), lengths[-1], parts[-1][0].shape[-1]))  # (N, T, D)
            mask = parts[-1][1].new_zeros((len(windows), lengths[-1]))  # (N, T)
            pooled = None if parts[-1][2] is None else parts[-1][2].new_empty((len(windows), parts[-1][2].shape[-1]))
            for group, (h, m, p) in zip(groups, parts):
                hidden[group, : h.shape[1]] = h
                mask[group, : m.shape[1]] = m
                if pooled is not None:
                    pooled[group] = p
            return hidden, mask, pooled
        length = self.window_length if self.pad_windows else lengths[-1]
        ids = torch.full((len(windows), length), self.pad_id, dtype=torch.long)  # (N, T)
        mask = torch.zeros((len(windows), length), dtype=torch.long)  # (N, T)
        for n, window in enumerate(windows):
            ids[n, : len(window)] = torch.tensor(window, dtype=torch.long)
            mask[n, : len(window)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.restore_weights()  # every model call comes through here
        hidden, pooled = self._forward(ids, mask)
        return hidden, mask, pooled

    def _empty_window_hidden(self) -> "torch.Tensor":
        """The empty prompt's one window, (T, D): CLIP's weight reference and padding."""
        import torch

        settings = self._settings()
        if self._empty_window is None or self._empty_window[0] != settings:
            with torch.no_grad():
                hidden, _, _ = self._run_windows([self.prefix + self.suffix])
            self._empty_window = (settings, hidden[0])
        return self._empty_window[1]

    def _encode_uncached(self, prompts: list[str]) -> list[_Encoded]:
        import torch

        windows = [w for i, p in enumerate(prompts) for w in self._windows(i, p)]
        hidden, mask, pooled = self._run_windows([w.ids for w in windows])
        per_prompt: list[list[tuple]] = [[] for _ in prompts]
        for n, window in enumerate(windows):
            length = hidden.shape[1] if self.pad_windows else len(window.ids)
            h = hidden[n, :length]  # (T_w, D)
            weighted = h
            if any(w != 1.0 for w in window.weights):
                weight = torch.ones(length, dtype=h.dtype, device=h.device)
                weight[: len(window.weights)] = torch.tensor(window.weights, dtype=h.dtype)
                reference = self._weight_reference(length)
                if reference is None:
                    scaled = h * weight[:, None]
                else:
                    scaled = reference + (h - reference) * weight[:, None]
                # tokens of weight 1 keep their exact values (ref + (h - ref) * 1 may round)
                weighted = torch.where((weight != 1.0)[:, None], scaled, h)
            per_prompt[window.prompt].append(
                (h, weighted, mask[n, :length], None if pooled is None else pooled[n])
            )
        results = []
        for parts in per_prompt:
            results.append(
                _Encoded(
                    torch.cat([weighted for _, weighted, _, _ in parts]),  # (L, D)
                    torch.cat([m for _, _, m, _ in parts]),  # (L,)
                    self._pool([h for h, _, _, _ in parts], [p for _, _, _, p in parts]),
                )
            )
        return results


__all__ = ["FrozenTextEncoder", "check_prompts", "pad_to_same_length"]
