"""ShuffleBuffer on synthetic chunks whose rows are recognisable by their token id; resuming from any position."""

from __future__ import annotations

import weakref

import pytest
import torch

from sae_kit.buffer import BufferPosition, ShuffleBuffer
from sae_kit.rows import ActivationRows

HOOKS = ["h0", "h1"]


def chunks(sizes: list[int], *, with_grads: bool = True) -> list[ActivationRows]:
    """Chunk i has `sizes[i]` rows with row=i; every field of a row is a function of its token id."""
    out, token = [], 0
    for i, n in enumerate(sizes):
        ids = torch.arange(token, token + n)
        token += n
        value = ids.float()[:, None].expand(n, 3)
        out.append(
            ActivationRows(
                acts={h: value * (k + 1) for k, h in enumerate(HOOKS)},
                grads={h: -value * (k + 1) for k, h in enumerate(HOOKS)} if with_grads else None,
                token=ids,
                doc=ids // 5,
                row=torch.full((n,), i),
                pos=ids % 7,
            )
        )
    return out


SIZES = [16] * 20 + [5, 23, 1, 40]


def positioned(parts: list[ActivationRows]):
    """A ShuffleBuffer source over a list: the position is the index of the next part."""
    return lambda start: ((p, i + 1) for i, p in enumerate(parts) if i >= (start or 0))


def buffer(parts: list[ActivationRows], **kw) -> ShuffleBuffer:
    return ShuffleBuffer(positioned(parts), **kw)


def tokens(buf: ShuffleBuffer) -> list[torch.Tensor]:
    return [b.token for b in buf]


def test_every_row_once_in_full_batches_with_fields_aligned():
    source = chunks(SIZES)
    total = sum(SIZES)
    batches = list(buffer(source, capacity=64, batch_size=12, seed=0))
    assert [len(b) for b in batches] == [12] * (total // 12) + [total % 12]
    seen = torch.cat([b.token for b in batches])
    assert torch.equal(seen.sort().values, torch.arange(total))
    for b in batches:
        value = b.token.float()[:, None].expand(len(b), 3)
        for k, h in enumerate(HOOKS):
            assert torch.equal(b.acts[h], value * (k + 1))
            assert torch.equal(b.grads[h], -value * (k + 1))  # type: ignore[index]
        assert torch.equal(b.doc, b.token // 5) and torch.equal(b.pos, b.token % 7)


def test_mixes_rows_from_different_chunks():
    batches = list(buffer(chunks(SIZES), capacity=64, batch_size=12, seed=0))
    sources_per_batch = [len(b.row.unique()) for b in batches]
    assert min(sources_per_batch[:-1]) >= 3
    seen = torch.cat([b.token for b in batches])
    assert not torch.equal(seen, torch.arange(len(seen)))


def test_deterministic_for_a_seed_and_different_across_seeds():
    run = lambda seed: torch.cat(tokens(buffer(chunks(SIZES), capacity=50, batch_size=8, seed=seed)))  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_drop_last_source_smaller_than_capacity_and_no_grads():
    source = chunks([3, 4, 2], with_grads=False)
    batches = list(buffer(source, capacity=100, batch_size=4, seed=1))
    assert [len(b) for b in batches] == [4, 4, 1] and all(b.grads is None for b in batches)
    assert torch.equal(torch.cat([b.token for b in batches]).sort().values, torch.arange(9))
    assert [len(b) for b in buffer(source, capacity=100, batch_size=4, drop_last=True)] == [4, 4]
    assert list(buffer([], capacity=8, batch_size=4)) == []


def test_capacity_equal_to_batch_size():
    batches = list(buffer(chunks([7, 7, 7]), capacity=4, batch_size=4, seed=0))
    assert torch.equal(torch.cat([b.token for b in batches]).sort().values, torch.arange(21))


def test_argument_and_source_errors():
    with pytest.raises(ValueError, match="capacity"):
        buffer([], capacity=4, batch_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        buffer([], capacity=4, batch_size=0)
    mixed = chunks([4]) + chunks([4], with_grads=False)
    with pytest.raises(ValueError, match="changed shape"):
        list(buffer(mixed, capacity=16, batch_size=4))


def test_resuming_from_any_position_gives_the_same_remaining_batches():
    buf = buffer(chunks(SIZES), capacity=50, batch_size=8, seed=2)
    full = list(buf.batches())
    for cut in (0, 1, 5, 6, 7, 13, len(full) - 1):
        position = full[cut][1]
        meta, tensors = position.state()
        restored = BufferPosition.from_state(meta, {k: v.clone() for k, v in tensors.items()})
        rest = list(buf.batches(restored))
        assert len(rest) == len(full) - cut - 1
        for (a, _), (b, _) in zip(rest, full[cut + 1 :]):
            assert (
                torch.equal(a.token, b.token)
                and torch.equal(a.acts["h0"], b.acts["h0"])
                and torch.equal(a.grads["h1"], b.grads["h1"])
            )
    assert any(p.carry is not None for _, p in full)  # some resumes had to restore carried rows


def test_batches_are_the_chunk_permuted_by_its_seeded_order():
    """The batches of a chunk are its rows (the source's, concatenated) in `permutation(n, chunk)` order, cut in
    batch_size pieces; each batch is its own tensor, so a queued batch does not keep the chunk alive."""
    source = chunks([16, 5, 23])
    buf = buffer(source, capacity=100, batch_size=8, seed=7)
    want = ActivationRows.cat(source).select(buf.permutation(44, 0))
    batches = list(buf)
    assert torch.equal(torch.cat([b.token for b in batches]), want.token)
    assert torch.equal(torch.cat([b.grads["h1"] for b in batches]), want.grads["h1"])  # type: ignore[index]
    acts = batches[1].acts["h0"]
    assert acts.untyped_storage().nbytes() == acts.nbytes


def test_rows_are_stored_in_their_own_dtype_or_the_one_asked_for():
    fp32 = chunks(SIZES)
    bf16 = [p.to(dtype=torch.bfloat16) for p in fp32]
    reference = list(buffer(fp32, capacity=50, batch_size=8, seed=2).batches())
    own = list(buffer(bf16, capacity=50, batch_size=8, seed=2).batches())  # a bf16 harvest stays bf16
    cast = list(buffer(fp32, capacity=50, batch_size=8, seed=2, dtype=torch.bfloat16).batches())
    for got in (own, cast):
        assert len(got) == len(reference)
        for (b, pos), (r, _) in zip(got, reference):
            assert b.acts["h0"].dtype == torch.bfloat16 and b.grads["h1"].dtype == torch.bfloat16  # type: ignore[index]
            assert torch.equal(b.token, r.token) and b.token.dtype == torch.int64
            assert torch.equal(b.acts["h1"], r.acts["h1"].bfloat16())
            assert torch.equal(b.grads["h0"], r.grads["h0"].bfloat16())  # type: ignore[index]
            assert pos.carry is None or pos.carry.acts["h0"].dtype == torch.bfloat16
    # resuming a bf16 buffer from a checkpointed position (its carry stored in bf16) gives the same batches
    buf = buffer(fp32, capacity=50, batch_size=8, seed=2, dtype=torch.bfloat16)
    cut = next(i for i, (_, p) in enumerate(cast) if p.carry is not None)
    meta, tensors = cast[cut][1].state()
    assert all(t.dtype == torch.bfloat16 for k, t in tensors.items() if "acts" in k or "grads" in k)
    rest = list(buf.batches(BufferPosition.from_state(meta, tensors)))
    assert len(rest) == len(cast) - cut - 1
    assert all(torch.equal(a.acts["h0"], b.acts["h0"]) for (a, _), (b, _) in zip(rest, cast[cut + 1 :]))
    with pytest.raises(ValueError, match="changed dtype"):
        list(buffer(fp32[:2] + bf16[2:4], capacity=64, batch_size=8))


def test_a_chunk_is_held_once_its_parts_released_as_they_are_copied():
    refs = []

    def source(start):  # parts made on the fly, as a harvest makes them: only the buffer holds them
        for i in range(start or 0, 10):
            part = chunks([16] * (i + 1))[-1]
            refs.append(weakref.ref(part.acts["h0"]))
            yield part, i + 1

    batches = ShuffleBuffer(source, capacity=160, batch_size=16).batches()
    first, _ = next(batches)
    assert len(refs) == 10 and sum(r() is not None for r in refs) <= 1  # at most the part last read
    assert len(first) == 16
