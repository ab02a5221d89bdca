"""ActivationCache at scale, on tiny synthetic shards: the shuffled reader against a reference of the order it has
always had (every rank, with and without gradients, whatever its read-ahead), and the cap on open shard maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_kit.cache import ActivationCache, CacheError, CacheWriter
from sae_kit.rows import ActivationRows

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
D = 5


def build(path, *, n_rows: int, shard_rows: int, with_grads: bool, dtype: str = "float32") -> ActivationCache:
    """A train split of `n_rows` rows written 1..6 at a time (so shards have uneven sizes) and a held-out split."""
    g = torch.Generator().manual_seed(0)
    writer = CacheWriter(
        path, {"test": True}, hooks=HOOKS, d_in=D, dtype=dtype, with_grads=with_grads, shard_rows=shard_rows
    )
    token, contexts = 0, 0
    while token < n_rows:
        n = min(int(torch.randint(1, 7, (1,), generator=g)), n_rows - token)
        ids = torch.arange(token, token + n)
        rows = ActivationRows(
            acts={h: torch.randn(n, D, generator=g) for h in HOOKS},
            grads={h: torch.randn(n, D, generator=g) for h in HOOKS} if with_grads else None,
            token=ids,
            doc=ids // 3,
            row=torch.full((n,), contexts),
            pos=ids % 4,
        )
        contexts += 1
        writer.add("train", rows, position=contexts)
        if contexts % 4 == 0:
            writer.add("heldout", rows, position=contexts // 4)
        token += n
    writer.close()
    return ActivationCache(path)


def reference_batches(cache: ActivationCache, batch_size: int, **kw) -> list[ActivationRows]:
    """The epoch's batches as the reader has always defined them: the (seed, epoch) permutation of the split, the
    rank's stride of it, cut into batches, rows taken from a plain sequential read of the whole split."""
    seed, epoch, rank, world = kw.get("seed", 0), kw.get("epoch", 0), kw.get("rank", 0), kw.get("world_size", 1)
    split, with_grads = kw.get("split", "train"), kw.get("with_grads", False)
    n = cache.n_rows(split)
    state = int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(state), dtype=torch.int32)
    order = order[: n - n % world][rank::world].long()
    stop = len(order) - len(order) % batch_size if kw.get("drop_last") else len(order)
    full = cache.read(split, hooks=kw.get("hooks"), with_grads=with_grads, dtype=kw.get("dtype", torch.float32))
    return [full.select(order[i : min(i + batch_size, stop)]) for i in range(0, stop, batch_size)]


def assert_same(got: list[ActivationRows], want: list[ActivationRows]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        ta, tb = a.tensors(), b.tensors()
        assert ta.keys() == tb.keys()
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("with_grads", [False, True])
def test_shuffled_batches_match_the_reference_on_every_rank(tmp_path, with_grads):
    cache = build(tmp_path / "c", n_rows=803, shard_rows=20, with_grads=with_grads)
    assert len(cache.manifest["shards"]) > 40  # rows of one batch come from many shards
    row_bytes = 32 + 2 * D * 4 * (2 if with_grads else 1)
    for kw in (
        {},
        {"seed": 3, "epoch": 2, "drop_last": True},
        {"rank": 0, "world_size": 3, "seed": 1},
        {"rank": 2, "world_size": 3, "seed": 1},
        {"rank": 1, "world_size": 2, "epoch": 1, "hooks": [HOOKS[1]]},
    ):
        kw = kw | {"with_grads": with_grads}
        want = reference_batches(cache, 32, **kw)
        for ahead in (0, 5 * 32 * row_bytes, 1 << 30):  # one batch a pass, 5 batches a pass, the whole epoch
            assert_same(list(cache.batches(32, read_ahead_bytes=ahead, **kw)), want)
        # a resumed epoch goes on with exactly the next batches, whatever the pass boundaries
        assert_same(list(cache.batches(32, read_ahead_bytes=5 * 32 * row_bytes, start_batch=7, **kw)), want[7:])


def test_cache_dtype_out_and_bfloat16_cache(tmp_path):
    cache = build(tmp_path / "c", n_rows=300, shard_rows=16, with_grads=True, dtype="bfloat16")
    kw = {"seed": 4, "with_grads": True}
    own = list(cache.batches(24, dtype=None, **kw))
    assert own[0].acts[HOOKS[0]].dtype == torch.bfloat16 and own[0].grads[HOOKS[1]].dtype == torch.bfloat16  # type: ignore[index]
    assert_same(own, reference_batches(cache, 24, dtype=None, **kw))
    as_fp32 = list(cache.batches(24, **kw))  # the default: float32 out, converted exactly
    assert as_fp32[0].acts[HOOKS[0]].dtype == torch.float32
    assert_same([b.to(dtype=torch.float32) for b in own], as_fp32)
    assert cache.read("heldout", dtype=None).acts[HOOKS[0]].dtype == torch.bfloat16


class CountingCache(ActivationCache):
    """Records, after every map it opens, how many of this cache's files the process has mapped."""

    peak, opened = 0, 0

    def _map(self, name, n_rows, width, dtype):
        new = name not in self._maps
        mapped = super()._map(name, n_rows, width, dtype)
        if new:
            self.opened += 1
            with open("/proc/self/maps") as f:
                self.peak = max(self.peak, sum(str(self.path) in line for line in f))
        return mapped


def test_open_maps_stay_under_the_cap_with_more_shards_than_it(tmp_path):
    build(tmp_path / "c", n_rows=480, shard_rows=8, with_grads=True)
    cache = CountingCache(tmp_path / "c", max_open_maps=7)
    files = sum(1 + len(s["acts"]) + len(s["grads"]) for s in cache.manifest["shards"])
    assert files > 30 * cache.max_open_maps  # 5 files a shard, ~60 shards
    want = reference_batches(ActivationCache(tmp_path / "c"), 32, with_grads=True, rank=1, world_size=2)
    for ahead in (0, 1 << 30):
        got = list(cache.batches(32, with_grads=True, rank=1, world_size=2, read_ahead_bytes=ahead))
        assert_same(got, want)  # maps closed and reopened along the way give the same rows
    assert cache.read("train", with_grads=True).token.tolist() == list(range(480))
    assert cache.opened > 2 * files  # every file was mapped, closed and mapped again
    assert cache.peak == 7 and cache.open_maps == 7
    del got, cache
    with open("/proc/self/maps") as f:
        assert not any(str(tmp_path / "c") in line for line in f)  # dropping the cache unmaps every file


def test_a_cap_below_one_shard_is_refused(tmp_path):
    build(tmp_path / "c", n_rows=50, shard_rows=8, with_grads=True)
    with pytest.raises(CacheError, match="max_open_maps=4 is below the 5 files of one shard"):
        ActivationCache(tmp_path / "c", max_open_maps=4)


def test_running_out_of_maps_names_the_fix(tmp_path, monkeypatch):
    cache = build(tmp_path / "c", n_rows=50, shard_rows=8, with_grads=False)

    def no_maps_left(path, **kw):  # what torch raises once the process reaches vm.max_map_count
        raise RuntimeError(f"unable to mmap 320 bytes from file <{path}>: Cannot allocate memory (12)")

    monkeypatch.setattr(torch, "from_file", no_maps_left)
    with pytest.raises(CacheError, match="out of memory maps .* pass a lower max_open_maps, or raise vm.max_map_count"):
        next(cache.batches(8))
