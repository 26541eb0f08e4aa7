"""`latentloom bench unet --roofline`: where a UNet forward's time goes, next to what this CPU can do.

For each library and mode, one forward is counted (FLOPs with torch's FlopCounterMode, per op;
bytes each op reads and writes, with a dispatch mode beside it) and the fastest of `--runs`
profiled forwards is timed per op (torch.profiler self CPU time). Ops are grouped into kinds
(matmul/linear, conv, attention, norm, elementwise, upsample, copy/layout); each kind gets its
share of the forward, its GFLOP, the GFLOP/s and GB/s it achieved, and the fraction of this
machine's measured peak: a large GEMM for matmul and attention, a 3x3 conv at the UNet's own
shapes for conv, and a large tensor copy's bandwidth for the memory-bound kinds.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from latentloom.benchmarking.measure import Table

KINDS = ("matmul/linear", "conv", "attention", "norm", "elementwise", "upsample", "copy/layout", "other ops",
         "outside ops")
COMPUTE_KINDS = {"matmul/linear": "matmul", "attention": "matmul", "conv": "conv"}
MEMORY_KINDS = ("norm", "elementwise", "upsample", "copy/layout")
_OPS = {  # aten op name (no namespace, no overload) -> kind; anything else is "other ops"
    "matmul/linear": "mm addmm bmm baddbmm matmul linear _addmm_activation mkldnn_linear",
    "conv": "convolution _convolution conv2d mkldnn_convolution _slow_conv2d_forward thnn_conv2d "
            "_nnpack_spatial_convolution convolution_overrideable _conv_depthwise2d",
    "attention": "scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu "
                 "_scaled_dot_product_attention_math _scaled_dot_product_flash_attention "
                 "_scaled_dot_product_efficient_attention softmax _softmax",
    "norm": "group_norm native_group_norm layer_norm native_layer_norm batch_norm native_batch_norm "
            "_native_batch_norm_legit_no_training",
    "elementwise": "silu silu_ gelu gelu_ add add_ mul mul_ sub sub_ div div_ sigmoid exp sin cos neg "
                   "pow rsqrt sqrt tanh clamp clamp_ where fill_ zero_ masked_fill masked_fill_ "
                   "addcmul addcmul_ mean sum",
    "upsample": "upsample_nearest2d _upsample_nearest_exact2d upsample_bilinear2d interpolate",
    "copy/layout": "copy_ cat stack clone contiguous to _to_copy empty empty_like empty_strided zeros "
                   "zeros_like view reshape _unsafe_view permute transpose t as_strided expand chunk "
                   "split split_with_sizes slice select unsqueeze squeeze flatten detach alias narrow pad "
                   "constant_pad_nd resize_ _reshape_alias unbind",
}
OP_KIND = {op: kind for kind, ops in _OPS.items() for op in ops.split()}
GEMM_N = 2048  # the peak GEMM: 2048^3, 17 GFLOP
COPY_BYTES = 256 * 2**20  # the bandwidth probe: far past any cache
UNWRITTEN = {"aten::empty", "aten::empty_like", "aten::empty_strided"}  # allocate only: no bytes move
HEADER = ["op kind", "library", "ms", "share %", "GFLOP", "GB moved", "GFLOP/s", "GB/s", "% of peak",
          "peak used"]


def op_kind(name: str) -> str:
    """Kind of an aten op named as the profiler does ('aten::mm'), as an OpOverload's name() does
    ('aten::mm.default') or as its str() does ('aten.mm.default')."""
    if "::" in name:  # 'aten::mul' (profiler) or 'aten::mul.Tensor' (an OpOverload's name())
        name = name.split("::", 1)[1]
    elif name.startswith("aten."):
        name = name[len("aten."):]
    return OP_KIND.get(name.split(".", 1)[0], "other ops")


def _cpu_flash_flops(query, key, value, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of the CPU flash kernel, which FlopCounterMode does not know (torch 2.13): q k^T and p v."""
    b, h, n, d = query
    return 4 * b * h * n * key[2] * d


def flop_mapping() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode's custom_mapping that adds the CPU attention kernel."""
    import torch

    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops}


def count(fn: Callable[[], Any]) -> tuple[dict[str, float], dict[str, float]]:
    """Run fn once; FLOPs and bytes read + written per kind (each op's tensors counted once per op)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import FlopCounterMode

    moved = dict.fromkeys(KINDS, 0.0)

    class ByteCounter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
                outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
                ptrs = {a.untyped_storage().data_ptr() for a in ins}
                new = any(o.untyped_storage().data_ptr() not in ptrs for o in outs)
                if (func._schema.is_mutable or new) and func.name() not in UNWRITTEN:
                    if func.name() == "aten::copy_":
                        ins = ins[1:]  # the destination is written, not read
                    moved[op_kind(func.name())] += sum(t.nbytes for t in ins + outs)
            return out

    # The byte counter sits inside the FLOP counter: every top-level op passes through both.
    with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as flops, ByteCounter():
        fn()
    by_kind = dict.fromkeys(KINDS, 0.0)
    for op, n in flops.get_flop_counts().get("Global", {}).items():
        by_kind[op_kind(str(op))] += n
    return by_kind, moved


def profile_kinds(fn: Callable[[], Any]) -> tuple[float, dict[str, float]]:
    """Wall seconds of one forward under torch.profiler, and self CPU seconds per kind; what no op
    holds (Python, module calls, the profiler itself) is the kind 'outside ops'."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    seconds = dict.fromkeys(KINDS, 0.0)
    for event in prof.key_averages():
        seconds[op_kind(event.key)] += event.self_cpu_time_total / 1e6
    seconds["outside ops"] = max(0.0, wall - sum(seconds.values()))
    return wall, seconds


def _best_seconds(fn: Callable[[], Any], *, min_runs: int = 3, min_seconds: float = 0.5) -> float:
    """Fastest of at least `min_runs` calls (and at least `min_seconds` in all), after one warm-up."""
    fn()
    times: list[float] = []
    while len(times) < min_runs or sum(times) < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_peaks(cfg: Any, *, batch: int, size: int, dtype: Any, channels_last: bool) -> dict[str, Any]:
    """This machine's best GFLOP/s for matmul (a 2048^3 GEMM and the UNet's widest linear) and for
    a 3x3 conv (each level's width at its resolution), and copy bandwidth in GB/s."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    probes: dict[str, float] = {}
    with torch.no_grad():
        c0 = cfg.channels[0]
        for label, (m, k, n) in {f"GEMM {GEMM_N}^3": (GEMM_N,) * 3,
                                 f"linear {batch * size * size}x{c0}x{8 * c0}": (batch * size * size, c0, 8 * c0)
                                 }.items():
            a = torch.randn(m, k, generator=g).to(dtype)
            b = torch.randn(k, n, generator=g).to(dtype)
            probes["matmul " + label] = 2 * m * k * n / _best_seconds(lambda: torch.mm(a, b)) / 1e9
        # every level's width at its resolution: no single conv shape is the fastest in every dtype/layout
        levels = {(ch, max(1, size // 2 ** i)) for i, ch in enumerate(cfg.channels)}
        for ch, hw in sorted(levels, key=lambda p: -p[1]):
            x = torch.randn(batch, ch, hw, hw, generator=g).to(dtype).contiguous(memory_format=fmt)
            w = torch.randn(ch, ch, 3, 3, generator=g).to(dtype).contiguous(memory_format=fmt)
            flops = 2 * batch * hw * hw * ch * ch * 9
            probes[f"conv 3x3 {ch}ch {hw}x{hw}"] = flops / _best_seconds(lambda: F.conv2d(x, w, padding=1)) / 1e9
        src = torch.empty(COPY_BYTES // 4, dtype=torch.float32).uniform_(generator=g)
        dst = torch.empty_like(src)
        bandwidth = 2 * COPY_BYTES / _best_seconds(lambda: dst.copy_(src)) / 1e9
    return {
        "matmul": max(v for k, v in probes.items() if k.startswith("matmul")),
        "conv": max(v for k, v in probes.items() if k.startswith("conv")),
        "bandwidth": bandwidth,
        "probes": probes,
    }


def kind_rows(library: str, wall: float, seconds: dict[str, float], flops: dict[str, float],
              moved: dict[str, float], peaks: dict[str, Any]) -> list[list[Any]]:
    """One row per kind that took time or did FLOPs, then the library's total."""
    rows = []
    for kind in KINDS:
        s, f, b = seconds[kind], flops[kind], moved[kind]
        if s == 0 and f == 0:
            continue
        gflops = f / s / 1e9 if s > 0 and f > 0 else None
        gbs = b / s / 1e9 if s > 0 and b > 0 else None
        if kind in COMPUTE_KINDS:
            peak_name = COMPUTE_KINDS[kind]
            of_peak = 100 * gflops / peaks[peak_name] if gflops else None
            used = f"{peak_name} {peaks[peak_name]:.0f} GFLOP/s"
        elif kind in MEMORY_KINDS:
            of_peak = 100 * gbs / peaks["bandwidth"] if gbs else None
            used = f"copy {peaks['bandwidth']:.1f} GB/s"
        else:
            of_peak, used = None, "n/a"
        rows.append([kind, library, 1e3 * s, 100 * s / wall, f / 1e9, b / 1e9 if b else None, gflops, gbs,
                     of_peak, used])
    total_f = sum(flops.values())
    rows.append(["total", library, 1e3 * wall, 100.0, total_f / 1e9, sum(moved.values()) / 1e9,
                 total_f / wall / 1e9, None, None, "n/a"])
    return rows


def cpu_description() -> str:
    """'AMD EPYC (avx512_bf16)' from /proc/cpuinfo; the flags that decide bf16 speed."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    best = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags][:1]
    return f"{name} ({best[0] if best else 'no AVX2'})"


def run(args: argparse.Namespace, ref: Any, ours: Any, cfg: Any, x32: Any, c32: Any, t: Any,
        modes: dict[str, tuple[str, bool]], runs: int) -> list[Table]:
    """One table per mode (both libraries, kind by kind) and one of the measured peaks."""
    import torch

    tables = []
    peak_table = Table(title=f"Measured peaks, {cpu_description()}, {torch.get_num_threads()} thread(s)",
                       header=["mode", "probe", "value", "unit"])
    for mode, (dtype_name, channels_last) in modes.items():
        dtype = getattr(torch, dtype_name)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for model in (ref, ours):
            model.to(dtype=dtype, memory_format=fmt)
        x = x32.to(dtype=dtype).contiguous(memory_format=fmt)
        c = c32.to(dtype=dtype)
        fns = {"latentloom": lambda: ours(x, t, c), "diffusers": lambda: ref(x, t, c).sample}
        probe = dict(cfg=cfg, batch=args.batch, size=args.size, dtype=dtype, channels_last=channels_last)
        before = measure_peaks(**probe)
        table = Table(
            title=(f"UNet forward by op kind, {mode}, {args.preset or 'sd15'}, latents {args.batch}x"
                   f"{cfg.in_channels}x{args.size}x{args.size}, {cpu_description()}, "
                   f"{torch.get_num_threads()} thread(s)"),
            header=list(HEADER),
        )
        rows: dict[str, list[list[Any]]] = {}
        with torch.no_grad():
            counted = {name: count(fn) for name, fn in fns.items()}  # also the warm-up
            best: dict[str, tuple[float, dict[str, float]]] = {}
            for r in range(runs):  # alternated; the fastest forward of each library is kept
                for name in fns if r % 2 == 0 else list(fns)[::-1]:
                    wall, seconds = profile_kinds(fns[name])
                    if name not in best or wall < best[name][0]:
                        best[name] = (wall, seconds)
        # Probed again after the forwards, best of both: a probe that ran while other jobs held the
        # cores would otherwise make every kind look closer to peak than it is.
        after = measure_peaks(**probe)
        peaks = {k: max(before[k], after[k]) for k in ("matmul", "conv", "bandwidth")}
        for label in before["probes"]:
            peak_table.add_row([mode, label, max(before["probes"][label], after["probes"][label]), "GFLOP/s"])
        peak_table.add_row([mode, f"copy {COPY_BYTES >> 20} MiB", peaks["bandwidth"], "GB/s"])
        for name in fns:
            rows[name] = kind_rows(name, *best[name], *counted[name], peaks)
            print(f"  {mode} {name}: {best[name][0]:.3f} s per profiled forward", flush=True)
        order = {row[0]: i for i, row in enumerate(rows["latentloom"] + rows["diffusers"])}
        for row in sorted(rows["latentloom"] + rows["diffusers"], key=lambda r: (order[r[0]], r[1] != "latentloom")):
            table.add_row(row)
        table.notes += [
            f"fastest of {runs} profiled forward(s) per library, alternated, after one counting forward",
            "ms = self CPU time of the kind's aten ops (torch.profiler); outside ops = Python and module calls "
            "between ops; share % of the profiled forward's wall time",
            "GFLOP = torch.utils.flop_counter.FlopCounterMode (the CPU flash-attention kernel added); GB moved = "
            "bytes of each op's input and output tensors, once per op (a lower bound on traffic)",
            f"peaks (this mode): matmul {peaks['matmul']:.0f} GFLOP/s, conv {peaks['conv']:.0f} GFLOP/s, copy "
            f"{peaks['bandwidth']:.1f} GB/s; % of peak = GFLOP/s over the FLOP peak for matmul/attention/conv, "
            "GB/s over the copy bandwidth for memory-bound kinds",
        ]
        if any(row[8] is not None and row[8] > 100 for row in table.rows):
            table.notes.append("a kind above 100% of peak: the peak probes ran slower than the forward (other jobs "
                               "on the cores?); rerun on a quiet machine")
        tables.append(table)
    peak_table.notes.append("fastest of >= 3 calls after a warm-up, probed before and after the forwards; matmul and "
                            "conv peaks = the best probe of each")
    return [*tables, peak_table]
