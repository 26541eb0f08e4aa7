"""Crashes and full disks: a SIGKILL during a checkpoint save, and writes that fail midway with
ENOSPC, always leave the previous file whole and loadable."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latentloom.training.checkpoint import list_checkpoints, resolve_resume, save_checkpoint
from latentloom.training.config import TrainConfig
from latentloom.training.loop import train
from latentloom.synthetic.shapes import write_dataset
from latentloom.unet import UNet, UNetConfig

TINY = dict(channels=[8, 16], layers_per_level=1, attention_levels=[False, True], num_heads=2,
            context_dim=384, norm_groups=8, in_channels=3, out_channels=3)
# caption dropout on: the empty caption's embedding must not depend on which batch first encoded it
RUN = dict(resolution=16, batch_size=2, steps=4, lr=1e-3, lr_warmup_steps=1, checkpoint_every=2, seed=3,
           caption_dropout=0.5, progress=False)

# Runs `python -m latentloom.training` with save_file patched to stop (marker + long sleep) right after
# it wrote model.safetensors inside the temporary folder of checkpoint STEP: the parent SIGKILLs it there.
_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import latentloom.training.checkpoint as ck

    marker, step = Path(sys.argv[1]), sys.argv[2]
    real_save_file = ck.save_file

    def save_file(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        path = Path(filename)
        if path.parent.name == f".tmp-checkpoint-{step}" and path.name == "model.safetensors":
            marker.write_text(str(path))
            time.sleep(600)

    ck.save_file = save_file
    from latentloom.training.cli_train import main
    sys.exit(main(sys.argv[3:]))
""")


ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 8, seed=0)


@pytest.fixture(scope="module")
def unet_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "unet.json"
    UNetConfig(**TINY).save_json(path)
    return path


def _argv(data, unet_config, out, **extra):
    values = {**RUN, **extra}
    argv = ["--data", str(data), "--output", str(out), "--config", str(unet_config)]
    for key, value in values.items():
        if key == "progress":
            argv.append("--no-progress")
        else:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def test_sigkill_during_checkpoint_save_keeps_the_previous_one(data, unet_config, tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "inside-save"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(script), str(marker), "4", *_argv(data, unet_config, out)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"training ended before the save: {child.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("training never reached the checkpoint-4 save")
            time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    root = out / "checkpoints" / "unet"
    assert (root / ".tmp-checkpoint-4" / "model.safetensors").is_file()  # killed in the middle of it
    assert not (root / "checkpoint-4").exists()
    assert list_checkpoints(root) == [root / "checkpoint-2"]
    latest = resolve_resume("latest", root=root)
    assert latest == root / "checkpoint-2"
    assert json.loads((latest / "state.json").read_text())["step"] == 2
    assert load_file(str(latest / "model.safetensors"))  # whole and readable
    assert not (out / "model_index.json").exists()  # nothing was exported

    # `--resume latest` picks checkpoint-2 and ends exactly where an uninterrupted run ends
    resumed = train(TrainConfig(data=str(data), output=str(out), model_config=str(unet_config),
                                resume="latest", **RUN))
    straight = train(TrainConfig(data=str(data), output=str(tmp_path / "straight"), model_config=str(unet_config),
                                 **RUN))
    a = load_file(str(resumed / "unet" / "model.safetensors"))
    b = load_file(str(straight / "unet" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert not (root / ".tmp-checkpoint-4").exists()  # the leftover was cleared by the new save
    assert list_checkpoints(root) == [root / "checkpoint-2", root / "checkpoint-4"]


# ---------------------------------------------------------------- disk full in the middle of a write
def _disk_full_after(fraction):
    """A replacement writer: writes part of the file, then fails as a full disk does."""
    def write(data: bytes, path) -> None:
        with open(path, "wb") as f:
            f.write(data[: max(1, int(len(data) * fraction))])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write


def _failing_save_file(monkeypatch, module):
    from safetensors.torch import save as to_bytes

    full = _disk_full_after(0.5)
    monkeypatch.setattr(module, "save_file", lambda tensors, filename, metadata=None: full(
        to_bytes(tensors, metadata=metadata), filename))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_failing_with_disk_full_keeps_the_previous_model(monkeypatch, tmp_path):
    import latentloom.unet.loading as unet_loading
    from latentloom.model_folder import update_model_index, write_component

    out = tmp_path / "model"
    torch.manual_seed(0)
    old = UNet(UNetConfig.tiny())
    write_component(out, "unet", lambda tmp: old.save_pretrained(tmp))
    update_model_index(out, resolution=16)
    before = _snapshot(out)

    torch.manual_seed(1)
    new = UNet(UNetConfig.tiny())
    _failing_save_file(monkeypatch, unet_loading)
    with pytest.raises(OSError) as info:
        write_component(out, "unet", lambda tmp: new.save_pretrained(tmp))
    assert info.value.errno == errno.ENOSPC
    assert _snapshot(out) == before  # no temp folder left, no byte changed
    reloaded = UNet.from_pretrained(out / "unet")
    for key, value in old.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_unet_save_pretrained_failing_keeps_the_previous_weights(monkeypatch, tmp_path):
    import latentloom.unet.loading as unet_loading

    torch.manual_seed(0)
    UNet(UNetConfig.tiny()).save_pretrained(tmp_path)
    before = _snapshot(tmp_path)
    _failing_save_file(monkeypatch, unet_loading)
    with pytest.raises(OSError):
        UNet(UNetConfig.tiny()).save_pretrained(tmp_path)
    assert _snapshot(tmp_path) == before


def test_json_writes_failing_keep_the_previous_file(monkeypatch, tmp_path):
    import latentloom.file_io as file_io
    import latentloom.model_folder as export

    path = tmp_path / "model_index.json"
    file_io.write_json_atomic(path, {"format": "latentloom", "version": 1})
    before = path.read_bytes()

    def full_dump(value, f, **kwargs):
        f.write('{"format": "lat')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_io.json, "dump", full_dump)
    with pytest.raises(OSError):
        export.update_model_index(tmp_path, resolution=64)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model_index.json"]

    config_path = tmp_path / "config.json"
    UNetConfig.tiny().save_json(config_path)
    before = config_path.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        UNetConfig.tiny(context_dim=64).save_json(config_path)
    assert config_path.read_bytes() == before
    assert UNetConfig.load_json(config_path) == UNetConfig.tiny()


def test_checkpoint_save_failing_keeps_the_previous_checkpoint(monkeypatch, tmp_path):
    import latentloom.training.checkpoint as ck

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    gens = {"noise": torch.Generator().manual_seed(0)}
    kwargs = dict(optimizer=optimizer, lr_scheduler=scheduler, ema_state=None, generators=gens, state={})
    first = save_checkpoint(tmp_path, step=1, model_state=model.state_dict(), **kwargs)
    before = _snapshot(first)
    _failing_save_file(monkeypatch, ck)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, step=2, model_state=model.state_dict(), **kwargs)
    with pytest.raises(OSError):  # the same step again: the complete one must survive the failed swap
        save_checkpoint(tmp_path, step=1, model_state=model.state_dict(), **kwargs)
    assert list_checkpoints(tmp_path) == [first]
    assert resolve_resume("latest", root=tmp_path) == first
    assert _snapshot(first) == before


def test_png_save_failing_keeps_the_previous_image(monkeypatch, tmp_path):
    from latentloom.pipelines.metadata import read_metadata, save_png

    path = tmp_path / "img.png"
    save_png(Image.new("RGB", (4, 4), "red"), path, {"prompt": "old", "seed": 1})
    before = path.read_bytes()

    def full_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_save)
    with pytest.raises(OSError):
        save_png(Image.new("RGB", (4, 4), "blue"), path, {"prompt": "new", "seed": 2})
    assert path.read_bytes() == before
    assert read_metadata(path)["prompt"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]
