"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models"; diffusers'
`train_lcm_distill_sd_wds.py` and its LoRA twin): a student learns to map any point of the teacher's
probability-flow ODE, with guidance, to the same clean estimate in one call, so it samples in 1-8 steps.

Per batch: a point t_{n+k} of the DDIM solver grid (`lcm_num_ddim_timesteps` steps, k = T // that;
the grid the `lcm` sampler's `original_inference_steps` then walks) and a guidance w drawn uniformly
in [lcm_w_min, lcm_w_max]; the latents noised to t_{n+k}; the frozen teacher takes one classifier-free
guided DDIM step to t_n; the student's consistency function at t_{n+k} must equal the target
network's at t_n (f = c_skip z + c_out x0, LCM's boundary-condition scalings), by a pseudo-Huber or
L2 loss.

Full distillation: the student is a copy of the teacher's UNet with a guidance embedding (w goes in
as diffusers' `time_cond_proj_dim`, its projection starting at zero so the student starts as the
teacher), and the target network is an EMA of the student (`lcm_target_decay`). With --lora-rank:
adapters on a copy of the teacher's UNet (no guidance embedding: the LoRA learns the guided
trajectories of the w range), and the target is the student itself without gradients, as in
diffusers' LoRA script. The target is part of the trained module, so checkpoints resume exactly.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from latentloom.samplers.consistency import lcm_scalings
from latentloom.training.config import TrainConfig


class ConsistencyDistiller(nn.Module):
    """The trained module: the student (what `forward` runs, so DDP syncs its gradients) and, in full
    distillation, the frozen EMA target network."""

    def __init__(self, student: nn.Module, target: nn.Module | None) -> None:
        super().__init__()
        self.student = student
        self.target = target
        if target is not None:
            target.requires_grad_(False)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.student(*args, **kwargs)

    @torch.no_grad()
    def update_target(self, decay: float) -> None:
        if self.target is None:
            return
        for t, s in zip(self.target.parameters(), self.student.parameters()):
            t.lerp_(s.detach().to(t.dtype), 1.0 - decay)


def ddim_grid(alphas_cumprod: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (steps,) ascending k - 1, 2k - 1, ..., T - 1; each one's previous cumulative alpha,
    the first one's being timestep 0's): the DDIM solver the teacher steps on."""
    T = alphas_cumprod.shape[0]
    k = T // steps
    timesteps = torch.arange(1, steps + 1) * k - 1
    previous = torch.cat([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
    return timesteps, previous


def split_prediction(out: torch.Tensor, z: torch.Tensor, alpha_bar: torch.Tensor,
                     prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) a network's output means at the VP sample z (alpha_bar broadcast to z)."""
    a, s = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (z - s * out) / a, out
    if prediction_type == "v_prediction":
        return a * z - s * out, a * out + s * z
    raise ValueError(f"prediction_type {prediction_type!r} is not supported for distillation")


class LCMTask:
    """Batches of {"pixel_values", "caption"} -> the consistency distillation loss; exports an LCM model
    folder (full) or an LCM-LoRA file."""

    def __init__(self, cfg: TrainConfig, *, teacher, student: nn.Module, target: nn.Module | None, dataset: Any,
                 exporter: Callable[[nn.Module, Path], None]) -> None:
        self.cfg, self.pipe, self.dataset, self.exporter = cfg, teacher, dataset, exporter
        self.teacher_unet = teacher.unet
        self.teacher_unet.requires_grad_(False).eval()
        self.model = ConsistencyDistiller(student, target)
        schedule = teacher.schedule_config.for_sampler("ddpm")
        from latentloom.samplers.schedules import DiscreteSchedule

        self.alphas_cumprod = DiscreteSchedule.from_config(schedule).alphas_cumprod.double()
        self.prediction_type = schedule.prediction_type
        self.grid, self.previous = ddim_grid(self.alphas_cumprod, cfg.lcm_num_ddim_timesteps)
        self.k = self.alphas_cumprod.shape[0] // cfg.lcm_num_ddim_timesteps
        self.guided_student = getattr(student.config, "time_cond_proj_dim", None) is not None

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
                 "caption": [it["caption"] for it in items]}
        if all("micro" in it for it in items):
            batch["micro"] = torch.stack([it["micro"] for it in items])  # SDXL: original size, crop
        return batch

    def _vectors(self, cond, uncond, micro: torch.Tensor | None, device) -> tuple[dict, dict]:
        """SDXL: y for the prompts and for the empty prompt (each image's own size and crop, the training
        size as target), as `UNetTask.vector_conditioning`; nothing for other UNets."""
        if getattr(self.teacher_unet.config, "adm_in_channels", None) is None:
            return {}, {}
        if micro is None:
            raise ValueError("distilling SDXL needs each image's size and crop (the dataset gives them)")
        size = micro.new_tensor([self.cfg.resolution, self.cfg.resolution]).expand(micro.shape[0], 2)
        numbers = torch.cat([micro, size], dim=1).to(device=device, dtype=torch.float32)
        make = self.teacher_unet.vector_conditioning
        return ({"y": make(cond.pooled.to(device=device, dtype=torch.float32), numbers)},
                {"y": make(uncond.pooled.to(device=device, dtype=torch.float32), numbers)})

    def after_step(self, model: nn.Module) -> None:
        """After each optimizer step: the EMA target follows the student."""
        model.update_target(self.cfg.lcm_target_decay)

    def _scalings(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [lcm_scalings(float(v), self.cfg.lcm_timestep_scaling) for v in t.tolist()]
        shape = (-1,) + (1,) * (like.ndim - 1)
        c_skip = torch.tensor([p[0] for p in pairs], dtype=like.dtype, device=like.device).view(shape)
        c_out = torch.tensor([p[1] for p in pairs], dtype=like.dtype, device=like.device).view(shape)
        return c_skip, c_out

    def loss(self, model: nn.Module, batch: dict[str, Any], *, generators: dict[str, torch.Generator]) -> torch.Tensor:
        from latentloom.vae.codec import encode_images

        cfg, pipe = self.cfg, self.pipe
        gen = generators["noise"]
        device = gen.device
        pixels = batch["pixel_values"].to(device=device, dtype=torch.float32)
        from latentloom.training.task_unet import drop_captions

        captions = drop_captions(batch["caption"], p=cfg.caption_dropout, generator=generators["host"])
        with torch.no_grad():
            x0 = encode_images(pipe.vae, pixels, generator=gen).float()  # (B, C, h, w)
            cond, uncond = pipe.text_encoder.encode_pair(captions, [""] * len(captions))
        B = x0.shape[0]
        hidden, mask = cond.hidden.to(device=device, dtype=torch.float32), cond.mask.to(device)
        u_hidden, u_mask = uncond.hidden.to(device=device, dtype=torch.float32), uncond.mask.to(device)
        use_mask = pipe.use_context_mask
        y_cond, y_uncond = self._vectors(cond, uncond, batch.get("micro"), device)

        index = torch.randint(0, len(self.grid), (B,), generator=gen, device=device).cpu()
        start = self.grid[index]  # t_{n+k}
        end = (start - self.k).clamp(min=0)  # t_n (the first grid point steps to timestep 0)
        ac = self.alphas_cumprod.to(device)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        a_start = ac[start.to(device)].float().view(shape)
        a_prev = self.previous.to(device)[index.to(device)].float().view(shape)
        noise = torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype)
        z = a_start.sqrt() * x0 + (1 - a_start).sqrt() * noise
        w = cfg.lcm_w_min + (cfg.lcm_w_max - cfg.lcm_w_min) * torch.rand(B, generator=gen, device=device)
        guidance = {"guidance": w} if self.guided_student else {}
        t_start, t_end = start.to(device=device, dtype=torch.float32), end.to(device=device, dtype=torch.float32)

        # the student's consistency function at t_{n+k}
        c_skip_start, c_out_start = self._scalings(start, x0)
        out = model(z, t_start, hidden, context_mask=mask if use_mask else None, **guidance, **y_cond)
        student_x0, _ = split_prediction(out.float(), z, a_start, self.prediction_type)
        prediction = c_skip_start * z + c_out_start * student_x0

        with torch.no_grad():
            # the teacher's guided DDIM step from t_{n+k} to t_n
            y_both = {"y": torch.cat([y_cond["y"], y_uncond["y"]])} if y_cond else {}
            both = self.teacher_unet(torch.cat([z, z]), torch.cat([t_start, t_start]), torch.cat([hidden, u_hidden]),
                                     context_mask=torch.cat([mask, u_mask]) if use_mask else None, **y_both).float()
            c_x0, c_eps = split_prediction(both[:B], z, a_start, self.prediction_type)
            u_x0, u_eps = split_prediction(both[B:], z, a_start, self.prediction_type)
            wv = w.view(shape)
            x0_g, eps_g = c_x0 + wv * (c_x0 - u_x0), c_eps + wv * (c_eps - u_eps)
            z_prev = a_prev.sqrt() * x0_g + (1 - a_prev).sqrt() * eps_g
            # the target network's consistency function at t_n
            target_net = self.model.target if self.model.target is not None else self.model.student
            a_end = ac[end.to(device)].float().view(shape)
            t_out = target_net(z_prev, t_end, hidden, context_mask=mask if use_mask else None, **guidance, **y_cond)
            target_x0, _ = split_prediction(t_out.float(), z_prev, a_end, self.prediction_type)
            c_skip, c_out = self._scalings(end, x0)
            target = c_skip * z_prev + c_out * target_x0

        if cfg.lcm_loss == "huber":
            c = cfg.lcm_huber_c
            return (((prediction - target) ** 2 + c**2).sqrt() - c).mean()
        return ((prediction - target) ** 2).mean()

    def export(self, model: nn.Module, output: Path) -> None:
        student = model.student if isinstance(model, ConsistencyDistiller) else model
        self.exporter(student, output)


def build_lcm_task(cfg: TrainConfig, *, device: torch.device, is_main: bool, barrier: Callable[[], None]):
    """The LCMTask for `latentloom train --model lcm --pretrained TEACHER [--lora-rank R]`."""
    from latentloom.training.tasks import load_dataset, load_frozen_model

    if cfg.pretrained is None:
        raise ValueError("distillation needs its teacher: pass pretrained=<model folder, file, or bundled:NAME>")
    if cfg.cache_latents:
        raise ValueError("cache_latents is not supported for distillation (model='lcm'): it encodes each batch")
    unused = {name: value for name, value in (("min_snr_gamma", cfg.min_snr_gamma), ("noise_offset", cfg.noise_offset),
                                              ("x0_weighting", cfg.x0_weighting), ("vae", cfg.vae),
                                              ("model_config", cfg.model_config)) if value}
    if unused:
        raise ValueError(f"{sorted(unused)} do not apply to distillation (model='lcm'): its loss is the consistency "
                         "loss, and the teacher brings its own VAE and architecture")
    teacher = load_frozen_model(cfg.pretrained, device=device, purpose="distillation")
    if cfg.lora_rank:
        from latentloom.training.lora import add_lora

        student = add_lora(copy.deepcopy(teacher.unet).train(), rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                           targets=LCM_LORA_TARGETS)
        target = None
    else:
        student = guided_copy(teacher.unet, cfg.lcm_cond_dim).to(device)
        target = copy.deepcopy(student).eval()
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    dataset = load_dataset(cfg)
    return LCMTask(cfg, teacher=teacher, student=student, target=target, dataset=dataset,
                   exporter=lambda model, output: export_lcm(cfg, teacher, model, output))


# the layers LCM-LoRAs adapt: attention, the transformer's projections and feed-forward, the ResBlocks
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "time_emb_proj")


def guided_copy(unet: nn.Module, cond_dim: int) -> nn.Module:
    """A copy of `unet` with a guidance embedding of width `cond_dim` whose projection starts at zero
    (so the copy computes what `unet` does until it learns to read w)."""
    import dataclasses

    from latentloom.unet import UNet

    config = dataclasses.replace(unet.config, time_cond_proj_dim=cond_dim)
    student = UNet(config)
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise RuntimeError(f"copying the teacher left {missing} missing and {unexpected} unexpected")
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    student.set_attention_backend(getattr(unet, "attention_backend", "sdpa"))
    return student.train()


def export_lcm(cfg: TrainConfig, teacher, student: nn.Module, output: Path) -> None:
    """LoRA: OUT/lora.safetensors, for the teacher (`pipe.load_lora`, then sampler="lcm"). Full: a model
    folder whose defaults are the lcm sampler, 4 steps and the middle of the w range, with the
    teacher's VAE and text encoder."""
    from latentloom.file_io import write_json_atomic
    from latentloom.model_folder import update_model_index, write_component

    output = Path(output)
    if cfg.lora_rank:
        from latentloom.training.lora import save_lora

        output.mkdir(parents=True, exist_ok=True)
        save_lora(student, output / "lora.safetensors")
        return
    schedule = {**teacher.schedule_config.settings(), "original_inference_steps": cfg.lcm_num_ddim_timesteps,
                "timestep_scaling": cfg.lcm_timestep_scaling, "_class_name": "LCMScheduler"}
    write_component(output, "unet", lambda tmp: student.save_pretrained(tmp))
    write_component(output, "scheduler", lambda tmp: write_json_atomic(tmp / "scheduler_config.json", schedule))
    write_component(output, "vae", lambda tmp: teacher.vae.save_pretrained(str(tmp), safe_serialization=True))
    encoder = teacher.text_encoder
    kind = type(encoder).__name__
    extra = {}
    if kind in ("CLIPEncoder", "SDXLTextEncoders"):
        sdxl = kind == "SDXLTextEncoders"
        parts = [("", encoder.encoder_1), ("_2", encoder.encoder_2)] if sdxl else [("", encoder)]
        for suffix, part in parts:
            write_component(output, f"text_encoder{suffix}", lambda tmp, e=part: e.model.save_pretrained(str(tmp)))
            write_component(output, f"tokenizer{suffix}", lambda tmp, e=part: e.tokenizer.save_pretrained(str(tmp)))
        text = {"kind": "sdxl" if sdxl else "clip"}
        if sdxl:
            extra["force_zeros_for_empty_prompt"] = encoder.force_zeros_for_empty_prompt
    else:
        text = {"kind": "minilm"}  # the bundled encoder ships with latentloom
    defaults = {"sampler": "lcm", "num_inference_steps": 4,
                "guidance_scale": 1.0 + (cfg.lcm_w_min + cfg.lcm_w_max) / 2, "height": cfg.resolution,
                "width": cfg.resolution}
    update_model_index(output, text_encoder=text, resolution=cfg.resolution, space="latent",
                       use_context_mask=teacher.use_context_mask, defaults=defaults, distilled_from=str(cfg.pretrained),
                       **extra)
