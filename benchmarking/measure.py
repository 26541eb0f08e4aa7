"""Measuring helpers shared by the benchmarks: peak RSS, alternated timing, medians, tables.

No torch import here: the CLI reads this module before it knows which target runs.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where that is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def max_rss_bytes() -> int:
    """The process's peak RSS since it started (getrusage reports KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Samples RSS every 2 ms on a thread; ``peak - start`` is what the block adds."""

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

    @property
    def growth(self) -> int:
        return self.peak - self.start


class MemoryLimitExceeded(RuntimeError):
    """A child process grew past the memory it was allowed and was stopped."""

    def __init__(self, limit: int, spec: str) -> None:
        super().__init__(f"case {spec} went over {limit / 1e9:.1f} GB of RSS and was stopped")
        self.limit = limit


def memory_total_bytes() -> int:
    """This machine's RAM (MemTotal; 0 where /proc/meminfo is unavailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _child_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(module: str, spec: dict[str, Any], *, threads: int, timeout: float,
              memory_limit: int | None = None) -> dict[str, Any]:
    """`python -m MODULE --child SPEC` in a fresh process; the JSON object it prints last. A child
    whose RSS passes `memory_limit` bytes is killed (MemoryLimitExceeded) before the machine's
    out-of-memory killer picks a process; RuntimeError carries the stderr tail of a failed child."""
    text = json.dumps(spec)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # before torch starts its pool in the child
    env.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", module, "--child", text], stdout=out, stderr=err, env=env,
                                text=True)
        start = time.monotonic()
        while proc.poll() is None:
            if memory_limit and _child_rss(proc.pid) > memory_limit:
                proc.kill()
                proc.wait()
                raise MemoryLimitExceeded(memory_limit, text)
            if time.monotonic() - start > timeout:
                proc.kill()
                proc.wait()
                raise subprocess.TimeoutExpired(proc.args, timeout)
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = "\n".join(err.read().strip().splitlines()[-15:])
            raise RuntimeError(f"case {text} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (ValueError names the empty sample)."""
    if len(values) == 0:
        raise ValueError("median of an empty sample: nothing was measured")
    return float(statistics.median(values))


@dataclass
class Samples:
    """Per-callable measurements of the timed runs (warm-up runs are not in them)."""

    wall: dict[str, list[float]]  # seconds per run
    cpu: dict[str, list[float]]  # process CPU seconds per run
    rss_growth: dict[str, list[int]]  # peak RSS minus RSS at the run's start, bytes (empty without rss=True)
    results: dict[str, list[Any]]  # what each timed run returned
    warmup_results: dict[str, list[Any]] = field(default_factory=dict)

    def paired_ratio(self, num: str, den: str) -> float:
        """Median of run-by-run ratios: neighbouring runs share the machine's momentary load,
        so this is steadier than the ratio of medians when other jobs come and go."""
        return median([a / b for a, b in zip(self.wall[num], self.wall[den])])


def alternate(
    fns: Mapping[str, Callable[[], Any]], *, runs: int, warmup: int = 1, rss: bool = False
) -> Samples:
    """Call each function `warmup` times, then `runs` times in alternation (order flipped on
    every other round so neither side always runs right after the other's cache churn)."""
    if not fns:
        raise ValueError("alternate needs at least one callable")
    for name, value in (("runs", runs), ("warmup", warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "runs" else 0):
            raise ValueError(f"{name} must be an int >= {1 if name == 'runs' else 0}, got {value!r}")
    names = list(fns)
    samples = Samples(wall={n: [] for n in names}, cpu={n: [] for n in names},
                      rss_growth={n: [] for n in names}, results={n: [] for n in names},
                      warmup_results={n: [] for n in names})
    for _ in range(warmup):
        for name in names:
            samples.warmup_results[name].append(fns[name]())
    for r in range(runs):
        for name in names if r % 2 == 0 else names[::-1]:
            mem = PeakRSS() if rss else None
            if mem is not None:
                mem.__enter__()
            try:
                t0, c0 = time.perf_counter(), time.process_time()
                result = fns[name]()
                samples.wall[name].append(time.perf_counter() - t0)
                samples.cpu[name].append(time.process_time() - c0)
            finally:
                if mem is not None:
                    mem.__exit__(None, None, None)
            if mem is not None:
                samples.rss_growth[name].append(mem.growth)
            samples.results[name].append(result)
    return samples


@dataclass
class Table:
    """One result table: printed as markdown (README-ready), saved as JSON."""

    title: str
    header: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_row(self, row: Sequence[Any]) -> None:
        if len(row) != len(self.header):
            raise ValueError(f"table {self.title!r}: a row has {len(row)} cells, the header {len(self.header)}")
        self.rows.append(list(row))

    def to_markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join("---" for _ in self.header) + "|"]
        lines += ["| " + " | ".join(format_cell(c) for c in row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; a non-finite number becomes None (JSON has no NaN)."""
        rows = [[None if isinstance(c, float) and not math.isfinite(c) else c for c in r] for r in self.rows]
        return {"title": self.title, "header": list(self.header), "rows": rows, "notes": list(self.notes)}


def format_cell(value: Any) -> str:
    """Numbers with 3 significant digits (small ones in e-notation); None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if value != 0 and abs(value) < 1e-2:
        return f"{value:.2e}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def report(tables: Sequence[Table], *, command: str, json_path: str | os.PathLike | None) -> None:
    """Print each table as markdown with the command that made it, and write them as JSON if asked."""
    for table in tables:
        table.notes.append(f"command: `{command}`")
        print(table.to_markdown(), flush=True)
    if json_path is not None:
        write_json(tables, json_path, command=command)


def write_json(tables: Sequence[Table], path: str | os.PathLike, *, command: str) -> None:
    """Write the tables and the command that made them; a temporary name, then a rename."""
    from latentloom.file_io import write_json_atomic

    data = {"command": command, "tables": [t.to_dict() for t in tables]}
    write_json_atomic(path, data, sort_keys=False, allow_nan=False)
