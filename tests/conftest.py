"""Test-wide settings: never touch the network, keep CPU threads predictable."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Shared builders of tiny models live in tests/builders.py; make it importable from tests.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread(request):
    """Training tests with tiny models run on one torch thread: thread start-up and contention cost
    more than they save, and the crash tests' in-process runs must add floats in the killed child's
    order. Opt in per module with `ONE_TORCH_THREAD = True`."""
    if not getattr(request.module, "ONE_TORCH_THREAD", False):
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
