"""Fine-tuning SDXL (`latentloom train --pretrained SDXL_FOLDER`): each image's real original size and
crop reach the UNet as its micro-conditioning, both text encoders stay frozen, the latent cache holds
the pooled vector and the micro-conditioning, LoRA with gradient checkpointing, exact resume, and a
result that loads and generates."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import latentloom
from builders import save_sd_folder, tiny_sdxl_pipeline, tiny_sdxl_refiner
from latentloom.training.config import TrainConfig
from latentloom.training.data import CaptionedImageDataset, LatentCache
from latentloom.training.loop import train

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread
# (width, height) of the training images: wide, tall and square, so the crops differ
SIZES = [(40, 24), (24, 36), (32, 32), (48, 20)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as handle:
        for i, (w, h) in enumerate(SIZES):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
            handle.write(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}) + "\n")
    return root


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return save_sd_folder(tiny_sdxl_pipeline(), tmp_path_factory.mktemp("sdxl"))


def run(data, folder, out, **kw):
    values = dict(data=str(data), output=str(out), pretrained=str(folder), resolution=16, batch_size=2, steps=3,
                  lr=1e-3, lr_warmup_steps=1, checkpoint_every=2, caption_dropout=0.3, random_flip=True, progress=False)
    values.update(kw)
    return train(TrainConfig(**values))


def test_items_carry_their_original_size_and_crop(data):
    """A 40x24 image at 16 px: resized to 27x16, centre crop at left 5 (6 seen mirrored), original (24, 40)."""
    ds = CaptionedImageDataset(data, resolution=16)
    _, size, crop = ds.prepare(0)
    assert size == (24, 40) and crop == (0, 5)
    _, _, mirrored = ds.prepare(0, flip=True)
    assert mirrored == (0, 6)
    _, size, crop = ds.prepare(1)  # 24x36 -> 16x24, crop top 4
    assert size == (36, 24) and crop == (4, 0)
    assert ds[0]["micro"].tolist() in ([24, 40, 0, 5], [24, 40, 0, 6])


def test_the_unet_sees_the_pooled_text_and_each_images_micro_conditioning(data, sdxl_folder, tmp_path, monkeypatch):
    from latentloom.unet.model import UNet

    seen = []
    original = UNet.vector_conditioning

    def spy(self, pooled, numbers):
        seen.append((pooled.detach().clone(), numbers.detach().clone()))
        return original(self, pooled, numbers)

    monkeypatch.setattr(UNet, "vector_conditioning", spy)
    run(data, sdxl_folder, tmp_path / "out", steps=2, random_flip=False, caption_dropout=0.0, batch_size=4,
        checkpoint_every=100)
    assert len(seen) == 2
    pooled, numbers = seen[0]
    assert pooled.shape == (4, 32) and pooled.abs().sum() > 0
    rows = sorted(tuple(int(v) for v in row) for row in numbers)
    expected = sorted((h, w, *crop, 16, 16) for (w, h), crop in zip(SIZES, [(0, 5), (4, 0), (0, 0), (0, 11)]))
    assert rows == expected


def test_full_fine_tune_exports_an_sdxl_folder_that_generates(data, sdxl_folder, tmp_path):
    out = run(data, sdxl_folder, tmp_path / "tuned", steps=2)
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == {"kind": "sdxl"} and index["force_zeros_for_empty_prompt"] is True
    assert index["use_context_mask"] is False
    for part in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae", "unet", "scheduler"):
        assert (out / part).is_dir(), part
    base = latentloom.load_pipeline(sdxl_folder, device="cpu", dtype=torch.float32)
    tuned = latentloom.load_pipeline(out, device="cpu", dtype=torch.float32)
    for a, b in ((base.text_encoder.encoder_1.model, tuned.text_encoder.encoder_1.model),
                 (base.text_encoder.encoder_2.model, tuned.text_encoder.encoder_2.model)):
        theirs = b.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in a.state_dict().items())  # both encoders frozen
    changed = [k for k, v in base.unet.state_dict().items() if not torch.equal(v, tuned.unet.state_dict()[k])]
    assert any("add_embedding" in k or "label_emb" in k for k in changed)  # the vector-conditioning path learned
    result = tuned("a picture", num_inference_steps=2, seed=0, height=16, width=16, original_size=(24, 40),
                   progress=False)
    assert result.images[0].size == (16, 16) and result.recipes[0]["original_size"] == [24, 40]


def test_lora_with_gradient_checkpointing_and_cached_latents_resumes_exactly(data, sdxl_folder, tmp_path):
    """The documented real-size path: LoRA + gradient checkpointing, latents, both embeddings, the pooled
    vector and each image's size and crop cached; stopping and resuming gives the same adapters."""
    common = dict(lora_rank=4, gradient_checkpointing=True, cache_latents=True, steps=4, crop="center")
    straight = run(data, sdxl_folder, tmp_path / "a", **common)
    stopped = run(data, sdxl_folder, tmp_path / "b", stop_after=2, **common)
    resumed = run(data, sdxl_folder, tmp_path / "b", resume="latest", **common)
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    (cache_file,) = (stopped / "checkpoints").glob("latent-cache-*.safetensors")
    dataset = CaptionedImageDataset(data, resolution=16, random_flip=True)
    cache = LatentCache(dataset, encode_image=None, encode_text=None, path=cache_file, key=_cache_key(cache_file))
    assert cache.complete
    item = cache[0]
    assert item["pooled"].shape == (32,) and item["hidden"].shape[-1] == 64
    assert item["micro"].tolist() in ([24, 40, 0, 5], [24, 40, 0, 6])
    pipe = latentloom.load_pipeline(sdxl_folder, device="cpu", dtype=torch.float32)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    report = pipe.load_lora(straight / "lora.safetensors")
    assert report.applied_keys == report.total_keys > 0 and not report.unmatched
    assert any(not torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def _cache_key(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["key"]


def test_refiners_are_refused(data, tmp_path):
    folder = save_sd_folder(tiny_sdxl_refiner(), tmp_path / "refiner")
    with pytest.raises(ValueError, match="SDXL refiner .* not supported; fine-tune an SDXL base"):
        run(data, folder, tmp_path / "out")
