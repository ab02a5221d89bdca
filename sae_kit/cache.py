"""The on-disk activation cache: a directory of raw, memory-mappable shards described by `manifest.json`.

Layout of a cache directory:

- `manifest.json`: format and version, the caller's `settings`, `hooks`, `d_in`, `dtype`, `with_grads`, per-split
  `n_rows` and `position` (source contexts consumed, for resume), `complete`, and the shard list.
- `{split}-{index:06d}.acts-{h}.bin`: activations of hook number `h`, raw `[n_rows, d_in]` in the cache dtype
  (bfloat16 is stored as its raw 16-bit pattern).
- `{split}-{index:06d}.grads-{h}.bin`: gradients, same shape and dtype, when the cache has them.
- `{split}-{index:06d}.meta.bin`: raw int64 `[n_rows, 4]` provenance (token, doc, row, pos).

Every file is written to a temporary name and renamed, then the manifest is rewritten atomically, so a killed
writer leaves a cache that holds whole shards only; `CacheWriter` on the same directory resumes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_kit.atomic import atomic_path, write_json
from sae_kit.errors import SaeKitError
from sae_kit.rows import META_FIELDS, ActivationRows

log = logging.getLogger(__name__)

FORMAT = "sae-kit-activation-cache"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HEADER_KEYS = ("settings", "hooks", "d_in", "dtype", "with_grads")
"""Manifest keys that fix what a cache holds; a resumed writer must match all of them."""

MAX_OPEN_MAPS = 8192
"""Default cap on the shard files an `ActivationCache` keeps memory-mapped at once; the least recently used map is
closed beyond it. Each map is one of the 65,530 that Linux allows a process by default (`vm.max_map_count`), and
holds page tables for the pages read through it; 8,192 is every file of 4,096 single-hook shards (268M rows at the
default 65,536 rows a shard) with most of the process's maps left to the rest. A cache with more files still reads
correctly, remapping shards as it goes (slower: see BENCHMARKS.md, "Cache reads at scale")."""
READ_AHEAD_BYTES = 64 << 20
"""Default bytes of rows a shuffled read gathers at once (whole batches, at least one): reading several batches'
rows in one pass over the shards touches each shard once for all of them, not once per batch."""

_SHARD_FILE = re.compile(r"^(train|heldout)-\d{6}\.")
_REPAIR = "re-run `sae-kit cache` with the same --out to repair and resume it"


class CacheError(SaeKitError):
    """A missing, foreign, damaged or mismatching activation cache; the message names the fix."""


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _normalise(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists), so that values compare like the manifest's."""
    return json.loads(json.dumps(obj))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise CacheError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def _load_manifest(root: Path) -> dict[str, Any]:
    """Read and sanity-check `root/manifest.json`."""
    if not root.is_dir():
        raise CacheError(
            f"no activation cache at {root}: the directory does not exist; build one with `sae-kit cache --out {root}`"
        )
    path = root / MANIFEST
    if not path.is_file():
        raise CacheError(
            f"{root} has no {MANIFEST}, so it is not an activation cache; build one with `sae-kit cache --out {root}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(f"cannot read {path} ({e}); delete {root} and rebuild it with `sae-kit cache`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(
            f"{path} is not an sae-kit activation cache manifest; point to a directory made by `sae-kit cache`"
        )
    if manifest.get("version") != VERSION:
        raise CacheError(
            f"{path} has cache format version {manifest.get('version')}, this sae-kit reads version {VERSION}; "
            "rebuild the cache with `sae-kit cache` (new --out)"
        )
    return manifest


def _shard_files(shard: dict[str, Any], d_in: int, itemsize: int) -> list[tuple[str, int]]:
    """Every file of a shard with its exact expected size in bytes."""
    n = shard["n_rows"]
    arrays = [(name, n * d_in * itemsize) for name in shard["acts"] + shard["grads"]]
    return arrays + [(shard["meta"], n * len(META_FIELDS) * 8)]


def _shard_problem(root: Path, shard: dict[str, Any], d_in: int, itemsize: int) -> str | None:
    """A description of the first missing or wrongly sized file of `shard`, or None when all are in place."""
    for name, size in _shard_files(shard, d_in, itemsize):
        try:
            actual = (root / name).stat().st_size
        except FileNotFoundError:
            return f"shard file {root / name} is missing"
        if actual != size:
            return f"shard file {root / name} has {actual} bytes, expected {size} (truncated or damaged)"
    return None


def _raw(t: torch.Tensor) -> np.ndarray:
    """A numpy view of `t`'s memory as integers of its element size (numpy has no bfloat16)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy()


def _write_pieces(path: Path, pieces: list[torch.Tensor]) -> str:
    """Atomically write the raw bytes of `pieces` one after another to `path`; return their sha256."""
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for piece in pieces:
            raw = piece.contiguous().view(torch.uint8).numpy().reshape(-1).data  # a memoryview: no copy
            f.write(raw)
            digest.update(raw)
    return digest.hexdigest()


class CacheWriter:
    """Append harvested rows to a cache directory in shards; resume one that a killed run left behind.

    `position(split)` and `rows_written(split)` report what is safely on disk, so a resumed caller skips that many
    source contexts. Rows added but not yet in a shard are lost at a crash and simply harvested again.
    """

    def __init__(
        self,
        path: str | Path,
        settings: dict[str, Any],
        hooks: list[str],
        d_in: int,
        dtype: str = "float32",
        with_grads: bool = False,
        shard_rows: int = 65536,
    ) -> None:
        if not hooks or len(set(hooks)) != len(hooks):
            raise CacheError(f"hooks must be a non-empty list of distinct names, got {hooks!r}")
        if dtype not in DTYPES:
            raise CacheError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if d_in <= 0 or shard_rows <= 0:
            raise CacheError(f"d_in and shard_rows must be positive, got d_in={d_in}, shard_rows={shard_rows}")
        try:
            settings = _normalise(settings)
        except (TypeError, ValueError) as e:
            raise CacheError(f"cache settings must be JSON-serialisable ({e})") from None
        self.path = Path(path)
        self.shard_rows = shard_rows
        self._dtype = DTYPES[dtype]
        self._itemsize = self._dtype.itemsize
        header = {"settings": settings, "hooks": list(hooks), "d_in": d_in, "dtype": dtype, "with_grads": with_grads}
        if (self.path / MANIFEST).exists():
            self.manifest = _load_manifest(self.path)
            self._check_same(header)
            self._repair()
        elif self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise CacheError(
                f"{self.path} exists and is not an activation cache (no {MANIFEST}); refusing to write into it: "
                "use a new --out directory, or empty this one"
            )
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = {
                "format": FORMAT,
                "version": VERSION,
                **header,
                "complete": False,
                "splits": {s: {"n_rows": 0, "position": 0} for s in SPLITS},
                "shards": [],
            }
            write_json(self.path / MANIFEST, self.manifest)
        self._pending: dict[str, list[ActivationRows]] = {s: [] for s in SPLITS}
        self._pending_rows = {s: 0 for s in SPLITS}
        self._pending_position = {s: self.manifest["splits"][s]["position"] for s in SPLITS}
        self._submitted_position = dict(self._pending_position)
        # One shard is written in the background while the caller harvests the next; at most one is in flight.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sae-kit-cache")
        self._in_flight: Future[None] | None = None
        self._closed = False

    @property
    def hooks(self) -> list[str]:
        return self.manifest["hooks"]

    @property
    def complete(self) -> bool:
        """Whether a previous run already finished this cache (nothing is left to add)."""
        return self.manifest["complete"]

    def position(self, split: str) -> int:
        """Source contexts of `split` whose rows are all safely on disk (waits for a shard being written)."""
        _check_split(split)
        self._wait()
        return self.manifest["splits"][split]["position"]

    def rows_written(self, split: str) -> int:
        """Rows of `split` safely on disk (waits for a shard being written)."""
        _check_split(split)
        self._wait()
        return self.manifest["splits"][split]["n_rows"]

    def add(self, split: str, rows: ActivationRows, position: int) -> None:
        """Queue `rows` for `split`, where `position` is the number of that split's contexts consumed so far.

        Once `shard_rows` rows are queued they go to disk as one shard; a shard holds whole `add` calls, so the
        recorded position always matches the rows on disk.
        """
        _check_split(split)
        if self._closed or self.complete:
            raise CacheError(
                f"activation cache {self.path} is {'closed' if self._closed else 'complete'}; nothing more can be added"
            )
        if position < self._pending_position[split]:
            raise CacheError(f"{split} position went backwards ({position} < {self._pending_position[split]})")
        if set(rows.acts) != set(self.hooks):
            raise CacheError(f"rows have hooks {rows.hooks}, the cache holds {self.hooks}")
        if self.manifest["with_grads"] and (rows.grads is None or set(rows.grads) != set(self.hooks)):
            raise CacheError(
                f"this cache stores gradients of {self.hooks} but the rows do not carry them all; harvest with gradients"
            )
        d_in = self.manifest["d_in"]
        bad = [h for h in self.hooks if rows.acts[h].shape != (len(rows), d_in)]
        if bad:
            raise CacheError(
                f"rows of hook {bad[0]!r} have shape {tuple(rows.acts[bad[0]].shape)}, expected ({len(rows)}, {d_in})"
            )
        if len(rows):
            grads = rows.grads if self.manifest["with_grads"] else None
            self._pending[split].append(
                ActivationRows(
                    acts={h: self._to_cpu(rows.acts[h], self._dtype) for h in self.hooks},
                    grads=None if grads is None else {h: self._to_cpu(grads[h], self._dtype) for h in self.hooks},
                    **{name: self._to_cpu(t, torch.int64) for name, t in rows.meta().items()},
                )
            )
            self._pending_rows[split] += len(rows)
        self._pending_position[split] = position
        if self._pending_rows[split] >= self.shard_rows:
            self._flush(split)

    def close(self, complete: bool = True) -> None:
        """Write the queued tail of each split and, with `complete`, mark the cache finished."""
        if self._closed:
            return
        try:
            for split in SPLITS:
                self._flush(split)
            self._wait()
            if complete and not self.manifest["complete"]:
                self.manifest = {**self.manifest, "complete": True}
                write_json(self.path / MANIFEST, self.manifest)
        finally:
            self._executor.shutdown()
            self._closed = True

    @staticmethod
    def _to_cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # copy=True: the caller may reuse its buffers after add() returns.
        return t.detach().to(device="cpu", dtype=dtype, copy=True)

    def _wait(self) -> None:
        """Let the shard in flight land (re-raising its error, e.g. a full disk)."""
        if self._in_flight is not None:
            future, self._in_flight = self._in_flight, None
            try:
                future.result()
            except BaseException:
                # Later shards would leave a gap behind the lost one: stop here; a new writer resumes cleanly.
                self._executor.shutdown()
                self._closed = True
                raise

    def _flush(self, split: str) -> None:
        """Hand the queued rows of `split` (and its position) to the background writer."""
        pieces, n, position = self._pending[split], self._pending_rows[split], self._pending_position[split]
        if n == 0 and position == self._submitted_position[split]:
            return
        self._wait()
        self._pending[split], self._pending_rows[split] = [], 0
        self._submitted_position[split] = position
        self._in_flight = self._executor.submit(self._write_shard, split, pieces, n, position)

    def _write_shard(self, split: str, pieces: list[ActivationRows], n: int, position: int) -> None:
        """Write `pieces` as the next shard of `split`, then publish it and `position` in a new manifest."""
        shards = list(self.manifest["shards"])
        if n:
            stem = f"{split}-{sum(s['split'] == split for s in shards):06d}"
            acts = [f"{stem}.acts-{i}.bin" for i in range(len(self.hooks))]
            grads = [f"{stem}.grads-{i}.bin" for i in range(len(self.hooks))] if self.manifest["with_grads"] else []
            contents = {name: [p.acts[hook] for p in pieces] for name, hook in zip(acts, self.hooks)}
            contents |= {name: [p.grads[hook] for p in pieces] for name, hook in zip(grads, self.hooks)}  # type: ignore[index]
            contents[f"{stem}.meta.bin"] = [torch.stack([p.token, p.doc, p.row, p.pos], dim=1) for p in pieces]
            sha256 = {name: _write_pieces(self.path / name, parts) for name, parts in contents.items()}
            shard = {
                "split": split,
                "n_rows": n,
                "position": position,
                "acts": acts,
                "grads": grads,
                "meta": f"{stem}.meta.bin",
            }
            shards.append(shard | {"sha256": sha256})
        splits = dict(self.manifest["splits"])
        splits[split] = {"n_rows": splits[split]["n_rows"] + n, "position": position}
        manifest = {**self.manifest, "splits": splits, "shards": shards}
        write_json(self.path / MANIFEST, manifest)
        self.manifest = manifest  # one assignment, so readers on the caller's thread see whole snapshots

    def _check_same(self, header: dict[str, Any]) -> None:
        """Refuse to resume a cache made with different settings, naming each differing key."""
        diffs = []
        for key, value in header.items():
            have = self.manifest.get(key)
            if key == "settings" and isinstance(have, dict):
                for sub in sorted(set(have) | set(value), key=str):
                    if have.get(sub) != value.get(sub):
                        diffs.append(f"settings.{sub} (cache {_short(have.get(sub))}, now {_short(value.get(sub))})")
            elif have != value:
                diffs.append(f"{key} (cache {_short(have)}, now {_short(value)})")
        if diffs:
            raise CacheError(
                f"{self.path} holds an activation cache built with different {'; '.join(diffs)}; "
                "use a new --out directory, or delete this one to rebuild it"
            )

    def _repair(self) -> None:
        """Drop each split's shards from its first missing or truncated one on, and delete stray files."""
        d_in = self.manifest["d_in"]
        kept: list[dict[str, Any]] = []
        broken: set[str] = set()
        for shard in self.manifest["shards"]:
            if shard["split"] in broken:
                continue
            problem = _shard_problem(self.path, shard, d_in, self._itemsize)
            if problem is None:
                kept.append(shard)
            else:
                log.warning(
                    "%s; dropping it and every later %s shard, they will be harvested again", problem, shard["split"]
                )
                broken.add(shard["split"])
        if broken:
            self.manifest["shards"] = kept
            self.manifest["complete"] = False
            for split in broken:
                mine = [s for s in kept if s["split"] == split]
                self.manifest["splits"][split] = {
                    "n_rows": sum(s["n_rows"] for s in mine),
                    "position": mine[-1]["position"] if mine else 0,
                }
            write_json(self.path / MANIFEST, self.manifest)
        listed = {name for shard in kept for name, _ in _shard_files(shard, d_in, self._itemsize)}
        for file in self.path.iterdir():
            stray_tmp = file.name.startswith(".") and file.name.endswith(".tmp")
            if file.is_file() and (stray_tmp or (_SHARD_FILE.match(file.name) and file.name not in listed)):
                file.unlink()


class ActivationCache:
    """Read access to a cache directory: globally shuffled batches for training, sequential reads for evaluation.

    Shard files are memory-mapped lazily, so nothing is loaded into RAM beyond the rows a batch touches, and at
    most `max_open_maps` of them at a time (least recently used closed first), however many shards the cache has.
    """

    def __init__(self, path: str | Path, *, max_open_maps: int = MAX_OPEN_MAPS) -> None:
        self.path = Path(path)
        self.manifest = _load_manifest(self.path)
        self._dtype = DTYPES[self.manifest["dtype"]]
        for shard in self.manifest["shards"]:
            problem = _shard_problem(self.path, shard, self.d_in, self._dtype.itemsize)
            if problem is not None:
                raise CacheError(f"{problem}; {_REPAIR}")
        self._shards = {s: [sh for sh in self.manifest["shards"] if sh["split"] == s] for s in SPLITS}
        self._starts = {
            s: torch.tensor([0] + [sh["n_rows"] for sh in shards], dtype=torch.int64).cumsum(0)
            for s, shards in self._shards.items()
        }
        self._files_per_shard = 1 + len(self.hooks) * (2 if self.with_grads else 1)
        if max_open_maps < self._files_per_shard:
            raise CacheError(
                f"max_open_maps={max_open_maps} is below the {self._files_per_shard} files of one shard of {self.path}; "
                f"raise it (default {MAX_OPEN_MAPS})"
            )
        self.max_open_maps = max_open_maps
        self._root = str(self.path)
        self._starts_np = {s: starts.numpy() for s, starts in self._starts.items()}
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self._maps_lock = threading.Lock()  # a prefetch thread and the caller may read at once

    @property
    def open_maps(self) -> int:
        """Shard files memory-mapped right now (at most `max_open_maps`)."""
        return len(self._maps)

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]

    @property
    def hooks(self) -> list[str]:
        return self.manifest["hooks"]

    @property
    def d_in(self) -> int:
        return self.manifest["d_in"]

    @property
    def dtype(self) -> str:
        """The storage dtype name (float32, float16 or bfloat16)."""
        return self.manifest["dtype"]

    @property
    def with_grads(self) -> bool:
        return self.manifest["with_grads"]

    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    def n_rows(self, split: str = "train") -> int:
        _check_split(split)
        return int(self._starts[split][-1])

    def __repr__(self) -> str:
        return (
            f"ActivationCache({str(self.path)!r}, hooks={self.hooks}, d_in={self.d_in}, dtype={self.dtype}, "
            f"with_grads={self.with_grads}, train={self.n_rows('train')} rows, heldout={self.n_rows('heldout')} rows, "
            f"shards={len(self.manifest['shards'])}, complete={self.complete})"
        )

    def check_compatible(self, **expected: Any) -> None:
        """Raise unless the cache matches `expected` (manifest keys such as d_in, or keys of its settings).

        `hooks` (or `hook`) passes when the cache holds every named hook.
        """
        for key, want in expected.items():
            if key in ("hook", "hooks"):
                missing = [h for h in ([want] if isinstance(want, str) else want) if h not in self.hooks]
                if missing:
                    raise CacheError(
                        f"activation cache {self.path} holds hooks {self.hooks}, not {missing[0]!r}; "
                        "point to a cache of that hook or build one with `sae-kit cache --out NEW_DIR`"
                    )
                continue
            source = self.manifest if key in HEADER_KEYS else self.settings
            if key not in source:
                raise CacheError(
                    f"activation cache {self.path} records no {key!r} (expected {_short(want)}); "
                    "rebuild it with `sae-kit cache --out NEW_DIR`"
                )
            if source[key] != _normalise(want):
                raise CacheError(
                    f"activation cache {self.path} has {key}={_short(source[key])}, expected {_short(want)}: "
                    "it belongs to a different run; point to the right cache or build one with `sae-kit cache --out NEW_DIR`"
                )

    def verify(self) -> None:
        """Hash every shard file against the manifest (slow: reads the whole cache)."""
        for shard in self.manifest["shards"]:
            for name, expected in shard.get("sha256", {}).items():
                digest = hashlib.sha256()
                with open(self.path / name, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                if digest.hexdigest() != expected:
                    raise CacheError(
                        f"shard file {self.path / name} does not match its sha256 in the manifest; delete the cache and rebuild it"
                    )

    def batches(
        self,
        batch_size: int,
        *,
        split: str = "train",
        seed: int = 0,
        epoch: int = 0,
        hooks: list[str] | None = None,
        with_grads: bool = False,
        drop_last: bool = False,
        dtype: torch.dtype | None = torch.float32,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        read_ahead_bytes: int = READ_AHEAD_BYTES,
    ) -> Iterator[ActivationRows]:
        """One epoch of `split` in an order fixed by (seed, epoch), shuffled globally across shards.

        `start_batch` skips that many batches of the epoch without reading them (to resume a run mid-epoch).
        `dtype` is what activations and gradients come out as; None keeps the cache's own (e.g. bfloat16, for a
        consumer that converts on its device). The rows of as many whole batches as fit in `read_ahead_bytes` (at
        least one batch) are gathered in one pass over the shards; the batches and their order do not depend on it.

        Under data parallelism every rank passes the same seed and its own `rank`: the ranks then read disjoint
        rows, the same number each (up to `world_size - 1` rows of the epoch are left out).
        """
        hooks = self._hooks(hooks, with_grads)
        if batch_size <= 0:
            raise CacheError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise CacheError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        n = self.n_rows(split)
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)
        )
        order = torch.randperm(n, generator=generator, dtype=torch.int32 if n < 2**31 else torch.int64)
        order = order[: n - n % world_size][rank::world_size]
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        row_bytes = len(META_FIELDS) * 8 + len(hooks) * (2 if with_grads else 1) * self.d_in * self._dtype.itemsize
        per_pass = max(1, read_ahead_bytes // (row_bytes * batch_size)) * batch_size
        staged = self._empty(min(per_pass, max(stop - start_batch * batch_size, 0)), hooks, with_grads, self._dtype)
        for i, lo in enumerate(range(start_batch * batch_size, stop, per_pass)):
            index = order[lo : min(lo + per_pass, stop)].numpy()
            # every other pass visits the shards backwards, so that the maps it opened last, which the LRU still
            # holds, are the first the next pass needs (a cache with more files than the cap then remaps fewer)
            where = self._gather_sorted(split, index, hooks, with_grads, staged, backwards=i % 2 == 1)
            for b in range(0, len(where), batch_size):
                yield self._pick(staged, where[b : b + batch_size], hooks, with_grads, dtype)

    def read(
        self,
        split: str = "heldout",
        start: int = 0,
        stop: int | None = None,
        *,
        hooks: list[str] | None = None,
        with_grads: bool = False,
        dtype: torch.dtype | None = torch.float32,
    ) -> ActivationRows:
        """Rows `start:stop` of `split` in stored order, activations and gradients in `dtype` (None: the cache's)."""
        hooks = self._hooks(hooks, with_grads)
        n = self.n_rows(split)
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise CacheError(f"read range {start}:{stop} is outside the {n} rows of split {split!r}")
        out = self._empty(stop - start, hooks, with_grads, dtype or self._dtype)
        starts = self._starts[split].tolist()
        for i, shard in enumerate(self._shards[split]):
            lo, hi = max(start, starts[i]), min(stop, starts[i + 1])
            if lo < hi:
                src, dst = slice(lo - starts[i], hi - starts[i]), slice(lo - start, hi - start)
                for name, buf in self._arrays(shard, hooks, with_grads).items():
                    out[name][dst].copy_(buf[src])
                del buf  # see _gather_sorted
        return self._rows(out, hooks, with_grads)

    def _hooks(self, hooks: list[str] | None, with_grads: bool) -> list[str]:
        """Validate a hook selection (None: all) and a gradient request."""
        if with_grads and not self.with_grads:
            raise CacheError(
                f"activation cache {self.path} holds no gradients; rebuild it with gradients for g-SAE training"
            )
        hooks = self.hooks if hooks is None else list(hooks)
        unknown = [h for h in hooks if h not in self.hooks]
        if unknown or not hooks:
            raise CacheError(f"activation cache {self.path} holds hooks {self.hooks}; cannot read {unknown or hooks}")
        return hooks

    def _map(self, name: str, n_rows: int, width: int, dtype: torch.dtype) -> np.ndarray:
        """File `name` memory-mapped (lazily, copy-on-write, no open file kept) as [n_rows, width] elements of
        `dtype`, seen through numpy as the integers of the same size (`_raw`; numpy's per-call cost is a fraction of
        torch's, and a shuffled read makes one call per shard it touches).

        The maps form an LRU of `max_open_maps` entries: one beyond it closes the least recently used (its memory is
        unmapped once no array refers to it; every read copies out of the maps, so none outlives the read).
        """
        with self._maps_lock:
            mapped = self._maps.get(name)
            if mapped is not None:
                self._maps.move_to_end(name)
                return mapped
            while len(self._maps) >= self.max_open_maps:  # close first, so the cap holds at every moment
                self._maps.popitem(last=False)
            try:
                flat = torch.from_file(os.path.join(self._root, name), shared=False, size=n_rows * width, dtype=dtype)
            except RuntimeError as e:
                if "Cannot allocate memory" not in str(e):
                    raise
                raise CacheError(
                    f"cannot memory-map {self.path / name}: the process is out of memory maps (Linux allows "
                    f"vm.max_map_count per process; this cache holds up to max_open_maps={self.max_open_maps}, each "
                    "open ActivationCache as many); open fewer caches at once, pass a lower max_open_maps, "
                    "or raise vm.max_map_count (sysctl)"
                ) from None
            self._maps[name] = mapped = _raw(flat.view(n_rows, width))
            return mapped

    def _arrays(self, shard: dict[str, Any], hooks: list[str], with_grads: bool) -> dict[str, torch.Tensor]:
        """The mapped arrays of one shard, keyed like `_empty`'s buffers."""
        return {
            key: torch.from_numpy(
                self._map(shard[field] if i < 0 else shard[field][i], shard["n_rows"], width, dtype)
            ).view(dtype)
            for key, field, i, width, dtype in self._files(hooks, with_grads)
        }

    def _empty(self, n: int, hooks: list[str], with_grads: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {"meta": torch.empty(n, len(META_FIELDS), dtype=torch.int64)}
        for hook in hooks:
            out[f"acts/{hook}"] = torch.empty(n, self.d_in, dtype=dtype)
            if with_grads:
                out[f"grads/{hook}"] = torch.empty(n, self.d_in, dtype=dtype)
        return out

    @staticmethod
    def _rows(out: dict[str, torch.Tensor], hooks: list[str], with_grads: bool) -> ActivationRows:
        return ActivationRows(
            acts={h: out[f"acts/{h}"] for h in hooks},
            grads={h: out[f"grads/{h}"] for h in hooks} if with_grads else None,
            **dict(zip(META_FIELDS, out["meta"].t().contiguous())),
        )

    def _gather_sorted(
        self,
        split: str,
        index: np.ndarray,
        hooks: list[str],
        with_grads: bool,
        staged: dict[str, torch.Tensor],
        backwards: bool = False,
    ) -> torch.Tensor:
        """Gather the rows at global `index` of `split` into the first len(index) rows of `staged` (`_empty`'s
        buffers in the cache dtype) in sorted order: one index op per shard and file, each shard visited once (last
        first if `backwards`). Returns where each of `index`'s rows sits there: `_pick(staged, where[i:j])` gives
        `index[i:j]`'s rows in `index` order."""
        order = np.argsort(index)  # numpy: no thread pool to stall on a busy machine; the ids are distinct
        ordered = index[order].astype(np.int64)
        starts = self._starts_np[split]
        bounds = np.searchsorted(ordered, starts)  # shard s holds ordered[bounds[s]:bounds[s + 1]]
        counts = np.diff(bounds)
        local = ordered - np.repeat(starts[:-1], counts)  # row within its shard, for every row at once
        touched = np.flatnonzero(counts).tolist()
        files = [
            (_raw(staged[key]), field, i, width, dtype)
            for key, field, i, width, dtype in self._files(hooks, with_grads)
        ]
        shards, lows = self._shards[split], bounds.tolist()
        for shard_id in reversed(touched) if backwards else touched:
            shard, lo, hi = shards[shard_id], lows[shard_id], lows[shard_id + 1]
            rows = local[lo:hi]
            for out, field, i, width, dtype in files:
                src = self._map(shard[field] if i < 0 else shard[field][i], shard["n_rows"], width, dtype)
                src.take(rows, axis=0, out=out[lo:hi], mode="clip")  # clip: unbuffered; the rows are in range
            del src  # the last map of the shard: an evicted one must not stay mapped through the next shard
        where = np.empty_like(order)
        where[order] = np.arange(len(order))
        return torch.from_numpy(where)

    def _files(self, hooks: list[str], with_grads: bool) -> list[tuple[str, str, int, int, torch.dtype]]:
        """(staged key, shard field, index in it or -1, width, dtype) of each file a read of `hooks` maps."""
        files = [("meta", "meta", -1, len(META_FIELDS), torch.int64)]
        for hook in hooks:
            i = self.hooks.index(hook)
            files.append((f"acts/{hook}", "acts", i, self.d_in, self._dtype))
            if with_grads:
                files.append((f"grads/{hook}", "grads", i, self.d_in, self._dtype))
        return files

    def _pick(
        self,
        staged: dict[str, torch.Tensor],
        where: torch.Tensor,
        hooks: list[str],
        with_grads: bool,
        dtype: torch.dtype | None,
    ) -> ActivationRows:
        """The staged rows at `where`, as their own tensors, activations and gradients in `dtype` (None: the cache's)."""
        out = {name: buf.index_select(0, where) for name, buf in staged.items()}
        if dtype is not None:
            out = {name: t if name == "meta" else t.to(dtype) for name, t in out.items()}
        return self._rows(out, hooks, with_grads)
