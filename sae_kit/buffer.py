"""`ShuffleBuffer`: mixes rows from many LM batches in memory before they reach a trainer.

Rows of one LM batch come from a handful of contexts and are strongly correlated; training on them in order hurts.
The buffer holds `capacity` rows in preallocated tensors (on the device the rows arrive on). Once full, each round
draws a random half of the slots, emits those rows in batches and refills exactly those slots from the source, so a
row stays for a geometric number of rounds and every batch mixes rows from across the buffer. At the end of the
source the remaining rows are emitted in random order. Every source row is emitted exactly once.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from sae_kit.rows import META_FIELDS, ActivationRows


class ShuffleBuffer:
    """Iterate to get shuffled `ActivationRows` batches of `batch_size` rows drawn from `source`.

    The last batch may be smaller unless `drop_last`. The order is fixed by `seed` (and the source's order).
    """

    def __init__(
        self,
        source: Iterable[ActivationRows],
        capacity: int,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if capacity < batch_size:
            raise ValueError(f"capacity ({capacity}) must be at least batch_size ({batch_size}); raise the buffer size")
        self.source = source
        self.capacity = capacity
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        # Rows emitted per round: about half the buffer, in whole batches.
        self._round = max(batch_size, capacity // 2 // batch_size * batch_size)

    def __iter__(self) -> Iterator[ActivationRows]:
        generator = torch.Generator().manual_seed(self.seed)
        store: ActivationRows | None = None
        free = torch.arange(self.capacity)  # slots waiting to be filled, in fill order
        for chunk in self.source:
            if store is None:
                store = self._allocate(chunk)
            self._check(chunk, store)
            taken = 0
            while taken < len(chunk):
                k = min(len(free), len(chunk) - taken)
                self._put(store, free[:k], chunk.select(slice(taken, taken + k)))
                free, taken = free[k:], taken + k
                if len(free) == 0:
                    free = torch.randperm(self.capacity, generator=generator)[: self._round]
                    for slots in free.split(self.batch_size):
                        yield self._take(store, slots)
        if store is None:
            return
        held = torch.ones(self.capacity, dtype=torch.bool)
        held[free] = False
        rest = held.nonzero().squeeze(1)
        rest = rest[torch.randperm(len(rest), generator=generator)]
        for slots in rest.split(self.batch_size):
            if len(slots) == self.batch_size or not self.drop_last:
                yield self._take(store, slots)

    def _allocate(self, chunk: ActivationRows) -> ActivationRows:
        """Empty storage shaped like `chunk`'s rows, `capacity` rows long, on `chunk`'s devices."""

        def like(t: torch.Tensor) -> torch.Tensor:
            return torch.empty((self.capacity, *t.shape[1:]), dtype=t.dtype, device=t.device)

        return ActivationRows(
            acts={h: like(a) for h, a in chunk.acts.items()},
            grads=None if chunk.grads is None else {h: like(g) for h, g in chunk.grads.items()},
            **{name: like(t) for name, t in chunk.meta().items()},
        )

    @staticmethod
    def _check(chunk: ActivationRows, store: ActivationRows) -> None:
        """Every chunk must carry the same hooks, widths and gradient presence as the first."""
        same = chunk.acts.keys() == store.acts.keys() and all(chunk.acts[h].shape[1:] == a.shape[1:] for h, a in store.acts.items())
        same = same and (chunk.grads is None) == (store.grads is None)
        if not same:
            raise ValueError(
                f"ShuffleBuffer source changed shape: got hooks {chunk.hooks} (gradients: {chunk.grads is not None}), "
                f"first chunk had {store.hooks} (gradients: {store.grads is not None})"
            )

    @staticmethod
    def _fields(rows: ActivationRows) -> dict[str, torch.Tensor]:
        fields = {f"acts/{h}": a for h, a in rows.acts.items()} | rows.meta()
        if rows.grads is not None:
            fields |= {f"grads/{h}": g for h, g in rows.grads.items()}
        return fields

    def _put(self, store: ActivationRows, slots: torch.Tensor, rows: ActivationRows) -> None:
        incoming = self._fields(rows)
        for name, dst in self._fields(store).items():
            dst.index_copy_(0, slots.to(dst.device), incoming[name].to(dst.device, dst.dtype))

    @staticmethod
    def _take(store: ActivationRows, slots: torch.Tensor) -> ActivationRows:
        def take(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, slots.to(t.device))

        return ActivationRows(
            acts={h: take(a) for h, a in store.acts.items()},
            grads=None if store.grads is None else {h: take(g) for h, g in store.grads.items()},
            **{name: take(getattr(store, name)) for name in META_FIELDS},
        )
