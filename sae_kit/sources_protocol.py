"""`ActivationSource`: what a training run reads its batches from (an ActivationCache, or the model as it runs).

The trainer, the prefetch thread and the checkpoints only use the members below, so a new kind of data source
(another storage format, a remote cache, activations computed by another library) is one class with them;
`sae_kit.training.sources` holds the two built in (`CacheSource`, `ModelSource`). Annotate code that takes a
source with this type: `from sae_kit.sources_protocol import ActivationSource`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from sae_kit.rows import ActivationRows

Position = tuple[dict[str, Any], dict[str, torch.Tensor]]
"""Where a source stands between two batches, as (JSON part, tensors part): what a checkpoint stores to resume."""


@runtime_checkable
class ActivationSource(Protocol):
    """An endless, resumable stream of training batches at one hook, and the held-out rows to score the SAEs on."""

    d_in: int
    """Width of the activations (the SAE's d_in)."""
    hook: str
    """The hook name the batches come from (`batch.acts[hook]`)."""
    device: str
    """Torch device the SAEs train on for this source (where the model runs, or the --device of a cache run)."""
    prefetch_depth: int
    """Batches a background prefetch thread may hold ahead of the trainer (the memory it may use)."""

    def describe(self) -> str:
        """A few words naming the data for messages, e.g. `cache runs/l6` or `hook blocks.6.hook_resid_post of SmolLM2`."""

    def metadata(self) -> dict[str, Any]:
        """The data provenance every trained SAE records in cfg.json metadata (model, hook, corpus, tokenisation,
        position rules, holdout fraction): eval, the index and the app rebuild the SAE's held-out split from it."""

    def batches(
        self, position: Position | None = None, stop: threading.Event | None = None
    ) -> Iterator[tuple[ActivationRows, Position]]:
        """(batch, position after it) from `position` (None: the start) on, forever (epoch after epoch).

        Starting again from a yielded position gives exactly the batches that followed it, which is what makes a
        resumed run bit-identical. Stops soon after `stop` is set (the prefetch thread's shutdown).
        """

    def heldout(self) -> ActivationRows:
        """Rows from held-out documents (never in `batches`), with gradients when the run needs them."""
