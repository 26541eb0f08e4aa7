"""Fine-tune only the decoder of a trained VAE (encoder frozen), used for the bundled model.

Why: the UNet is trained on cached latents of the VAE's encoder; a frozen encoder keeps
those latents (and the scaling factor) valid, so the decoder can keep improving while,
or after, the UNet trains. Loss: the VAE task's per-pixel |x - x_hat| + (x - x_hat)^2 on
decodes of posterior samples (as in `latentloom train --model vae`).

    python -m latentloom.training.finetune_decoder --vae OUT/vae --data DATA --steps 600 --output OUT/vae

Why a loop of its own beside `training.loop.train`: this recipe differs from the VAE task in every
part the one loop delegates to a task. Its loss weights edge pixels; the encoder is frozen and
its posterior is sampled from the recipe's own generator; the learning rate falls on a cosine to
0 with no checkpoints to resume; and the result replaces the VAE folder it started from while
keeping its scaling factor (the UNet's latents depend on it), where the VAE task's export
measures a new one. Folding it into the VAE task would add four options used by this one recipe,
whose results (weights/README.md) were made with this loop; it stays a single 30-line loop.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True, help="a VAE folder (config.json + safetensors)")
    parser.add_argument("--data", required=True, help="a make-shapes folder (PNG + metadata.jsonl)")
    parser.add_argument("--output", required=True, help="where the VAE folder is written (may equal --vae)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--edge-weight", type=float, default=0.0,
                        help="extra loss weight on pixels within 1 px of an edge of the target (0: uniform)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be >= 1, got {args.steps}, {args.batch_size}")
    if args.edge_weight < 0:
        raise ValueError(f"--edge-weight must be >= 0, got {args.edge_weight}")

    import numpy as np
    import torch
    from PIL import Image

    from latentloom.model_folder import write_component
    from latentloom.vae.loading import load_vae

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vae = load_vae(args.vae)
    vae.requires_grad_(False)
    trainable = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    files = [json.loads(line)["file_name"] for line in open(Path(args.data) / "metadata.jsonl")]
    generator = torch.Generator().manual_seed(args.seed)

    def load(names: list[str]) -> torch.Tensor:  # (B, 3, H, W) in [-1, 1]
        arrays = [np.asarray(Image.open(Path(args.data) / n).convert("RGB"), dtype=np.float32) for n in names]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0

    def save(step: int) -> None:
        out = Path(args.output)
        write_component(out.parent, out.name, lambda tmp: vae.save_pretrained(tmp, safe_serialization=True))

    start, loss_ema = time.perf_counter(), float("nan")
    for step in range(1, args.steps + 1):
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / args.steps))  # cosine to 0
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(0, len(files), (args.batch_size,), generator=generator).tolist()
        pixels = load([files[i] for i in index])
        with torch.no_grad():
            z = vae.encode(pixels).latent_dist.sample(generator=generator)  # (B, 4, h, w)
        diff = vae.decode(z).sample - pixels
        loss = ((diff.abs() + diff.pow(2)) * pixel_weights(pixels, args.edge_weight)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * loss.item()
        if step % 10 == 0:
            rate = step * args.batch_size / (time.perf_counter() - start)
            print(json.dumps({"step": step, "loss": loss.item(), "loss_ema": loss_ema, "lr": lr,
                              "images_per_s": rate}), flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save(step)
    return 0


def pixel_weights(pixels, edge_weight: float):
    """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W): 1, plus `edge_weight` within 1 px of an edge.

    Why: a small star and a disc of its size differ in a few corner pixels, which a uniform
    per-pixel loss barely sees; weighting the edges makes the decoder draw them."""
    import torch.nn.functional as F

    if edge_weight == 0:
        return pixels.new_ones(())
    gray = pixels.mean(1, keepdim=True)  # (B, 1, H, W)
    gx = F.pad((gray[..., :, 1:] - gray[..., :, :-1]).abs(), (0, 1, 0, 0))
    gy = F.pad((gray[..., 1:, :] - gray[..., :-1, :]).abs(), (0, 0, 0, 1))
    edges = ((gx + gy) > 0.05).to(pixels.dtype)  # a step of >= 2.5% of the range
    return 1.0 + edge_weight * F.max_pool2d(edges, 3, stride=1, padding=1)


if __name__ == "__main__":
    raise SystemExit(main())
