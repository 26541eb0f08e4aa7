"""LatentCache: every item is encoded once; later epochs (and later runs, from disk) encode nothing."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from latentloom.text_encoders.embedding import TextEmbedding
from latentloom.synthetic import shapes as ss
from latentloom.training.data import CaptionedImageDataset, LatentCache
from latentloom.training.task_unet import UNetTask


class Encoders:
    """Deterministic stand-ins that count their calls: 8x average pooling, and per-character text."""

    def __init__(self, pooled=True):
        self.image_calls = self.text_calls = 0
        self.pooled = pooled

    def image(self, pixels):  # (B, 3, R, R) -> (B, 3, R/8, R/8)
        self.image_calls += 1
        return F.avg_pool2d(pixels, 8)

    def text(self, captions):
        self.text_calls += 1
        length = max(len(c) for c in captions) or 1
        hidden = torch.zeros(len(captions), length, 4)  # (B, L, D)
        mask = torch.zeros(len(captions), length, dtype=torch.long)
        for i, c in enumerate(captions):
            codes = torch.tensor([float(ord(ch)) for ch in c])
            hidden[i, : len(c)] = codes[:, None]
            mask[i, : len(c)] = 1
        pooled = hidden.sum(1) if self.pooled else None
        return TextEmbedding(hidden, mask, pooled)


@pytest.fixture
def folder(tmp_path):
    ss.write_dataset(tmp_path / "data", 10, seed=0)
    return tmp_path / "data"


def epoch(ds):
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("flip", [False, True])
def test_second_epoch_calls_neither_encoder(folder, flip):
    enc = Encoders()
    cache = LatentCache(
        CaptionedImageDataset(folder, resolution=64, random_flip=flip, seed=0),
        encode_image=enc.image, encode_text=enc.text,
    )
    first = epoch(cache)
    assert enc.image_calls == 10 and enc.text_calls > 0
    calls = (enc.image_calls, enc.text_calls)
    second = epoch(cache)
    third = epoch(cache)
    assert (enc.image_calls, enc.text_calls) == calls
    assert cache.complete
    assert first[0]["latents"].shape == (3, 8, 8)
    if not flip:
        assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(first, second))


def test_cached_items_match_the_encoded_pixels_and_the_same_flips(folder):
    enc = Encoders()
    plain = CaptionedImageDataset(folder, resolution=64, random_flip=True, seed=5)
    cache = LatentCache(
        CaptionedImageDataset(folder, resolution=64, random_flip=True, seed=5),
        encode_image=enc.image, encode_text=enc.text,
    )
    flips_seen = set()
    for _ in range(3):
        for i in range(len(plain)):
            item, cached = plain[i], cache[i]
            assert torch.allclose(cached["latents"], F.avg_pool2d(item["pixel_values"][None], 8)[0], atol=1e-6)
            assert cached["caption"] == item["caption"]
            flips_seen.add(torch.equal(item["pixel_values"], plain.pixel_values(i, flip=True)))
    assert flips_seen == {True, False}
    ref = enc.text([cache.dataset.captions[3]])
    assert torch.equal(cache[3]["hidden"], ref.hidden[0]) and torch.equal(cache[3]["mask"], ref.mask[0])


def test_fill_encodes_in_batches_then_nothing(folder):
    enc = Encoders()
    cache = LatentCache(
        CaptionedImageDataset(folder, resolution=64, random_flip=True), encode_image=enc.image, encode_text=enc.text
    )
    cache.fill(batch_size=8)
    assert enc.image_calls == 3  # 20 images (both flips) in batches of 8
    assert enc.text_calls == 2  # 10 distinct captions in batches of 8
    epoch(cache)
    assert (enc.image_calls, enc.text_calls) == (3, 2)


def test_disk_cache_round_trip_encodes_nothing(folder, tmp_path):
    path = tmp_path / "cache" / "latents.safetensors"
    enc = Encoders()
    first = LatentCache(
        CaptionedImageDataset(folder, resolution=64, random_flip=True, seed=1),
        encode_image=enc.image, encode_text=enc.text, path=path, key="pool8+chars",
    )
    items = epoch(first)  # the last missing item triggers the atomic save
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    fresh = Encoders()
    second = LatentCache(
        CaptionedImageDataset(folder, resolution=64, random_flip=True, seed=1),
        encode_image=fresh.image, encode_text=fresh.text, path=path, key="pool8+chars",
    )
    assert second.complete
    again = epoch(second)
    assert (fresh.image_calls, fresh.text_calls) == (0, 0)
    for a, b in zip(items, again):
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["hidden"], b["hidden"])
        assert torch.equal(a["pooled"], b["pooled"]) and a["caption"] == b["caption"]


def test_disk_cache_without_pooled(folder, tmp_path):
    path = tmp_path / "c.safetensors"
    enc = Encoders(pooled=False)
    cache = LatentCache(CaptionedImageDataset(folder, resolution=64), encode_image=enc.image,
                        encode_text=enc.text, path=path)
    cache.fill()
    reloaded = LatentCache(CaptionedImageDataset(folder, resolution=64), encode_image=enc.image,
                           encode_text=enc.text, path=path)
    assert reloaded.complete and reloaded[0]["pooled"] is None


def test_stale_or_corrupt_disk_cache_is_rebuilt_with_a_warning(folder, tmp_path):
    path = tmp_path / "c.safetensors"
    LatentCache(CaptionedImageDataset(folder, resolution=64), encode_image=Encoders().image,
                encode_text=Encoders().text, path=path, key="a").fill()
    enc = Encoders()
    with pytest.warns(UserWarning, match="other data, preprocessing or encoders"):
        cache = LatentCache(CaptionedImageDataset(folder, resolution=64), encode_image=enc.image,
                            encode_text=enc.text, path=path, key="b")
    assert not cache.complete
    with pytest.warns(UserWarning, match="other data"):  # same key, other preprocessing (flip)
        LatentCache(CaptionedImageDataset(folder, resolution=64, random_flip=True), encode_image=enc.image,
                    encode_text=enc.text, path=path, key="a")
    path.write_bytes(b"garbage that is not safetensors")
    with pytest.warns(UserWarning, match="unreadable"):
        cache = LatentCache(CaptionedImageDataset(folder, resolution=64), encode_image=enc.image,
                            encode_text=enc.text, path=path, key="a")
    cache.fill()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LatentCache(CaptionedImageDataset(folder, resolution=64), encode_image=enc.image,
                           encode_text=enc.text, path=path, key="a").complete


def test_random_crop_is_refused(folder):
    enc = Encoders()
    with pytest.raises(ValueError, match="needs crop='center' \\(got 'random'\\)"):
        LatentCache(CaptionedImageDataset(folder, resolution=64, crop="random"), encode_image=enc.image,
                    encode_text=enc.text)


def test_wrong_dataset_type():
    with pytest.raises(TypeError, match="CaptionedImageDataset"):
        LatentCache([1, 2], encode_image=lambda x: x, encode_text=lambda c: c)


def test_bad_encoder_outputs(folder):
    ds = CaptionedImageDataset(folder, resolution=64)
    enc = Encoders()
    with pytest.raises(ValueError, match=r"encode_image must return \(B=1, C, h, w\) latents, got \(1, 192\)"):
        LatentCache(ds, encode_image=lambda x: x.flatten(1)[:, :192], encode_text=enc.text)[0]
    with pytest.raises(TypeError, match="encode_text must return a TextEmbedding, got dict"):
        LatentCache(ds, encode_image=enc.image, encode_text=lambda c: {})[0]
    short = lambda c: enc.text(c[:1] + c[:1])  # noqa: E731
    with pytest.raises(ValueError, match="encode_text returned 2 embeddings for 3 captions"):
        LatentCache(ds, encode_image=enc.image, encode_text=short).text(["a", "b", "c"])


def test_save_without_path_and_bad_batch_size(folder):
    enc = Encoders()
    cache = LatentCache(CaptionedImageDataset(folder, resolution=64), encode_image=enc.image, encode_text=enc.text)
    with pytest.raises(ValueError, match="no path"):
        cache.save()
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        cache.fill(batch_size=0)


def test_unfilled_cache_refuses_dataloader_workers_and_filled_one_works(folder):
    enc = Encoders()
    cache = LatentCache(CaptionedImageDataset(folder, resolution=64), encode_image=enc.image, encode_text=enc.text)
    loader = torch.utils.data.DataLoader(cache, batch_size=5, num_workers=1, collate_fn=UNetTask.collate)
    with pytest.raises(RuntimeError, match="call cache.fill\\(\\) before iterating with num_workers > 0"):
        next(iter(loader))
    cache.fill()
    batches = list(loader)
    assert [b["latents"].shape[0] for b in batches] == [5, 5]


def test_with_a_tiny_diffusers_vae(folder):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=64,
    ).eval()
    calls = []

    def encode_image(pixels):
        calls.append(pixels.shape[0])
        return vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor

    enc = Encoders()
    cache = LatentCache(CaptionedImageDataset(folder, resolution=64, random_flip=True, seed=0),
                        encode_image=encode_image, encode_text=enc.text)
    cache.fill(batch_size=10)
    assert calls == [10, 10]
    item = cache[0]
    assert item["latents"].shape == (4, 32, 32) and not item["latents"].requires_grad
    with torch.no_grad():
        ref = vae.encode(cache.dataset.pixel_values(0, flip=True)[None]).latent_dist.mode()[0]
    assert torch.allclose(cache._latents[(0, True)], ref * vae.config.scaling_factor, atol=1e-5)
