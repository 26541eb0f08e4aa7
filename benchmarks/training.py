"""Training throughput: latentloom's loop vs diffusers' train_text_to_image.py step logic,
same UNet architecture, same batch of precomputed latents and text embeddings, one process.

    python benchmarks/training.py --unet tiny --batch-size 16 --steps 20 --mixed-precision no

Both sides do per step: draw t and noise, noise the latents, run the UNet, MSE loss,
backward, AdamW step, LR scheduler step (and EMA when --ema). Prints images/s and the ratio.
Timing starts after ``--warmup`` steps. Not a test: times depend on the machine's load.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PRESETS = {
    "tiny": dict(channels=[16, 32], layers_per_level=1, attention_levels=[True, True], num_heads=2, norm_groups=8),
    "small": dict(channels=[64, 128, 256], layers_per_level=1, attention_levels=[False, True, True], num_heads=4,
                  norm_groups=32),
}


class FixedLatents(torch.utils.data.Dataset):
    """n items of latents (C, h, w) with captions; ``text`` serves fixed embeddings (a LatentCache stand-in)."""

    def __init__(self, n: int, *, channels: int, size: int, tokens: int, dim: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(n, channels, size, size, generator=g)
        self.captions = [f"caption {i}" for i in range(n)] + [""]
        self.hidden = {c: torch.randn(tokens, dim, generator=g) for c in self.captions}

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"latents": self.latents[i], "caption": self.captions[i]}

    def text(self, captions: list[str]):
        from latentloom.text_encoders import TextEmbedding

        hidden = torch.stack([self.hidden[c] for c in captions])  # (B, L, D)
        return TextEmbedding(hidden, torch.ones(hidden.shape[:2], dtype=torch.long))


def bench_latentloom(args: argparse.Namespace, config: Any, data: FixedLatents) -> float:
    from latentloom.training.config import TrainConfig
    from latentloom.training.loop import train
    from latentloom.training.objective import train_alphas_cumprod
    from latentloom.training.task_unet import UNetTask
    from latentloom.unet import UNet

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data="(in memory)", output=out, steps=args.warmup + args.steps, batch_size=args.batch_size,
                          mixed_precision=args.mixed_precision, ema=args.ema, progress=False, caption_dropout=0.1,
                          checkpoint_every=10**9, lr_warmup_steps=0, max_grad_norm=1.0)
        torch.manual_seed(0)
        ac = train_alphas_cumprod(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, rescale_zero_terminal_snr=False)
        task = UNetTask(cfg, unet=UNet(config), text_encoder=None, dataset=data, alphas_cumprod=ac,
                        latent_channels=4)
        times: list[float] = []
        original = task.loss

        def timed_loss(*a: Any, **k: Any) -> torch.Tensor:
            times.append(time.perf_counter())
            return original(*a, **k)

        task.loss = timed_loss
        task.export = lambda model, output: None
        train(cfg, task=task)
        # seconds from the first timed step's start to the last step's start, per step
        per_step = (times[-1] - times[args.warmup]) / (args.steps - 1)
        return args.batch_size / per_step


def bench_diffusers(args: argparse.Namespace, config: Any, data: FixedLatents) -> float:
    """The step of diffusers' examples/text_to_image/train_text_to_image.py, on precomputed inputs."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{k: v for k, v in config.to_diffusers_config().items() if not k.startswith("_")})
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=args.warmup + args.steps)
    ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config) if args.ema else None
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    unet.train()
    times: list[float] = []
    step = 0
    while step < args.warmup + args.steps:
        for batch in loader:
            times.append(time.perf_counter())
            with accelerator.accumulate(unet):
                latents = batch["latents"]
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                captions = [c if torch.rand(()) >= 0.1 else "" for c in batch["caption"]]
                encoder_hidden_states = data.text(captions).hidden
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients and ema is not None:
                ema.step(unet.parameters())
            loss.detach().item()  # the example logs the loss every step
            step += 1
            if step >= args.warmup + args.steps:
                break
    per_step = (times[-1] - times[args.warmup]) / (args.steps - 1)
    return args.batch_size / per_step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python benchmarks/training.py", description=__doc__.splitlines()[0])
    parser.add_argument("--unet", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--latent-size", type=int, default=16)
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--ema", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be >= 2, got {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from latentloom.unet import UNetConfig

    config = UNetConfig(**PRESETS[args.unet], in_channels=4, out_channels=4, context_dim=384)
    n = args.batch_size * (args.warmup + args.steps + 1)
    data = FixedLatents(n, channels=4, size=args.latent_size, tokens=16, dim=384)
    ours = bench_latentloom(args, config, data)
    theirs = bench_diffusers(args, config, data)
    from latentloom.unet import UNet

    result = {"unet": args.unet, "params": sum(p.numel() for p in UNet(config).parameters()),
              "batch_size": args.batch_size, "latent": [4, args.latent_size, args.latent_size],
              "mixed_precision": args.mixed_precision, "ema": args.ema, "threads": torch.get_num_threads(),
              "latentloom_images_per_s": round(ours, 2), "diffusers_images_per_s": round(theirs, 2),
              "ratio": round(ours / theirs, 3)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
