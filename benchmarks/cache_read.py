"""Shuffled reads from an ActivationCache of many shards: the old per-batch, per-shard loop against today's reader.

    python benchmarks/cache_read.py            # 4,096 shards x 256 rows, d_in 768 bfloat16 (1.5 GiB), batch 4096
    python benchmarks/cache_read.py --smoke    # CI: 64 shards x 32 rows, d_in 64, map cap 16 (seconds)
    more: --shards N  --shard-rows N  --d-in N  --dtype bfloat16|float32|float16  --batch N  --batches N
          --max-open-maps N  --threads N  --dir PATH (build the cache there and keep it; default: a temporary one)

Both readers read the same batches of the same epoch (seed 0) from the same cache, warm in the page cache, and
must give identical rows (checked); rows/s and GB/s count the cache bytes a batch holds (activations in the cache
dtype plus the 32-byte provenance). "old" is a copy of the reader before issue 14: for every batch, one Python
iteration per shard the batch touches, every shard file kept mapped. The maps column is the peak of
/proc/self/maps entries of cache files after a batch (the process limit is vm.max_map_count, 65,530 by default).
The "one shard" line reads the same rows from a single-shard copy of the cache: the floor for a shuffled read.

The cache is laid out directly in the documented format (manifest.json + raw shard files) rather than through
CacheWriter, whose per-shard manifest rewrite makes thousands of tiny shards slow to write; the reader is what is
measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from sae_kit.cache import DTYPES, FORMAT, MANIFEST, MAX_OPEN_MAPS, VERSION, ActivationCache
from sae_kit.rows import META_FIELDS, ActivationRows

HOOK = "blocks.6.hook_resid_post"


def maps_now(root: Path) -> int:
    """Entries in /proc/self/maps (one per memory mapping of this process) of files under `root`; 0 without /proc."""
    try:
        with open("/proc/self/maps") as f:
            return sum(str(root) in line for line in f)
    except OSError:
        return 0


def build(root: Path, shards: int, shard_rows: int, d_in: int, dtype: str) -> None:
    """A train split of `shards` shards of `shard_rows` random rows (token = global row id), plus 1 held-out row."""
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    entries, row = [], 0
    sizes = [("train", i, shard_rows) for i in range(shards)] + [("heldout", 0, 1)]
    for split, i, n in sizes:
        stem = f"{split}-{i:06d}"
        acts = torch.randn(n, d_in, generator=g).to(DTYPES[dtype])
        acts.view(torch.uint8).numpy().tofile(root / f"{stem}.acts-0.bin")
        ids = torch.arange(row, row + n)
        torch.stack([ids, ids // 100, ids // 64, ids % 64], dim=1).numpy().tofile(root / f"{stem}.meta.bin")
        row += n
        entries.append(
            {
                "split": split,
                "n_rows": n,
                "position": i + 1,
                "acts": [f"{stem}.acts-0.bin"],
                "grads": [],
                "meta": f"{stem}.meta.bin",
            }
        )
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "settings": {"bench": True},
        "hooks": [HOOK],
        "d_in": d_in,
        "dtype": dtype,
        "with_grads": False,
        "complete": True,
        "splits": {
            "train": {"n_rows": shards * shard_rows, "position": shards},
            "heldout": {"n_rows": 1, "position": 1},
        },
        "shards": entries,
    }
    (root / MANIFEST).write_text(json.dumps(manifest))


def merge(src: Path, dst: Path) -> None:
    """A copy of cache `src` whose train split is one shard (same rows, same order)."""
    manifest = json.loads((src / MANIFEST).read_text())
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    dst.mkdir(parents=True)
    for kind in ("acts-0", "meta"):
        with open(dst / f"train-000000.{kind}.bin", "wb") as out:
            for s in train:
                with open(src / (s["meta"] if kind == "meta" else s["acts"][0]), "rb") as f:
                    shutil.copyfileobj(f, out)
    held = [s for s in manifest["shards"] if s["split"] == "heldout"]
    for s in held:
        for name in [s["meta"], *s["acts"]]:
            shutil.copy(src / name, dst / name)
    one = dict(train[0], n_rows=sum(s["n_rows"] for s in train), position=len(train))
    one |= {"acts": ["train-000000.acts-0.bin"], "meta": "train-000000.meta.bin"}
    (dst / MANIFEST).write_text(json.dumps(manifest | {"shards": [one, *held]}))


def warm(root: Path) -> None:
    """Read every file once, so that every reader finds the cache in the page cache."""
    for file in root.iterdir():
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass


def old_batches(cache: ActivationCache, batch_size: int, seed: int = 0, epoch: int = 0) -> Iterator[ActivationRows]:
    """The shuffled reader as it was before issue 14 (one hook, no gradients, float32 out), kept as the reference:
    per batch, sort its rows, then one Python iteration per shard it touches; every shard file stays mapped."""
    n = cache.n_rows("train")
    generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)
    )
    order = torch.randperm(n, generator=generator, dtype=torch.int32)
    shards = [s for s in cache.manifest["shards"] if s["split"] == "train"]
    starts = torch.tensor([0] + [s["n_rows"] for s in shards], dtype=torch.int64).cumsum(0)
    storage, d = DTYPES[cache.dtype], cache.d_in
    maps: dict[str, torch.Tensor] = {}

    def mapped(name: str, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        if name not in maps:
            flat = torch.from_file(str(cache.path / name), shared=False, size=rows * width, dtype=dtype)
            maps[name] = flat.view(rows, width)
        return maps[name]

    for start in range(0, n, batch_size):
        index = order[start : start + batch_size].long()
        ordered, perm = index.sort()
        shard_ids, counts = torch.unique_consecutive(
            torch.searchsorted(starts, ordered, right=True) - 1, return_counts=True
        )
        staged = {
            "meta": torch.empty(len(index), 4, dtype=torch.int64),
            "acts": torch.empty(len(index), d, dtype=storage),
        }
        lo = 0
        for shard_id, count in zip(shard_ids.tolist(), counts.tolist()):
            local = ordered[lo : lo + count] - starts[shard_id]
            shard = shards[shard_id]
            arrays = {
                "meta": mapped(shard["meta"], shard["n_rows"], len(META_FIELDS), torch.int64),
                "acts": mapped(shard["acts"][0], shard["n_rows"], d, storage),
            }
            for name, src in arrays.items():
                torch.index_select(src, 0, local, out=staged[name][lo : lo + count])
            lo += count
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(len(perm))
        meta = staged["meta"].index_select(0, inverse)
        yield ActivationRows(
            acts={HOOK: staged["acts"].index_select(0, inverse).to(torch.float32)},
            **dict(zip(META_FIELDS, meta.t().contiguous())),
        )


def run_once(
    batches: Callable[[], Iterator[ActivationRows]], n_batches: int, root: Path
) -> tuple[float, int, list[ActivationRows]]:
    """(seconds for the first n_batches, peak maps of files under `root` while reading, the batches)."""
    got, peak = [], 0
    t = time.perf_counter()
    for batch in batches():
        got.append(batch)
        peak = max(peak, maps_now(root))
        if len(got) == n_batches:
            break
    return time.perf_counter() - t, peak, got


def same(a: list[ActivationRows], b: list[ActivationRows]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.token, y.token)
        and torch.equal(x.pos, y.pos)
        and torch.equal(x.acts[HOOK].float(), y.acts[HOOK].float())
        for x, y in zip(a, b)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CI: 64 shards x 32 rows, d_in 64, map cap 16, 1 thread")
    ap.add_argument("--shards", type=int, default=None, help="train shards (default 4096; --smoke 64)")
    ap.add_argument("--shard-rows", type=int, default=None, help="rows per shard (default 256; --smoke 32)")
    ap.add_argument("--d-in", type=int, default=None, help="row width (default 768; --smoke 64)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="cache dtype")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 4096; --smoke 256)")
    ap.add_argument("--batches", type=int, default=None, help="batches timed per reader (default 64; --smoke 4)")
    ap.add_argument("--max-open-maps", type=int, default=None, help=f"map cap (default {MAX_OPEN_MAPS}; --smoke 16)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; --smoke 1)")
    ap.add_argument("--repeats", type=int, default=None, help="turns per reader, best kept (default 3; --smoke 1)")
    ap.add_argument("--dir", type=Path, default=None, help="build the cache here and keep it (reused if present)")
    args = ap.parse_args()
    smoke = args.smoke
    shards = args.shards or (64 if smoke else 4096)
    shard_rows = args.shard_rows or (32 if smoke else 256)
    d_in = args.d_in or (64 if smoke else 768)
    batch = args.batch or (256 if smoke else 4096)
    n_batches = args.batches or (4 if smoke else 64)
    cap = args.max_open_maps or (16 if smoke else MAX_OPEN_MAPS)
    repeats = args.repeats or (1 if smoke else 3)
    torch.set_num_threads(args.threads or (1 if smoke else 2))
    n_batches = min(n_batches, shards * shard_rows // batch)

    tmp = None if args.dir else tempfile.mkdtemp(prefix="sae-kit-cache-read-")
    root = args.dir or Path(tmp)  # type: ignore[arg-type]
    try:
        many, one = root / "shards", root / "one"
        t = time.perf_counter()
        if not (many / MANIFEST).exists():
            build(many, shards, shard_rows, d_in, args.dtype)
        if not (one / MANIFEST).exists():
            merge(many, one)
        warm(many)
        warm(one)
        built = time.perf_counter() - t
        row_bytes = d_in * DTYPES[args.dtype].itemsize + 8 * len(META_FIELDS)
        gib = shards * shard_rows * row_bytes / 2**30
        print(
            f"cache: {shards:,} shards x {shard_rows:,} rows, d_in {d_in}, {args.dtype} ({gib:.2f} GiB), "
            f"batch {batch}, {n_batches} batches per reader, best of {repeats} turns, {torch.get_num_threads()} threads, "
            f"load average {os.getloadavg()[0]:.1f} (built and warmed in {built:.0f} s)"
        )
        held = 0  # the most maps a reader at the default cap held at the end of a run
        last: list[ActivationCache] = []

        def fresh(path: Path, max_open_maps: int = cap) -> ActivationCache:
            """A new reader per timed run (no maps left from the previous one); only the last one is kept alive."""
            nonlocal held
            held = max([held, *(c.open_maps for c in last if c.max_open_maps == cap)])
            last[:] = [ActivationCache(path, max_open_maps=max_open_maps)]
            return last[0]

        small_cap = max(2, cap // 32)  # fewer maps than the cache has files: the reader remaps shards as it goes
        runs = {
            "old per-shard loop": lambda: old_batches(fresh(many), batch),
            "reader, float32 out": lambda: fresh(many).batches(batch),
            "  read-ahead one batch": lambda: fresh(many).batches(batch, read_ahead_bytes=0),
            f"  map cap {small_cap}": lambda: fresh(many, small_cap).batches(batch),
            f"  {args.dtype} out": lambda: fresh(many).batches(batch, dtype=None),
            "  one-shard copy (floor)": lambda: fresh(one).batches(batch),
        }
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        peaks: dict[str, int] = dict.fromkeys(runs, 0)
        reference = None
        for turn in range(repeats):  # the readers take turns, each time in a rotated order, so load hits them alike
            names = list(runs)[turn % len(runs) :] + list(runs)[: turn % len(runs)]
            for name in names:
                took, peak, got = run_once(runs[name], n_batches, root)
                seconds[name].append(took)
                peaks[name] = max(peaks[name], peak)
                if reference is None:
                    reference = got
                elif not same(got, reference):
                    raise SystemExit(f"FAILED: {name} gave different rows from {list(runs)[0]}")
                del got
        rows = n_batches * batch
        base = min(seconds["old per-shard loop"])
        print(f"\n{'reader':<28} {'rows/s':>12} {'GB/s':>8} {'vs old':>8} {'peak maps':>10}")
        for name, times in seconds.items():
            best = min(times)
            print(
                f"{name:<28} {rows / best:12,.0f} {rows * row_bytes / best / 1e9:8.3f} "
                f"{base / best:7.2f}x {peaks[name]:10,}"
            )
        held = max([held, *(c.open_maps for c in last if c.max_open_maps == cap)])
        last.clear()
        print(f"\nmap cap {cap}: the reader held at most {held} maps at the end of a run; the old one maps every file")
        print(f"rows identical to the old reader's: yes ({rows:,} rows each)")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
