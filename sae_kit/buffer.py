"""`ShuffleBuffer`: shuffled training batches from a positioned row source, resumable at any batch.

Rows of one LM batch come from a handful of contexts and are strongly correlated; training on them in order hurts.
The buffer fills a chunk of at least `capacity` rows from the source (after the rows carried over from the previous
chunk), permutes it with a generator seeded by (seed, chunk index), emits its whole batches and carries the rest
(fewer than one batch) into the next chunk. Every source row is emitted exactly once, in an order fixed by the seed.

Rows are stored in the dtype they arrive in (a bf16 harvest stays bf16: half the memory of fp32), or in an explicit
`dtype`; the consumer converts a batch to what it computes in. The chunk is held once: each batch is gathered from
it through the permutation, rather than the whole chunk being permuted into a second copy.

Where it stands is a `BufferPosition`: the source position where the current chunk's fresh rows begin, the rows
carried into it, the chunk index and the batches already emitted. Starting from a position rebuilds that chunk from
the source and goes on with the next batch, so a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sae_kit.rows import ActivationRows

Source = Callable[[Any], Iterable[tuple[ActivationRows, Any]]]
"""open(position) -> iterable of (rows, position after those rows); position None is the start. Positions are JSON values."""


@dataclass
class BufferPosition:
    """Where a `ShuffleBuffer` stands, between two batches."""

    source: Any = None
    """Source position where the current chunk's fresh rows begin (None: the source's start)."""
    carry: ActivationRows | None = None
    """Rows carried into the current chunk from the previous one."""
    chunk: int = 0
    """Index of the current chunk (it seeds the chunk's permutation)."""
    batch: int = 0
    """Batches of the current chunk already emitted."""

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON part, tensors part) for a checkpoint."""
        tensors = {} if self.carry is None else {f"carry/{k}": v for k, v in self.carry.tensors().items()}
        return {"source": self.source, "chunk": self.chunk, "batch": self.batch}, tensors

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> BufferPosition:
        carry = {k.removeprefix("carry/"): v for k, v in tensors.items() if k.startswith("carry/")}
        return cls(meta["source"], ActivationRows.from_tensors(carry) if carry else None, meta["chunk"], meta["batch"])


class ShuffleBuffer:
    """Iterate `batches(position)` for (batch, position after it); plain iteration yields the batches from the start.

    At the end of a finite source the carried rows form a last, smaller batch unless `drop_last`. `dtype` (None:
    the dtype the rows arrive in) is the dtype activations and gradients are stored and handed out in.
    """

    def __init__(
        self,
        source: Source,
        capacity: int,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if capacity < batch_size:
            raise ValueError(f"capacity ({capacity}) must be at least batch_size ({batch_size}); raise the buffer size")
        self.source, self.capacity, self.batch_size, self.seed, self.drop_last = (
            source,
            capacity,
            batch_size,
            seed,
            drop_last,
        )
        self.dtype = dtype

    def __iter__(self) -> Iterator[ActivationRows]:
        return (batch for batch, _ in self.batches())

    def permutation(self, n: int, chunk: int) -> torch.Tensor:
        """The order of chunk `chunk`'s n rows."""
        seed = int(np.random.SeedSequence([self.seed, chunk]).generate_state(1, np.uint64)[0] >> 1)
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def batches(self, position: BufferPosition | None = None) -> Iterator[tuple[ActivationRows, BufferPosition]]:
        pos = position or BufferPosition()
        fresh = iter(self.source(pos.source))
        at, carry, chunk, skip = pos.source, pos.carry, pos.chunk, pos.batch
        exhausted = False
        while not exhausted:
            begin, begin_carry = at, carry
            parts = [] if carry is None else [self._stored(carry)]
            n = sum(len(p) for p in parts)
            while n < self.capacity:
                try:
                    got, at = next(fresh)
                except StopIteration:
                    exhausted = True
                    break
                parts.append(self._stored(got))
                _check_layout(parts[-1], parts[0])
                n += len(parts[-1])
            if n == 0:
                return
            chunk_rows = _cat_releasing(parts)  # the chunk is held once, in chunk_rows
            order = self.permutation(n, chunk)
            whole = n // self.batch_size * self.batch_size
            carry = chunk_rows.select(order[whole:]) if whole < n else None
            n_batches = whole // self.batch_size
            if exhausted and carry is not None and not self.drop_last:
                n_batches, carry = n_batches + 1, None
            for j in range(skip, n_batches):
                batch = chunk_rows.select(order[j * self.batch_size : (j + 1) * self.batch_size])
                yield batch, BufferPosition(begin, begin_carry, chunk, j + 1)
            del chunk_rows
            chunk, skip = chunk + 1, 0

    def _stored(self, rows: ActivationRows) -> ActivationRows:
        """`rows` in the storage dtype (unchanged, not copied, when it is theirs already)."""
        if self.dtype is None or all(a.dtype == self.dtype for a in rows.tensors().values() if a.is_floating_point()):
            return rows
        return rows.to(dtype=self.dtype)


def _cat_releasing(parts: list[ActivationRows]) -> ActivationRows:
    """`ActivationRows.cat(parts)` that empties `parts` as it goes, each part released once copied. The chunk's
    pages are only touched as they are written, so the peak stays near one chunk rather than the parts plus it."""
    fields = {name: (t.shape[1:], t.dtype) for name, t in parts[0].tensors().items()}
    n = sum(len(p) for p in parts)
    out = {name: torch.empty((n, *shape), dtype=dtype) for name, (shape, dtype) in fields.items()}
    at = 0
    while parts:
        part = parts.pop(0)
        for name, t in part.tensors().items():
            out[name][at : at + len(part)] = t
        at += len(part)
        del part
    return ActivationRows.from_tensors(out)


def _check_layout(rows: ActivationRows, first: ActivationRows) -> None:
    """Every part of a chunk must carry the same hooks, widths, dtypes and gradient presence."""
    same = rows.acts.keys() == first.acts.keys() and all(
        rows.acts[h].shape[1:] == a.shape[1:] for h, a in first.acts.items()
    )
    if not same or (rows.grads is None) != (first.grads is None):
        raise ValueError(
            f"ShuffleBuffer source changed shape: got hooks {rows.hooks} (gradients: {rows.grads is not None}), "
            f"earlier rows had {first.hooks} (gradients: {first.grads is not None})"
        )
    dtypes = {t.dtype for t in rows.tensors().values() if t.is_floating_point()}
    before = {t.dtype for t in first.tensors().values() if t.is_floating_point()}
    if dtypes != before:
        raise ValueError(
            f"ShuffleBuffer source changed dtype: got {sorted(map(str, dtypes))}, earlier rows had "
            f"{sorted(map(str, before))}; pass dtype= to store every row in one dtype"
        )
