"""latentloom: text-to-image latent diffusion with a small offline default model.

Importing the package is cheap: torch, diffusers and transformers load only when a
name that needs them is first used (see ``_LAZY``).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it. Resolved on first attribute access (PEP 562)
# so that `import latentloom` (and `latentloom --help`) never pays for torch.
_LAZY: dict[str, str] = {
    "TextEmbedding": "latentloom.text_encoders.embedding",
    "load_pipeline": "latentloom.pipelines.loading",
    "Pipeline": "latentloom.pipelines.pipeline",
    "PipelineOutput": "latentloom.pipelines.output",
    "read_metadata": "latentloom.pipelines.metadata",
    "UNet": "latentloom.unet.model",
    "UNetConfig": "latentloom.unet.config",
    "ScheduleConfig": "latentloom.samplers.schedules",
    "SAMPLERS": "latentloom.samplers",
    "CLIPEncoder": "latentloom.text_encoders.clip",
    "T5Encoder": "latentloom.text_encoders.t5",
    "MiniLMEncoder": "latentloom.text_encoders.minilm",
    "CaptionedImageDataset": "latentloom.training.data",
    "Denoiser": "latentloom.samplers.denoiser",
    "CFGDenoiser": "latentloom.samplers.guidance",
    "CLIPGuidance": "latentloom.samplers.clip_guidance",
    "make_sigmas": "latentloom.samplers.schedules",
    "TrainConfig": "latentloom.training.config",
    "train": "latentloom.training.loop",
    "load_lora": "latentloom.unet.lora",
    "ImageTextModel": "latentloom.text_encoders.image_text",
    "Cascade": "latentloom.pipelines.cascade",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'latentloom' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: the next access skips __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
