"""latentloom UNet vs diffusers UNet2DConditionModel: same random SD-sized weights, one process.

Alternates the two models run by run (the cores are shared, so only the ratio is
meaningful), and prints the median seconds per forward, the ratio latentloom/diffusers,
the peak RSS growth during a forward and the largest output difference.

    .venv/bin/python benchmarks/unet.py                      # SD 1.5, 64x64, batch 2
    .venv/bin/python benchmarks/unet.py --modes bf16-cl --runs 5 --profile
"""
from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

MODES = {  # name -> (dtype, channels_last)
    "fp32": (torch.float32, False),
    "fp32-cl": (torch.float32, True),
    "bf16": (torch.bfloat16, False),
    "bf16-cl": (torch.bfloat16, True),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples RSS every 2 ms on a thread; ``peak - start`` is what one forward adds."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd15", choices=["sd15", "sd2", "tiny"])
    p.add_argument("--size", type=int, default=64, help="latent height = width")
    p.add_argument("--batch", type=int, default=2, help="2 = one classifier-free-guidance step")
    p.add_argument("--modes", default="fp32,bf16-cl", help=f"comma list of {list(MODES)}")
    p.add_argument("--runs", type=int, default=3, help="timed forwards per model and mode")
    p.add_argument("--backend", default="sdpa", help="latentloom attention backend")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: leave torch's default). With 1 thread the CPU-time "
                        "ratio measures the work itself, undisturbed by other jobs on shared cores")
    p.add_argument("--profile", action="store_true", help="print both models' top ops (torch.profiler)")
    args = p.parse_args()

    from diffusers import UNet2DConditionModel

    from latentloom.unet import UNet, UNetConfig

    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = getattr(UNetConfig, args.preset)()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ref = UNet2DConditionModel(**cfg.to_diffusers_config()).eval()
    ours = UNet.from_diffusers(ref)
    ours.set_attention_backend(args.backend)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"{args.preset}: {n_params / 1e6:.1f} M params, built in {time.perf_counter() - t0:.1f} s; "
          f"latents {args.batch}x{cfg.in_channels}x{args.size}x{args.size}, context 77x{cfg.context_dim}, "
          f"threads {torch.get_num_threads()}")

    g = torch.Generator().manual_seed(1)
    x32 = torch.randn(args.batch, cfg.in_channels, args.size, args.size, generator=g)
    c32 = torch.randn(args.batch, 77, cfg.context_dim, generator=g)
    t = torch.full((args.batch,), 500.0)

    rows = []
    for mode in args.modes.split(","):
        dtype, cl = MODES[mode]
        fmt = torch.channels_last if cl else torch.contiguous_format
        ref.to(dtype=dtype, memory_format=fmt)
        ours.to(dtype=dtype, memory_format=fmt)
        x, c = x32.to(dtype).contiguous(memory_format=fmt), c32.to(dtype)
        models = {"diffusers": lambda: ref(x, t, c).sample, "latentloom": lambda: ours(x, t, c)}
        times: dict[str, list[float]] = {k: [] for k in models}
        cpu: dict[str, list[float]] = {k: [] for k in models}
        peaks: dict[str, int] = {k: 0 for k in models}
        outs = {}
        with torch.inference_mode():
            for name, f in models.items():  # warm-up (oneDNN primitive creation)
                outs[name] = f().float()
            for r in range(args.runs):
                order = list(models) if r % 2 == 0 else list(models)[::-1]
                for name in order:
                    with PeakRSS() as mem:
                        t1, c1 = time.perf_counter(), time.process_time()
                        models[name]()
                        times[name].append(time.perf_counter() - t1)
                        cpu[name].append(time.process_time() - c1)
                    peaks[name] = max(peaks[name], mem.peak - mem.start)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                for name, f in models.items():
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        f()
                    print(f"--- {mode} {name}")
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        med = {k: statistics.median(v) for k, v in times.items()}
        # Neighbouring runs share the machine's momentary load: the median of the per-run
        # ratios is steadier than the ratio of medians when other jobs come and go.
        paired = statistics.median(o / d for o, d in zip(times["latentloom"], times["diffusers"]))
        cpu_ratio = statistics.median(cpu["latentloom"]) / statistics.median(cpu["diffusers"])
        diff = (outs["latentloom"] - outs["diffusers"]).abs().max().item()
        scale = outs["diffusers"].abs().max().item()
        rows.append((mode, med["diffusers"], med["latentloom"], med["latentloom"] / med["diffusers"],
                     paired, cpu_ratio, peaks["diffusers"], peaks["latentloom"], diff / scale))
        for name in models:
            print(f"  {mode} {name}: wall {[round(v, 3) for v in times[name]]}  "
                  f"cpu {[round(v, 3) for v in cpu[name]]}", flush=True)

    print(f"\n{'mode':8} {'diffusers s':>12} {'latentloom s':>13} {'ratio':>6} {'paired':>7} {'cpu':>5} "
          f"{'dRSS diff. GB':>14} {'dRSS ll GB':>11} {'max|diff|/scale':>16}")
    for mode, d, o, ratio, paired, cr, pd, po, rel in rows:
        print(f"{mode:8} {d:12.3f} {o:13.3f} {ratio:6.2f} {paired:7.2f} {cr:5.2f} {pd / 1e9:14.2f} "
              f"{po / 1e9:11.2f} {rel:16.2e}")
    print("ratio = median latentloom / median diffusers (wall); paired = median of per-run wall "
          "ratios; cpu = ratio of median process CPU seconds; dRSS = peak RSS growth in one forward")
    print(f"process peak RSS {_maxrss_gb():.2f} GB")


def _maxrss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


if __name__ == "__main__":
    main()
