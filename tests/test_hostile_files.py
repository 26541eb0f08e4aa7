"""Hostile and broken weight / config files: every one is refused with an error that names the file,
never a crash, never code run from the file, never a silently wrong model."""
import json
import pickle
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import latentloom
from builders import save_sd_folder, tiny_sd_pipeline, to_single_file
from latentloom.pipelines.single_file import read_checkpoint
from latentloom.unet import UNet, UNetConfig
from latentloom.weight_files import check_safetensors, is_lfs_pointer, load_safetensors

LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4c2e0c6e1f1d7e5a0c5d3f0ba8f1cb1ab3c6c0e8d0b9b5f7f1b2e3c4d5e6f708\nsize 3438167540\n")


# ---------------------------------------------------------------- byte-level corruptions of a valid file
def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _overlapping(raw: bytes) -> bytes:
    header, data = _split(raw)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first, second = header[names[0]]["data_offsets"], header[names[1]]
    span = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [first[0], first[0] + span]  # reads the first tensor's bytes again
    return _join(header, data)


def _shape_lies(raw: bytes) -> bytes:
    header, data = _split(raw)
    name = next(k for k in header if k != "__metadata__" and len(header[k]["shape"]) >= 1)
    header[name]["shape"] = [header[name]["shape"][0] * 2] + header[name]["shape"][1:]
    return _join(header, data)


def _pickle_renamed(raw: bytes) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


CORRUPTIONS = {
    "truncated": (lambda raw: raw[: len(raw) - 37], "not a readable .safetensors"),
    "header_length_past_end": (lambda raw: struct.pack("<Q", len(raw) + 100) + raw[8:], "header claims"),
    "huge_header_length": (lambda raw: struct.pack("<Q", 2**62) + raw[8:], "header claims"),
    "overlapping_offsets": (_overlapping, "not a readable .safetensors"),
    "trailing_bytes": (lambda raw: raw + b"\0" * 64, "not a readable .safetensors"),
    "shape_larger_than_data": (_shape_lies, "not a readable .safetensors"),
    "header_not_json": (lambda raw: struct.pack("<Q", 8) + b"{{{{{{{{" + raw[16:], "not a readable .safetensors"),
    "empty_file": (lambda raw: b"", "not a readable .safetensors"),
    "git_lfs_pointer": (lambda raw: LFS_POINTER, "git-lfs pointer.*git lfs pull"),
    "pickle_named_safetensors": (_pickle_renamed, "not a readable .safetensors"),
}


def _corrupt(path, kind):
    make, match = CORRUPTIONS[kind]
    path.write_bytes(make(path.read_bytes()))
    return match


@pytest.fixture(scope="module")
def diffusers_pipe():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sd_folder(diffusers_pipe, tmp_path_factory):
    return save_sd_folder(diffusers_pipe, tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def single_file(diffusers_pipe, tmp_path_factory):
    return to_single_file(diffusers_pipe, tmp_path_factory.mktemp("single") / "model.safetensors")


@pytest.fixture
def folder_copy(sd_folder, tmp_path):
    return shutil.copytree(sd_folder, tmp_path / "model")


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_broken_safetensors_is_refused_by_the_shared_reader(tmp_path, kind):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.arange(6.0)}, str(path))
    match = _corrupt(path, kind)
    with pytest.raises(ValueError, match=match) as info:
        load_safetensors(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=match):
        check_safetensors(path)


def test_shared_reader_reads_a_good_file_and_names_a_missing_one(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(2, 3)}, str(path))
    assert torch.equal(load_safetensors(path)["a"], torch.ones(2, 3))
    assert not is_lfs_pointer(path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_safetensors(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_broken_single_file_checkpoint(single_file, tmp_path, kind):
    path = tmp_path / "model.safetensors"
    shutil.copy(single_file, path)
    match = _corrupt(path, kind)
    with pytest.raises(ValueError, match=match) as info:
        latentloom.load_pipeline(path, device="cpu")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("part, name", [("unet", "diffusion_pytorch_model.safetensors"),
                                        ("vae", "diffusion_pytorch_model.safetensors"),
                                        ("text_encoder", "model.safetensors")])
@pytest.mark.parametrize("kind", ["truncated", "overlapping_offsets", "trailing_bytes", "git_lfs_pointer",
                                  "header_length_past_end"])
def test_broken_weights_in_a_diffusers_folder(folder_copy, part, name, kind):
    path = folder_copy / part / name
    match = _corrupt(path, kind)
    with pytest.raises(ValueError, match=match) as info:
        latentloom.load_pipeline(folder_copy, device="cpu")
    assert str(path) in str(info.value)


def _rewrite(path, edit):
    state = load_file(str(path))
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def _first(state, suffix):
    return next(k for k in sorted(state) if k.endswith(suffix))


@pytest.mark.parametrize("part, name", [("unet", "diffusion_pytorch_model.safetensors"),
                                        ("vae", "diffusion_pytorch_model.safetensors"),
                                        ("text_encoder", "model.safetensors")])
@pytest.mark.parametrize("edit", ["wrong_shape", "missing_tensor", "extra_tensor"])
def test_weights_that_do_not_fit_the_config(folder_copy, part, name, edit):
    """Valid safetensors whose tensors disagree with config.json: an error, never random weights."""
    def apply(state):
        key = _first(state, "weight")
        if edit == "wrong_shape":
            state[key] = torch.zeros(*(s + 1 for s in state[key].shape))
        elif edit == "missing_tensor":
            del state[key]
        else:
            state["surprise.weight"] = torch.zeros(3)

    _rewrite(folder_copy / part / name, apply)
    with pytest.raises(ValueError) as info:
        latentloom.load_pipeline(folder_copy, device="cpu")
    assert str(folder_copy / part) in str(info.value)


def test_single_file_with_a_wrong_shape_is_refused(single_file, tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copy(single_file, path)

    def apply(state):
        key = "model.diffusion_model.out.2.weight"
        state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1, *state[key].shape[2:])

    _rewrite(path, apply)
    with pytest.raises(ValueError, match="model.safetensors"):
        latentloom.load_pipeline(path, device="cpu")


def test_integer_weights_are_refused(folder_copy):
    """A float weight stored as int64 must not become an integer parameter."""
    path = folder_copy / "unet" / "diffusion_pytorch_model.safetensors"
    _rewrite(path, lambda s: s.__setitem__(_first(s, "conv_in.weight"), s[_first(s, "conv_in.weight")].long()))
    with pytest.raises(ValueError, match="conv_in.weight"):
        latentloom.load_pipeline(folder_copy, device="cpu")


# ---------------------------------------------------------------- pickle: refused, and never runs code
class _CreatesFile:
    """Unpickling this calls open(marker, 'w'): a file appears if any code in the pickle runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_with_code_never_runs(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {"w": torch.zeros(2), "evil": _CreatesFile(marker)}}, path)
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        latentloom.load_pipeline(path, device="cpu")
    assert not marker.exists()
    # opting in loads with weights_only=True, which refuses the object instead of calling open()
    with pytest.raises(ValueError, match=str(path)):
        read_checkpoint(path, allow_pickle=True)
    with pytest.raises(ValueError, match=str(path)):
        latentloom.load_pipeline(path, device="cpu", allow_pickle=True)
    assert not marker.exists()


def test_payload_really_creates_the_file_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_CreatesFile(marker))).close()
    assert marker.exists()


def test_pickle_checkpoint_with_only_tensors_loads_when_allowed(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}}, path)
    assert torch.equal(read_checkpoint(path, allow_pickle=True)["w"], torch.arange(3.0))


@pytest.mark.parametrize("payload", [[1, 2, 3], {"state_dict": "nope"}, {"w": 3}, "text"])
def test_pickle_that_is_not_a_state_dict(tmp_path, payload):
    path = tmp_path / "model.ckpt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=str(path)):
        read_checkpoint(path, allow_pickle=True)


def test_pickle_only_unet_folder_is_refused(folder_copy):
    unet = folder_copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        latentloom.load_pipeline(folder_copy, device="cpu")


# ---------------------------------------------------------------- config JSON: wrong types, missing fields
@pytest.mark.parametrize("edit", [
    lambda c: c.update(block_out_channels="sixteen"),
    lambda c: c.update(layers_per_block=[1, "x"]),
    lambda c: c.update(cross_attention_dim=None),
    lambda c: c.update(in_channels=-4),
    lambda c: c.update(norm_num_groups=7),
    lambda c: c.pop("block_out_channels"),
])
def test_broken_diffusers_unet_config(folder_copy, edit):
    path = folder_copy / "unet" / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        latentloom.load_pipeline(folder_copy, device="cpu")
    assert "unet" in str(info.value)


@pytest.mark.parametrize("part, text", [
    ("model_index.json", "{not json"),
    ("model_index.json", "[1, 2]"),
    ("unet/config.json", "{not json"),
    ("unet/config.json", "null"),
    ("scheduler/scheduler_config.json", "{not json"),
    ("scheduler/scheduler_config.json", json.dumps({"beta_start": "small"})),
    ("scheduler/scheduler_config.json", json.dumps({"num_train_timesteps": -5})),
    ("vae/config.json", "{not json"),
    ("vae/config.json", json.dumps({"block_out_channels": "x"})),
    ("text_encoder/config.json", "{not json"),
])
def test_broken_config_files(folder_copy, part, text):
    (folder_copy / part).write_text(text)
    with pytest.raises(ValueError) as info:
        latentloom.load_pipeline(folder_copy, device="cpu")
    assert str(folder_copy / part.split("/")[0]) in str(info.value)


@pytest.fixture
def latentloom_unet_folder(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "unet"
    UNet(UNetConfig.tiny()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("edit, error", [
    (lambda c: c.pop("channels"), ValueError),
    (lambda c: c.update(channels="16,32"), ValueError),
    (lambda c: c.update(num_heads=2.5), ValueError),
    (lambda c: c.update(context_dim=True), ValueError),
    (lambda c: c.update(spare_field=1), ValueError),
])
def test_broken_latentloom_unet_config(latentloom_unet_folder, edit, error):
    path = latentloom_unet_folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(error, match="config.json"):
        UNet.from_pretrained(latentloom_unet_folder)
    with pytest.raises(error, match="config.json"):
        UNetConfig.load_json(path)


@pytest.mark.parametrize("kind", ["truncated", "git_lfs_pointer", "trailing_bytes"])
def test_broken_latentloom_unet_weights(latentloom_unet_folder, kind):
    match = _corrupt(latentloom_unet_folder / "model.safetensors", kind)
    with pytest.raises(ValueError, match=match):
        UNet.from_pretrained(latentloom_unet_folder)


def test_latentloom_unet_weights_that_do_not_fit(latentloom_unet_folder):
    config = json.loads((latentloom_unet_folder / "config.json").read_text())
    config["channels"] = [16, 48]
    (latentloom_unet_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.safetensors.*does not match"):
        UNet.from_pretrained(latentloom_unet_folder)


# ---------------------------------------------------------------- training checkpoints, LoRA, image-text, shards
@pytest.fixture
def checkpoint(tmp_path):
    from latentloom.training.checkpoint import save_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    gens = {"noise": torch.Generator().manual_seed(0)}
    folder = save_checkpoint(tmp_path, step=1, model_state=model.state_dict(), optimizer=optimizer,
                             lr_scheduler=scheduler, ema_state=model.state_dict(), generators=gens, state={})
    return folder, optimizer, scheduler, gens


@pytest.mark.parametrize("name, kind", [("model.safetensors", "truncated"), ("ema.safetensors", "git_lfs_pointer"),
                                        ("optimizer.safetensors", "trailing_bytes"),
                                        ("rng-0.safetensors", "overlapping_offsets")])
def test_broken_training_checkpoint(checkpoint, name, kind):
    from latentloom.training.checkpoint import load_checkpoint

    folder, optimizer, scheduler, gens = checkpoint
    match = _corrupt(folder / name, kind)
    with pytest.raises(ValueError, match=match) as info:
        load_checkpoint(folder, optimizer=optimizer, lr_scheduler=scheduler, generators=gens)
    assert str(folder / name) in str(info.value)


@pytest.mark.parametrize("name, text", [("state.json", "{cut"), ("optimizer.json", "[]"), ("rng-0.json", "")])
def test_broken_training_checkpoint_json(checkpoint, name, text):
    from latentloom.training.checkpoint import load_checkpoint

    folder, optimizer, scheduler, gens = checkpoint
    (folder / name).write_text(text)
    with pytest.raises(ValueError, match=name):
        load_checkpoint(folder, optimizer=optimizer, lr_scheduler=scheduler, generators=gens)


@pytest.mark.parametrize("kind", ["truncated", "git_lfs_pointer", "header_length_past_end"])
def test_broken_lora_file(tmp_path, kind):
    from latentloom.unet.lora import read_lora_file

    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2)},
              str(path))
    match = _corrupt(path, kind)
    with pytest.raises(ValueError, match=match):
        read_lora_file(path)


def test_broken_image_text_model(tmp_path):
    from latentloom.text_encoders.image_text import ImageTextConfig, ImageTextModel

    folder = tmp_path / "clip"
    ImageTextModel(ImageTextConfig()).save_pretrained(folder)
    _corrupt(folder / "model.safetensors", "trailing_bytes")
    with pytest.raises(ValueError, match="model.safetensors"):
        ImageTextModel.from_pretrained(folder)
    ImageTextModel(ImageTextConfig()).save_pretrained(folder)
    _rewrite(folder / "model.safetensors", lambda s: s.pop(sorted(s)[0]))
    with pytest.raises(ValueError, match="does not fit"):
        ImageTextModel.from_pretrained(folder)


@pytest.mark.parametrize("weight_map", [{"x": "../../outside.safetensors"}, {"x": "/etc/passwd"}, ["not", "a", "map"]])
def test_sharded_index_cannot_point_outside_the_folder(folder_copy, weight_map):
    unet = folder_copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="index.json"):
        latentloom.load_pipeline(folder_copy, device="cpu")
