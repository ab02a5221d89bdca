"""`Prefetcher`: run an iterator in a background thread, `depth` items ahead of its consumer.

The LM harvest behind a training run is an iterator of batches; in a thread it fills the next chunk while the SAE
steps on the current one (torch releases the GIL inside its kernels). An exception in the thread is raised in the
consumer at the item where it happened; `close()` (or leaving a `with` block) sets the `stop` event and waits for the
thread, so a long-running producer should check that event between its units of work.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

import torch

T = TypeVar("T")
_END = object()


class Prefetcher(Generic[T]):
    """Iterate to get the items of `items`, produced by a daemon thread at most `depth` items ahead."""

    def __init__(self, items: Iterator[T], depth: int, stop: threading.Event | None = None) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = stop or threading.Event()
        self._threads = torch.get_num_threads()  # the producer's torch ops use as many threads as its creator's
        self._thread = threading.Thread(target=self._produce, args=(items,), name="sae-kit-prefetch", daemon=True)
        self._thread.start()

    def _produce(self, items: Iterator[T]) -> None:
        torch.set_num_threads(self._threads)
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as err:  # handed to the consumer, which re-raises it
            self._put(err)
            return
        self._put(_END)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the producer thread and wait for it."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
