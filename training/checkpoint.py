"""Training checkpoints: everything a run needs to continue bit for bit, as safetensors + JSON (never pickles).

`<run>/checkpoints/step-<n>/` holds `checkpoint.json` (step, tokens, the data position, every member's counters, the
Python RNG state and the SHA-256 of every tensor file), `data.safetensors` (the tensors of the data position and the
torch/numpy RNG states) and one `<member>.safetensors` per SAE (weights, Adam moments, dead-latent counters). The
directory is built under a temporary name and renamed into place, so a kill leaves the previous checkpoints intact;
a damaged one (truncated file, wrong hash, bad JSON) is reported and the next older one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from sae_kit.atomic import atomic_dir, save_tensors, write_json
from sae_kit.errors import SaeKitError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "checkpoint.json"
DATA_FILE = "data.safetensors"


class CheckpointError(SaeKitError):
    """A checkpoint directory is missing a file, or a file in it is damaged."""


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint."""

    path: Path
    step: int
    tokens: int
    data: tuple[dict[str, Any], dict[str, torch.Tensor]]
    """The data source's position after `step` batches (JSON part, tensors part)."""
    members: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]
    """Each member's trainer state (tensors, JSON part), by member name."""
    rng: tuple[dict[str, Any], dict[str, torch.Tensor]]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The torch (CPU and CUDA), numpy and Python RNG states."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]  # the legacy tuple
    tensors = {"rng/torch": torch.get_rng_state(), "rng/numpy": torch.from_numpy(np.asarray(keys).astype(np.int64))}
    if torch.cuda.is_available():
        tensors |= {f"rng/cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return {"python": random.getstate(), "numpy": [name, int(pos), int(has_gauss), float(gauss)]}, tensors


def set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Restore what `rng_state` returned."""
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: Path, step: int, tokens: int, data: tuple[dict, dict], members: dict[str, tuple[dict, dict]], keep: int = 2
) -> Path:
    """Write step `step`'s checkpoint atomically, then delete all but the newest `keep`."""
    target = checkpoint_dir(run_dir) / f"step-{step:09d}"
    rng_meta, rng_tensors = rng_state()
    with atomic_dir(target) as tmp:
        save_tensors(tmp / DATA_FILE, {f"data/{k}": v for k, v in data[1].items()} | rng_tensors)
        for name, (tensors, _) in members.items():
            save_tensors(tmp / f"{name}.safetensors", tensors)
        files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.glob("*.safetensors"))}
        write_json(
            tmp / META_FILE,
            {
                "format_version": FORMAT_VERSION,
                "step": step,
                "tokens": tokens,
                "data": data[0],
                "members": {name: meta for name, (_, meta) in members.items()},
                "rng": rng_meta,
                "files": files,
            },
        )
    stale = sorted(checkpoint_dir(run_dir).glob("step-*"))[:-keep] + list(checkpoint_dir(run_dir).glob(".step-*.tmp"))
    for old in stale:  # older checkpoints, and temporaries left by a killed run
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint directory; CheckpointError says what is wrong with it."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {META_FILE} (an interrupted write?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / META_FILE} is not valid JSON ({err})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {meta.get('format_version')!r}; this sae-kit reads format {FORMAT_VERSION}"
        )
    tensors = {}
    for name, want in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file.stat().st_size != want["bytes"] or _sha256(file) != want["sha256"]:
            raise CheckpointError(f"{file} is damaged (size or SHA-256 differs from {META_FILE})")
        tensors[name] = load_file(str(file))
    data = tensors.pop(DATA_FILE)
    members = {name: (tensors[f"{name}.safetensors"], m) for name, m in meta["members"].items()}
    return Checkpoint(
        path,
        meta["step"],
        meta["tokens"],
        (meta["data"], {k.removeprefix("data/"): v for k, v in data.items() if k.startswith("data/")}),
        members,
        (meta["rng"], {k: v for k, v in data.items() if k.startswith("rng/")}),
    )


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies, warning about each damaged newer one; None when there is none."""
    damaged = False
    for path in sorted(checkpoint_dir(run_dir).glob("step-*"), reverse=True):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping a damaged checkpoint: %s", err)
            damaged = True
            continue
        if damaged:
            log.warning("resuming from the older checkpoint %s", path.name)
        return ckpt
    return None
