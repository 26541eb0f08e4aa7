"""One dataclass that says how a training run goes (what `latentloom train` fills in).

Plain Python, no torch: the CLI builds it from arguments before anything heavy loads.
The model's own architecture lives in its own config (UNetConfig, the AutoencoderKL
config, ImageTextConfig) and is passed as a JSON file with ``--config``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELS = ("unet", "vae", "clip", "upscaler", "lcm", "controlnet")
LCM_LOSSES = ("huber", "l2")
# TrainConfig.vae value for the upscaler's weightless space-to-depth "VAE" (pixel-space diffusion)
PIXEL_SHUFFLE = "pixel-shuffle"
MIXED_PRECISION = ("no", "bf16", "fp16")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LR_SCHEDULES = ("cosine", "constant")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
CROPS = ("center", "random")


@dataclass
class TrainConfig:
    """Everything about a run except the model architecture.

    steps counts optimizer steps; one step consumes ``batch_size * grad_accum`` images
    on each process.
    """

    model: str = "unet"
    data: str | None = None
    output: str = "latentloom-out"
    model_config: str | None = None  # JSON file with the model's architecture (from scratch)
    pretrained: str | None = None  # a model folder to fine-tune (loaded weights)
    vae: str | None = None  # a trained VAE folder (latent UNet / upscaler training), or PIXEL_SHUFFLE
    text_encoder: str = "minilm"
    resolution: int = 64
    crop: str = "center"
    random_flip: bool = True
    cache_latents: bool = False
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: str = "cosine"
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = True  # only where bitsandbytes is installed
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = None
    x0_weighting: bool = False  # v loss / (snr + 1): every noise level weighs the same in x0 terms
    noise_offset: float = 0.0
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    rescale_zero_terminal_snr: bool = False
    # VAE: the KL term's weight (the reconstruction term is L1 + MSE on pixels).
    kl_weight: float = 1e-6
    # Upscaler: the low-resolution side, and the largest noise level added to it.
    low_resolution: int = 32
    max_noise_level: int = 350
    # Upscaler in pixel space: learn the difference from the bicubic enlargement of the low-res
    # image instead of the image itself (so an untrained correction already gives bicubic).
    residual: bool = False
    # LoRA (UNet fine-tuning and LCM distillation): rank 0 means full fine-tuning.
    lora_rank: int = 0
    lora_alpha: float | None = None
    # Latent consistency distillation (model "lcm"): the guidance range w is drawn from (diffusers'
    # convention, scale - 1), the DDIM solver grid the teacher steps on (the sampler's
    # original_inference_steps), the target network's EMA decay, the loss, the guidance embedding's width
    lcm_w_min: float = 3.0
    lcm_w_max: float = 15.0
    lcm_num_ddim_timesteps: int = 50
    lcm_target_decay: float = 0.95
    lcm_loss: str = "huber"
    lcm_huber_c: float = 0.001
    lcm_cond_dim: int = 256
    lcm_timestep_scaling: float = 10.0
    seed: int = 0
    resume: str | None = None  # a checkpoint folder, or "latest"
    checkpoint_every: int = 500
    # Stop after this many steps in this invocation (with a checkpoint), e.g. for time-sliced
    # jobs; `resume="latest"` continues. None: run to `steps` and export.
    stop_after: int | None = None
    checkpoints_total_limit: int | None = 2
    log_every: int = 10
    num_workers: int = 0
    threads: int | None = None  # torch CPU threads per process (None: torch's default)
    progress: bool = True

    def __post_init__(self) -> None:
        choices = {
            "model": MODELS,
            "mixed_precision": MIXED_PRECISION,
            "prediction_type": PREDICTION_TYPES,
            "lr_schedule": LR_SCHEDULES,
            "beta_schedule": BETA_SCHEDULES,
            "crop": CROPS,
            "lcm_loss": LCM_LOSSES,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        positive = ("steps", "batch_size", "grad_accum", "resolution", "num_train_timesteps", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or None), got {self.threads}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1 (or None), got {self.stop_after}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 (or None to turn it off), got {self.min_snr_gamma}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_warmup_steps < 0 or self.noise_offset < 0 or self.lora_rank < 0:
            raise ValueError(
                "lr_warmup_steps, noise_offset and lora_rank must be >= 0, got "
                f"{self.lr_warmup_steps}, {self.noise_offset}, {self.lora_rank}"
            )
        if self.lora_rank and self.model not in ("unet", "lcm"):
            raise ValueError(f"LoRA trains the UNet only (model 'unet' or 'lcm'); got lora_rank={self.lora_rank} with "
                             f"model={self.model!r}")
        if self.model == "lcm":
            if self.pretrained is None:
                raise ValueError("model='lcm' distils a teacher: pass pretrained=<model folder, file or bundled:NAME>")
            if not 0.0 <= self.lcm_w_min <= self.lcm_w_max:
                raise ValueError(f"need 0 <= lcm_w_min <= lcm_w_max, got {self.lcm_w_min} and {self.lcm_w_max}")
            if not 1 <= self.lcm_num_ddim_timesteps <= self.num_train_timesteps:
                raise ValueError(f"lcm_num_ddim_timesteps must be in [1, {self.num_train_timesteps}], got "
                                 f"{self.lcm_num_ddim_timesteps}")
            if not 0.0 <= self.lcm_target_decay < 1.0 or self.lcm_huber_c <= 0 or self.lcm_cond_dim < 1:
                raise ValueError(f"need lcm_target_decay in [0, 1), lcm_huber_c > 0 and lcm_cond_dim >= 1, got "
                                 f"{self.lcm_target_decay}, {self.lcm_huber_c}, {self.lcm_cond_dim}")
        if self.model == "controlnet" and self.pretrained is None:
            raise ValueError("model='controlnet' trains a ControlNet for a model: pass pretrained=<model folder, file "
                             "or bundled:NAME>")
        if self.lora_rank and self.pretrained is None:
            raise ValueError("LoRA fine-tunes loaded weights: pass pretrained=<model folder> with lora_rank > 0")
        if self.x0_weighting and (self.prediction_type != "v_prediction" or self.min_snr_gamma is not None):
            raise ValueError(f"x0_weighting needs prediction_type='v_prediction' and no min_snr_gamma, got "
                             f"prediction_type={self.prediction_type!r}, min_snr_gamma={self.min_snr_gamma!r}")
        # (A fine-tune reads its VAE from the pretrained folder; make_task checks it is pixel space.)
        if self.residual and (self.model != "upscaler" or (self.vae != PIXEL_SHUFFLE and self.pretrained is None)):
            raise ValueError(f"residual=True is for a pixel-space upscaler (model='upscaler', vae='{PIXEL_SHUFFLE}', "
                             f"or pretrained=<a residual upscaler>), got model={self.model!r}, vae={self.vae!r}")
        if self.model in MODELS and self.data is None:
            raise ValueError(f"training model={self.model!r} needs data=<folder of captioned images>")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output) / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)
