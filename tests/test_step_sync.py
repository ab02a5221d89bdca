"""No host synchronisation in a training step (design.md, Scale): counted on the CPU with a torch-function mode.

On a GPU every read of a device value on the host (`.item()`, `float(t)`, `bool(t)`, `nonzero`, a boolean mask, an
op whose output size depends on the data such as `bincount`) makes the host wait until the device has finished all
queued work, so the step pipeline drains. CUDA's `torch.cuda.set_sync_debug_mode` catches these on a GPU; here a
`TorchFunctionMode` sees every such call a step makes on CPU tensors, which are the same calls. Adam's own `.item()`
on its step counter is left out: that counter lives on the host for the default (non-capturable) Adam.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sae_kit.sae import SAE, SAEConfig
from sae_kit.sparsifiers import REGISTRY, canonical_name
from sae_kit.training import TrainConfig, Trainer
from sae_kit.training.trainer import StepMetrics

READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "nonzero", "argwhere", "cpu", "numpy"}
DATA_SIZED = {"masked_select", "unique", "unique_consecutive", "bincount", "repeat_interleave"}

RULES_THAT_SYNC = {
    "feature_choice": "its capacity allocation (how many tokens each latent may take) is sized on the host",
}
"""Rules whose maths needs a host read every step (the issue allows it "where a rule needs it"), and why."""


class SyncCounter(TorchFunctionMode):
    """Records (function name, where in sae-kit) for every call that synchronises the host with the device."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        sync = name in READS or name in DATA_SIZED
        if name == "repeat_interleave" and kwargs.get("output_size") is not None:
            sync = False
        if name == "__getitem__" and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            sync = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if sync:
            stack = traceback.extract_stack()
            if not any("torch/optim" in f.filename for f in stack):
                ours = [f for f in stack if "sae_kit" in f.filename or "/training/" in f.filename]
                where = f"{ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno}" if ours else "?"
                self.syncs.append((name, where))
        return func(*args, **kwargs)


def _trainer(arch: str, **train) -> Trainer:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(architecture=arch, d_in=16, d_sae=64, k=4))
    cfg = TrainConfig(batch_size=256, tokens=256 * 40, lr=1e-3, dead_tokens=512, **train)
    return Trainer(sae, cfg)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(256, 16, generator=g), torch.randn(256, 16, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("arch", sorted({canonical_name(a) for a in REGISTRY}))
def test_a_step_does_not_synchronise_the_host(arch):
    """Between syncs (every sync_every steps) a step reads nothing back, with the aux loss active on dead latents."""
    t = _trainer(arch, sync_every=1000)
    batches = _batches(8)
    for x, g in batches[:3]:  # the first step initialises from its batch (host reads, once)
        t.step(x, g)
    t.tokens_since_fired[:8] = 10**9  # some dead latents: AuxK runs (for the rules that use it)
    t.sync()
    counter = SyncCounter()
    with counter:
        metrics = [t.step(x, g) for x, g in batches[3:]]
    if arch in RULES_THAT_SYNC:
        assert counter.syncs, f"{arch} no longer syncs: drop it from RULES_THAT_SYNC"
    else:
        assert counter.syncs == [], f"{arch} synchronises the host per step at {sorted(set(counter.syncs))}"
    assert all(isinstance(m, StepMetrics) for m in metrics)
    if t.aux != "none":
        assert metrics[-1]["aux"] > 0  # the aux loss really ran on the dead latents in the counted steps


def test_metrics_are_read_in_one_transfer_when_looked_at():
    t = _trainer("topk", sync_every=1000)
    (x, g), (x2, g2) = _batches(2)
    t.step(x, g)
    m = t.step(x2, g2)
    counter = SyncCounter()
    with counter:
        row = dict(m)
    assert [name for name, _ in counter.syncs] == ["tolist"]  # every device metric in one read
    assert row["step"] == 2 and 0 < row["fvu"] < 2 and row["l0"] == pytest.approx(4)


def test_the_sync_step_reads_the_device_state():
    """Every sync_every-th step is where the host reads: the non-finite flag and the aux candidates."""
    t = _trainer("topk", sync_every=4)
    batches = _batches(4)
    for x, g in batches[:3]:
        t.step(x, g)
    counter = SyncCounter()
    with counter:
        t.step(*batches[3])  # the 4th step syncs
    assert ("__int__", "trainer.py") in {(n, w.split(":")[0]) for n, w in counter.syncs}
