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


# The tiny Stable Diffusion model most pipeline tests share, one per test module (so a module that
# swaps the diffusers pipeline's scheduler or mutates latentloom's pipeline affects only itself).
# A module defines a fixture of the same name to use another model (test_upscale's x2 upscaler).
@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """(diffusers StableDiffusionPipeline from tests/builders.py, the folder it was saved to)."""
    from builders import save_sd_folder, tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    return pipe, save_sd_folder(pipe, tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def reference(tiny_sd):
    """The diffusers pipeline to compare with, and its saved folder."""
    return tiny_sd


@pytest.fixture(scope="module")
def folder(tiny_sd):
    """The saved diffusers folder of the tiny model."""
    return tiny_sd[1]


def _load(folder):
    import torch

    import latentloom

    return latentloom.load_pipeline(folder, device="cpu", dtype=torch.float32)  # float32: exact parity


@pytest.fixture(scope="module")
def ours(reference):
    """latentloom's pipeline on `reference`'s folder."""
    return _load(reference[1])


@pytest.fixture(scope="module")
def pipe(folder):
    """latentloom's pipeline on `folder`."""
    return _load(folder)
