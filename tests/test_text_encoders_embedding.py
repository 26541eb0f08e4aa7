"""TextEmbedding: shape checks, padding (never truncating), batching helpers."""
import pytest
import torch

from latentloom.text_encoders import TextEmbedding, pad_to_length, pad_to_same_length


def make(batch=2, length=3, dim=4, filler=None, pooled=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TextEmbedding(
        torch.randn(batch, length, dim, generator=g),
        torch.ones(batch, length, dtype=torch.long),
        torch.randn(batch, 5, generator=g) if pooled else None,
        filler,
    )


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"hidden must be \(B, L, D\), got shape \(2, 3\)"):
        TextEmbedding(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"mask must be \(B, L\) = \(2, 3\), got \(2, 4\)"):
        TextEmbedding(torch.zeros(2, 3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"pooled must be \(B, D'\) with B = 2, got \(3, 5\)"):
        TextEmbedding(torch.zeros(2, 3, 4), torch.zeros(2, 3), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"filler must be \(Lf, D\) with D = 4, got \(3, 5\)"):
        TextEmbedding(torch.zeros(2, 3, 4), torch.zeros(2, 3), None, torch.zeros(3, 5))


def test_pad_with_zeros_when_no_filler():
    emb = make()
    padded = pad_to_length(emb, 7)
    assert padded.hidden.shape == (2, 7, 4) and padded.length == 7
    assert torch.equal(padded.hidden[:, :3], emb.hidden) and padded.hidden[:, 3:].eq(0).all()
    assert padded.mask[:, 3:].eq(0).all() and padded.mask.dtype == torch.long
    assert padded.pooled is emb.pooled
    assert emb.pad_to(3) is emb


def test_pad_tiles_the_filler():
    filler = torch.arange(8.0).reshape(2, 4)  # (Lf=2, D=4)
    emb = make(filler=filler)
    padded = emb.pad_to(8)  # 5 positions: filler, filler, filler[0]
    assert torch.equal(padded.hidden[0, 3:], torch.cat([filler, filler, filler[:1]]))
    assert torch.equal(padded.hidden[1, 3:], padded.hidden[0, 3:])


@pytest.mark.parametrize("length, error", [(2, ValueError), (2.5, TypeError), (True, TypeError)])
def test_pad_never_truncates(length, error):
    with pytest.raises(error, match="already has 3 positions|length must be an int"):
        make().pad_to(length)


def test_cat_pads_then_stacks():
    a, b = make(batch=1, length=2, seed=1), make(batch=2, length=5, seed=2)
    both = TextEmbedding.cat([a, b])
    assert both.hidden.shape == (3, 5, 4) and both.pooled.shape == (3, 5)
    assert torch.equal(both.mask[0], torch.tensor([1, 1, 0, 0, 0]))
    same = pad_to_same_length(a, b)
    assert [e.length for e in same] == [5, 5]
    with pytest.raises(ValueError, match="some have pooled and some do not"):
        TextEmbedding.cat([a, make(pooled=False)])
    with pytest.raises(TypeError, match="non-empty sequence of TextEmbedding"):
        TextEmbedding.cat([])


def test_repeat_interleave_and_to():
    emb = make(filler=torch.zeros(1, 4))
    rep = emb.repeat_interleave(3)
    assert rep.hidden.shape == (6, 3, 4) and torch.equal(rep.hidden[2], emb.hidden[0])
    assert torch.equal(rep.pooled[3], emb.pooled[1])
    with pytest.raises(ValueError, match="repeats must be a positive int, got 0"):
        emb.repeat_interleave(0)
    half = emb.to(dtype=torch.float16)
    assert half.hidden.dtype == half.pooled.dtype == half.filler.dtype == torch.float16
    assert half.mask.dtype == torch.long and len(half) == 2
