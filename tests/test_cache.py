"""ActivationCache / CacheWriter on tiny synthetic rows: round trips, global shuffle, resume and repair, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_kit.cache import ActivationCache, CacheError, CacheWriter
from sae_kit.rows import ActivationRows

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
D = 6
SETTINGS = {"model": "tiny", "hooks": HOOKS, "context_size": 4, "prepend_bos": True, "holdout": 0.2}


def make_batches(
    n_batches: int, *, with_grads: bool = True, seed: int = 0, first_token: int = 0
) -> list[ActivationRows]:
    """Batches of 1..7 rows; each row has a unique token id, so it can be recognised after shuffling."""
    g = torch.Generator().manual_seed(seed)
    batches, token = [], first_token
    for b in range(n_batches):
        n = int(torch.randint(1, 8, (1,), generator=g))
        ids = torch.arange(token, token + n)
        token += n
        batches.append(
            ActivationRows(
                acts={h: torch.randn(n, D, generator=g) for h in HOOKS},
                grads={h: torch.randn(n, D, generator=g) for h in HOOKS} if with_grads else None,
                token=ids,
                doc=ids // 3,
                row=torch.full((n,), b),
                pos=torch.arange(n),
            )
        )
    return batches


def feed(writer: CacheWriter, split: str, batches: list[ActivationRows], stop: int | None = None) -> None:
    """Add one batch per source context, skipping the contexts the writer already holds (as a resumed harvest does)."""
    for i in range(writer.position(split), len(batches) if stop is None else stop):
        writer.add(split, batches[i], position=i + 1)


def build(path: Path, train: list[ActivationRows], heldout: list[ActivationRows], **kw) -> ActivationCache:
    kw = {"hooks": HOOKS, "d_in": D, "with_grads": True, "shard_rows": 10} | kw
    writer = CacheWriter(path, SETTINGS, **kw)
    for i in range(max(len(train), len(heldout))):  # interleave the splits, as a harvest does
        if i < len(train):
            writer.add("train", train[i], position=i + 1)
        if i < len(heldout):
            writer.add("heldout", heldout[i], position=i + 1)
    writer.close()
    return ActivationCache(path)


def assert_rows_equal(a: ActivationRows, b: ActivationRows) -> None:
    assert a.hooks == b.hooks
    for h in a.hooks:
        assert torch.equal(a.acts[h], b.acts[h])
        if a.grads is not None or b.grads is not None:
            assert torch.equal(a.grads[h], b.grads[h])  # type: ignore[index]
    for name, t in a.meta().items():
        assert torch.equal(t, getattr(b, name))


@pytest.fixture
def data() -> tuple[list[ActivationRows], list[ActivationRows]]:
    return make_batches(20, seed=1), make_batches(8, seed=2, first_token=10_000)


def test_round_trip_float32_two_hooks_grads_both_splits(tmp_path, data):
    train, heldout = data
    cache = build(tmp_path / "c", train, heldout)
    assert cache.complete and cache.hooks == HOOKS and cache.d_in == D and cache.with_grads and cache.dtype == "float32"
    assert cache.settings == SETTINGS
    shards = cache.manifest["shards"]
    assert sum(s["split"] == "train" for s in shards) >= 3 and sum(s["split"] == "heldout" for s in shards) >= 2
    for split, batches in (("train", train), ("heldout", heldout)):
        expected = ActivationRows.cat(batches)
        assert cache.n_rows(split) == len(expected)
        assert cache.manifest["splits"][split]["position"] == len(batches)
        assert_rows_equal(cache.read(split, with_grads=True), expected)
        assert_rows_equal(cache.read(split, 3, 17, with_grads=True), expected.select(slice(3, 17)))
    part = cache.read("train", 2, 5, hooks=[HOOKS[1]])
    assert part.hooks == [HOOKS[1]] and part.grads is None and len(part) == 3
    assert "train=" in repr(cache) and "complete=True" in repr(cache)
    cache.verify()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip_half_precision_equals_cast(tmp_path, data, dtype):
    train, heldout = data
    cache = build(tmp_path / "c", train, heldout, dtype=dtype)
    expected = ActivationRows.cat(train)
    cast = getattr(torch, dtype)
    got = cache.read("train", with_grads=True)
    for h in HOOKS:
        assert got.acts[h].dtype == torch.float32
        assert torch.equal(got.acts[h], expected.acts[h].to(cast).float())
        assert torch.equal(got.grads[h], expected.grads[h].to(cast).float())  # type: ignore[index]
    assert cache.read("train", dtype=cast).acts[HOOKS[0]].dtype == cast
    # the shuffled path converts the same way
    batch = next(cache.batches(8, dtype=torch.float32, with_grads=True))
    for h in HOOKS:
        assert torch.equal(batch.acts[h], expected.acts[h][batch.token].to(cast).float())


def test_shuffle_visits_every_row_once_and_depends_on_seed_and_epoch(tmp_path, data):
    train, heldout = data
    cache = build(tmp_path / "c", train, heldout)
    expected = ActivationRows.cat(train)
    n = len(expected)

    def epoch_tokens(**kw) -> torch.Tensor:
        return torch.cat([b.token for b in cache.batches(8, **kw)])

    batches = list(cache.batches(8, with_grads=True))
    assert [len(b) for b in batches] == [8] * (n // 8) + ([n % 8] if n % 8 else [])
    for b in batches:  # every field of a row stays together
        for h in HOOKS:
            assert torch.equal(b.acts[h], expected.acts[h][b.token])
            assert torch.equal(b.grads[h], expected.grads[h][b.token])  # type: ignore[index]
        assert torch.equal(b.doc, expected.doc[b.token]) and torch.equal(b.row, expected.row[b.token])
    tokens = torch.cat([b.token for b in batches])
    assert torch.equal(tokens.sort().values, expected.token)
    assert not torch.equal(tokens, expected.token)
    assert any(not torch.equal(b.token, b.token.sort().values) for b in batches), "rows inside a batch stay shuffled"
    spans = {int(b.row.max() - b.row.min()) for b in batches}
    assert max(spans) > 10, "batches should draw rows from across the whole split"
    assert torch.equal(epoch_tokens(seed=0, epoch=0), tokens)
    assert not torch.equal(epoch_tokens(seed=0, epoch=1), tokens)
    assert not torch.equal(epoch_tokens(seed=1, epoch=0), tokens)
    assert torch.equal(epoch_tokens(seed=0, epoch=1).sort().values, expected.token)
    assert all(len(b) == 8 for b in cache.batches(8, drop_last=True))
    assert len(torch.cat([b.token for b in cache.batches(8, drop_last=True)])) == n // 8 * 8
    held = torch.cat([b.token for b in cache.batches(5, split="heldout")])
    assert torch.equal(held.sort().values, ActivationRows.cat(heldout).token)


def test_ranks_read_disjoint_equal_parts(tmp_path, data):
    cache = build(tmp_path / "c", *data)
    parts = [torch.cat([b.token for b in cache.batches(4, rank=r, world_size=3, seed=5)]) for r in range(3)]
    assert len({len(p) for p in parts}) == 1
    union = torch.cat(parts)
    assert len(union.unique()) == len(union) == cache.n_rows() - cache.n_rows() % 3


def test_resume_after_crash_matches_uninterrupted_write(tmp_path, data):
    train, heldout = data
    reference = build(tmp_path / "ref", train, heldout)

    path = tmp_path / "c"
    writer = CacheWriter(path, SETTINGS, HOOKS, D, with_grads=True, shard_rows=10)
    feed(writer, "train", train, stop=13)
    feed(writer, "heldout", heldout, stop=5)
    landed = writer.position("train")
    assert 0 < landed < 13 and writer.rows_written("train") == sum(len(b) for b in train[:landed])
    del writer  # crash: no close(), queued rows are lost
    stray = path / ".train-000099.acts-0.bin.abc123.tmp"
    stray.write_bytes(b"half a shard")
    orphan = path / "train-000099.meta.bin"  # a shard file that landed without its manifest entry
    orphan.write_bytes(b"x")

    resumed = CacheWriter(path, SETTINGS, HOOKS, D, with_grads=True, shard_rows=10)
    assert not resumed.complete
    assert resumed.position("train") == landed
    assert resumed.rows_written("train") == sum(len(b) for b in train[:landed])
    assert not stray.exists() and not orphan.exists()
    feed(resumed, "train", train)
    feed(resumed, "heldout", heldout)
    resumed.close()

    cache = ActivationCache(path)
    assert cache.complete
    for split in ("train", "heldout"):
        assert_rows_equal(cache.read(split, with_grads=True), reference.read(split, with_grads=True))
    # a complete cache re-opens as complete and accepts nothing more
    again = CacheWriter(path, SETTINGS, HOOKS, D, with_grads=True, shard_rows=10)
    assert again.complete and again.position("train") == len(train)
    with pytest.raises(CacheError, match="complete"):
        again.add("train", train[0], position=len(train) + 1)


def test_different_settings_are_refused_naming_the_key(tmp_path, data):
    build(tmp_path / "c", *data)
    with pytest.raises(CacheError) as err:
        CacheWriter(tmp_path / "c", SETTINGS | {"model": "other"}, HOOKS, D, with_grads=True)
    msg = str(err.value)
    assert "settings.model" in msg and "other" in msg and "--out" in msg and "\n" not in msg
    with pytest.raises(CacheError, match="d_in"):
        CacheWriter(tmp_path / "c", SETTINGS, HOOKS, D + 1, with_grads=True)
    with pytest.raises(CacheError, match="dtype"):
        CacheWriter(tmp_path / "c", SETTINGS, HOOKS, D, dtype="float16", with_grads=True)


def test_truncated_shard_is_reported_and_repaired_by_resume(tmp_path, data):
    train, heldout = data
    reference = build(tmp_path / "ref", train, heldout)
    path = tmp_path / "c"
    build(path, train, heldout)
    manifest = json.loads((path / "manifest.json").read_text())
    train_shards = [s for s in manifest["shards"] if s["split"] == "train"]
    victim = path / train_shards[1]["grads"][1]
    victim.write_bytes(victim.read_bytes()[:-5])

    with pytest.raises(CacheError) as err:
        ActivationCache(path)
    msg = str(err.value)
    assert victim.name in msg and "sae-kit cache" in msg and "\n" not in msg

    writer = CacheWriter(path, SETTINGS, HOOKS, D, with_grads=True, shard_rows=10)
    assert not writer.complete
    assert writer.position("train") == train_shards[0]["position"]
    assert writer.position("heldout") == len(heldout)  # the other split is untouched
    assert not victim.exists()
    feed(writer, "train", train)
    writer.close()
    assert_rows_equal(ActivationCache(path).read("train", with_grads=True), reference.read("train", with_grads=True))


def test_verify_catches_corruption_that_keeps_the_size(tmp_path, data):
    path = tmp_path / "c"
    build(path, *data)
    victim = path / json.loads((path / "manifest.json").read_text())["shards"][0]["acts"][0]
    raw = bytearray(victim.read_bytes())
    raw[0] ^= 0xFF
    victim.write_bytes(bytes(raw))
    cache = ActivationCache(path)  # open stays cheap: sizes only
    with pytest.raises(CacheError, match=victim.name):
        cache.verify()


def test_missing_and_foreign_directories(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        ActivationCache(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="no manifest.json"):
        ActivationCache(tmp_path / "empty")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="refusing") as err:
        CacheWriter(foreign, SETTINGS, HOOKS, D)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(CacheError, match="not an sae-kit"):
        ActivationCache(tmp_path / "bad")


def test_an_empty_directory_becomes_a_cache(tmp_path, data):
    (tmp_path / "c").mkdir()
    cache = build(tmp_path / "c", *data)
    assert cache.n_rows("train") == sum(len(b) for b in data[0])


def test_check_compatible(tmp_path, data):
    cache = build(tmp_path / "c", *data)
    cache.check_compatible(model="tiny", hooks=[HOOKS[1]], d_in=D, context_size=4)
    cache.check_compatible(hook=HOOKS[0], hooks=tuple(HOOKS))
    with pytest.raises(CacheError) as err:
        cache.check_compatible(model="gpt2")
    assert "model" in str(err.value) and "tiny" in str(err.value) and "gpt2" in str(err.value)
    with pytest.raises(CacheError, match="blocks.9"):
        cache.check_compatible(hooks=["blocks.9.hook_resid_post"])
    with pytest.raises(CacheError, match="d_in"):
        cache.check_compatible(d_in=D + 1)
    with pytest.raises(CacheError, match="records no"):
        cache.check_compatible(dataset="x")


def test_writer_and_reader_argument_errors(tmp_path, data):
    train, _ = data
    no_grads = make_batches(2, with_grads=False)
    writer = CacheWriter(tmp_path / "c", SETTINGS, HOOKS, D, with_grads=True)
    with pytest.raises(CacheError, match="gradients"):
        writer.add("train", no_grads[0], position=1)
    with pytest.raises(CacheError, match="split"):
        writer.add("valid", train[0], position=1)
    writer.add("train", train[0], position=2)
    with pytest.raises(CacheError, match="backwards"):
        writer.add("train", train[1], position=1)
    writer.close()
    plain = build(tmp_path / "plain", no_grads, [], with_grads=False)
    with pytest.raises(CacheError, match="no gradients"):
        next(plain.batches(2, with_grads=True))
    with pytest.raises(CacheError, match="outside"):
        plain.read("train", 0, 10_000)


def test_writer_copies_rows_and_stops_after_a_failed_shard(tmp_path, data, monkeypatch):
    train, _ = data
    original = train[0].acts[HOOKS[0]].clone()
    writer = CacheWriter(tmp_path / "c", SETTINGS, HOOKS, D, with_grads=True, shard_rows=1)
    writer.add("train", train[0], position=1)
    train[0].acts[HOOKS[0]].zero_()  # the harvester reuses its buffer
    assert writer.position("train") == 1
    assert torch.equal(ActivationCache(tmp_path / "c").read("train").acts[HOOKS[0]], original)

    def full_disk(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr("sae_kit.cache._write_pieces", full_disk)
    writer.add("train", train[1], position=2)  # written in the background; the error surfaces next
    with pytest.raises(OSError, match="No space"):
        writer.add("train", train[2], position=3)
    with pytest.raises(CacheError, match="closed"):
        writer.add("train", train[3], position=4)
    monkeypatch.undo()
    resumed = CacheWriter(tmp_path / "c", SETTINGS, HOOKS, D, with_grads=True)
    assert resumed.position("train") == 1 and resumed.rows_written("train") == len(train[0])
