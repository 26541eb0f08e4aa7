"""Cold start of the bundled `generate` at an older commit against this checkout and a bare `import torch`,
alternated in fresh processes (the README's before/after table for issue 23):

    git worktree add /tmp/before_wt OLD_COMMIT && mkdir -p /tmp/before_pkg
    ln -s /tmp/before_wt /tmp/before_pkg/latentloom
    python benchmarks/startup_before_after.py /tmp/before_pkg 5

The older package is put first on PYTHONPATH, so the same interpreter and venv run both.
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "a red circle on a blue background"


def main(before_path: str, runs: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = tempfile.mkdtemp()
    generate = [sys.executable, "-m", "latentloom", "generate", PROMPT, "--no-progress", "-o"]
    commands = {
        "before": (generate + [f"{out}/before.png"], {"PYTHONPATH": before_path}),
        "after": (generate + [f"{out}/after.png"], {}),
        "import torch": ([sys.executable, "-c", "import torch"], {}),
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    names = list(commands)
    for r in range(runs):
        for name in names if r % 2 == 0 else names[::-1]:
            argv, extra = commands[name]
            t0 = time.perf_counter()
            subprocess.run(argv, env={**env, **extra}, cwd=out, check=True, capture_output=True)
            times[name].append(time.perf_counter() - t0)
    floor = statistics.median(times["import torch"])
    for name, values in times.items():
        m = statistics.median(values)
        print(f"| {name} | {m:.2f} | {m / floor:.2f}x | {' '.join(f'{v:.2f}' for v in values)} |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5)
