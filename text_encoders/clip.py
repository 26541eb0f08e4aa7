"""CLIP text encoder (Stable Diffusion 1.x / 2.x): transformers CLIPTextModel + CLIPTokenizer.

Stable Diffusion parity: a prompt that fits in one window (75 tokens of text) and has no
weighting syntax gives exactly what diffusers' StableDiffusionPipeline.encode_prompt gives:
ids = [bos] + text + [eos] + padding up to tokenizer.model_max_length (77), no attention
mask, all 77 positions in `hidden` (padding included).

clip_skip counts layers skipped from the end, exactly as diffusers' `clip_skip` does:
    0 (diffusers None)  the last layer's output (last_hidden_state)
    k >= 1              hidden_states[-(k + 1)], then the final layer norm (k = 1: SD 2.x style)
A1111's "Clip skip" setting is ours + 1 (A1111 1 = our 0, A1111 2 = our 1).
final_layer_norm=False leaves a skipped layer's output un-normalized, as SDXL does with its
penultimate layer (SDXL: clip_skip=1, final_layer_norm=False, for both of its encoders).
One difference from diffusers: diffusers ignores clip_skip for the negative prompt it encodes
itself; here every prompt, negative or not, uses the encoder's clip_skip.

Longer prompts: each 75-token window is [bos] + text + [eos] + padding, encoded alone, and the
windows concatenated, so L is a multiple of 77. Batches and cond/uncond are padded with whole
windows of the empty prompt (`filler`), as A1111 and ComfyUI do. `pooled` is the pooled output
of the prompt's first window (text_embeds for CLIPTextModelWithProjection), unweighted.
"""
from __future__ import annotations

from pathlib import Path

from latentloom.text_encoders.base import FrozenTextEncoder, quiet_loading


class CLIPEncoder(FrozenTextEncoder):
    """Frozen CLIP text encoder; see the module docstring for clip_skip and long prompts."""

    pad_windows = True

    def __init__(
        self,
        model,
        tokenizer,
        *,
        clip_skip: int | None = 0,
        final_layer_norm: bool = True,
        weighting: bool = True,
        cache_size: int = 32,
    ) -> None:
        super().__init__(model, tokenizer, weighting=weighting, cache_size=cache_size)
        layers = int(model.config.num_hidden_layers)
        if clip_skip is None:
            clip_skip = 0
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
            raise ValueError(
                f"clip_skip must be an int in [0, {layers - 1}] for this {layers}-layer model "
                f"(0 = last layer, 1 = penultimate), got {clip_skip!r}"
            )
        self.clip_skip = clip_skip
        self.final_layer_norm = bool(final_layer_norm)
        # diffusers pads to tokenizer.model_max_length; a tokenizer without one set (huge default)
        # falls back to what the position embeddings can hold.
        window = min(int(tokenizer.model_max_length), int(model.config.max_position_embeddings))
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if bos is None or eos is None:
            raise ValueError(f"a CLIP tokenizer needs bos and eos tokens, got bos={bos!r} eos={eos!r}")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        self._setup(window_length=window, prefix=[bos], suffix=[eos], pad_id=pad)

    def _forward(self, input_ids, attention_mask):
        # No attention mask, as diffusers passes none to CLIP (the causal mask already keeps
        # padding after the end token out of every real token's view).
        out = self.model(input_ids=input_ids, output_hidden_states=self.clip_skip > 0)
        if self.clip_skip == 0:
            hidden = out.last_hidden_state  # (N, 77, D)
        else:
            hidden = out.hidden_states[-(self.clip_skip + 1)]
            if self.final_layer_norm:
                hidden = self._final_layer_norm(hidden)
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = out.pooler_output  # (N, D)
        return hidden, pooled

    def _final_layer_norm(self, hidden):
        # transformers 5 puts final_layer_norm on CLIPTextModel itself; 4.x (and
        # CLIPTextModelWithProjection) keep it on .text_model.
        norm = getattr(self.model, "final_layer_norm", None)
        if norm is None:
            norm = self.model.text_model.final_layer_norm
        return norm(hidden)

    def _word_ends(self, ids):
        # CLIP's BPE marks the last piece of every word with "</w>"
        return [token.endswith("</w>") for token in self.tokenizer.convert_ids_to_tokens(ids)]

    def _weight_reference(self, length: int):
        return self._empty_window_hidden()[:length]

    def _filler(self):
        return self._empty_window_hidden()

    def _settings(self) -> tuple:
        return (*super()._settings(), self.clip_skip, self.final_layer_norm)

    @classmethod
    def from_pretrained(
        cls,
        folder: "str | Path",
        *,
        clip_skip: int | None = 0,
        final_layer_norm: bool = True,
        dtype=None,
        text_encoder_subfolder: str = "text_encoder",
        tokenizer_subfolder: str = "tokenizer",
        allow_pickle: bool = False,
        weighting: bool = True,
        cache_size: int = 32,
    ) -> "CLIPEncoder":
        """Load offline from a diffusers Stable Diffusion folder (its text_encoder/ and tokenizer/)
        or from one folder holding both the model and the tokenizer files.

        Weights must be safetensors; pickle weights (pytorch_model.bin) load only with
        allow_pickle=True (and then with weights_only=True). SDXL's second encoder:
        text_encoder_subfolder="text_encoder_2", tokenizer_subfolder="tokenizer_2".
        """
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"CLIPEncoder.from_pretrained needs a folder, {str(root)!r} is not one")
        model_dir = root / text_encoder_subfolder if (root / text_encoder_subfolder / "config.json").is_file() else root
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"no CLIP text model in {str(root)!r}: expected {text_encoder_subfolder}/config.json "
                "(diffusers layout) or config.json in the folder itself"
            )
        tokenizer_files = ("vocab.json", "tokenizer.json")
        tok_sub = root / tokenizer_subfolder
        tokenizer_dir = tok_sub if any((tok_sub / f).is_file() for f in tokenizer_files) else root
        if not any((tokenizer_dir / f).is_file() for f in tokenizer_files):
            raise FileNotFoundError(
                f"no CLIP tokenizer in {str(root)!r}: expected {tokenizer_subfolder}/vocab.json + merges.txt "
                "(or tokenizer.json), or those files in the folder itself"
            )
        has_safetensors = any(model_dir.glob("*.safetensors"))
        if not has_safetensors:
            pickles = sorted(p.name for p in model_dir.glob("*.bin"))
            if not pickles:
                raise FileNotFoundError(f"no weights (*.safetensors) in {str(model_dir)!r}")
            if not allow_pickle:
                raise ValueError(
                    f"{str(model_dir)!r} has only pickle weights {pickles}; convert them to safetensors, "
                    "or pass allow_pickle=True to load them with weights_only=True"
                )
        from latentloom.weight_files import check_safetensors

        for path in sorted(model_dir.glob("*.safetensors")):
            check_safetensors(path)
        from latentloom.file_io import read_json_object

        config = read_json_object(model_dir / "config.json")
        with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or [])
        model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        # float32 unless asked: transformers would follow a published "torch_dtype": "float16" (SD 2.x),
        # and the encoder stays in the dtype it is loaded in (Pipeline.to moves it, never casts it)
        import torch

        load_kwargs = {"local_files_only": True, "use_safetensors": has_safetensors,
                       "dtype": torch.float32 if dtype is None else dtype}
        try:
            with quiet_loading():
                model, info = model_class.from_pretrained(str(model_dir), output_loading_info=True, **load_kwargs)
        except (OSError, RuntimeError, TypeError, ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"{model_dir}: the CLIP text model could not be built from its config and "
                             f"weights: {err}") from err
        # transformers fills missing weights with random values and skips unknown ones: refuse both
        wrong = {k: sorted(v)[:8] for k, v in info.items()
                 if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if wrong:
            raise ValueError(f"{model_dir}: the text encoder weights do not fit its config.json: {wrong}")
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        encoder = cls(
            model,
            tokenizer,
            clip_skip=clip_skip,
            final_layer_norm=final_layer_norm,
            weighting=weighting,
            cache_size=cache_size,
        )

        def reload():  # the same files, read again (already checked above)
            with quiet_loading():
                return model_class.from_pretrained(str(model_dir), **load_kwargs)

        encoder.reload = reload
        return encoder
