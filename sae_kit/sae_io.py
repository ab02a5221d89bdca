"""SAE directories: `save_sae` writes one (sae-kit's own format, or a peer's), `load_sae` reads any of them.

An sae-kit directory holds `sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
b_dec [d_in], plus the rule's own tensors such as `threshold`; MP-SAE has no W_enc/b_enc), `cfg.json` (SAELens-style
flat keys and a `metadata` dict) and, when densities are known, `sparsity.safetensors` (`sparsity`: log10 feature
density). Safetensors + JSON only, never pickles. This module sits above `sae_kit.sae` (the module) and
`sae_kit.formats` (the peer formats), so neither imports the other's I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from torch import Tensor

from sae_kit.atomic import atomic_dir, save_tensors, write_json
from sae_kit.formats import READERS, WRITERS, detect_format
from sae_kit.sae import (
    CFG_FILE,
    SAE,
    SPARSITY_FILE,
    WEIGHTS_FILE,
    SAEConfig,
    SAEFormatError,
    dtype_name,
    load_sparsity,
    read_tensors,
)

FORMATS = ("sae_kit", *WRITERS)
"""What `save_sae(format=...)` writes."""


def save_sae(sae: SAE, path: str | Path, sparsity: Tensor | None = None, format: str = "sae_kit") -> Path:
    """Write the SAE directory atomically (the whole directory is replaced, or left as it was on failure).

    `sparsity` (log10 feature density [d_sae]) is kept as `sae.sparsity`; sparsity.safetensors is written whenever
    `sae.sparsity` is set (sae_kit and saelens formats). `format`: "sae_kit" (this library's own, lossless),
    "saelens" (a directory SAELens >= 6 loads with `SAE.load_from_disk`; refused for rules without a SAELens
    equivalent) or "sparsify" (TopK only); `sae_kit.formats` says what each peer can represent exactly.
    """
    if format not in FORMATS:
        raise SAEFormatError(f"format={format!r}; use one of: {', '.join(FORMATS)}")
    if sparsity is not None:
        if tuple(sparsity.shape) != (sae.cfg.d_sae,):
            raise ValueError(
                f"sparsity has shape {tuple(sparsity.shape)}; pass log10 densities of shape ({sae.cfg.d_sae},)"
            )
        sae.sparsity = sparsity.detach().float().cpu()
    if format != "sae_kit":
        return WRITERS[format](sae, Path(path))
    cfg = replace(
        sae.cfg,
        dtype=dtype_name(sae.W_dec.dtype),
        device=portable_device(str(sae.W_dec.device)),
        metadata=dict(sae.cfg.metadata),
    )
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_tensors(tmp / WEIGHTS_FILE, sae.weights(), metadata={"format": "pt"})
        write_json(tmp / CFG_FILE, cfg.to_dict())
        if sae.sparsity is not None:
            save_tensors(tmp / SPARSITY_FILE, {"sparsity": sae.sparsity}, metadata={"format": "pt"})
    return path


def portable_device(device: str) -> str:
    """The device recorded in cfg.json: the accelerator type without an index ("cuda", not "cuda:3")."""
    return device.split(":")[0]


def load_sae(
    path: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    *,
    folder: str | None = None,
    revision: str | None = None,
) -> SAE:
    """Load an SAE in eval mode from a local directory or a Hugging Face hub repo: sae-kit's own format, SAELens's or
    sparsify's, detected from the files present.

    `path` is one of:
    - a local SAE directory (`folder=` then names a sub-directory of it, e.g. one hook of a sparsify run);
    - a hub repo id, `load_sae("owner/repo", folder="blocks.6.hook_resid_post")`: the SAE in that folder of the repo
      (SAELens-format repos: <folder>/cfg.json + sae_weights.safetensors; sparsify-format repos: <layer>/cfg.json +
      sae.safetensors; no folder: the repo root), at `revision` (a branch, tag or commit; default main);
    - `"hf://owner/repo/<folder>"`, or `"hf://owner/repo@<revision>/<folder>"`, the same in one string.
    A string that could be both resolves like this: an existing local path wins; else an exact `owner/name` is a hub
    repo; anything else is a local path (missing: FileNotFoundError). A `Path` object is always local.

    Hub SAEs come through huggingface_hub and its cache (HF_HUB_CACHE / HF_HOME): only the folder's cfg.json and
    safetensors files are downloaded (never a pickle), later loads read the cache, and with HF_HUB_OFFLINE=1 the cache
    alone. The source is recorded in `sae.cfg.metadata["hub"]`: {repo_id, folder, revision, commit, uri}, where `uri`
    (hf://repo@commit/folder) reloads exactly this SAE. Hub failures (offline and not cached, no such repo, revision or
    folder, gated, 401/403) raise one `sae_kit.hub.HubError` line naming the fix.

    Safetensors + JSON only, never pickles. `device`/`dtype` override cfg.json (peer formats load on the CPU unless
    `device` is given, as their own loaders do); a cfg.json that names an accelerator this machine lacks loads on
    the CPU. A missing file raises FileNotFoundError; a damaged, inconsistent, non-finite or unsupported one raises
    SAEFormatError naming the file. `sae_kit.formats` says what each peer format maps to.
    """
    from sae_kit.hub import fetch_sae, hub_hint, hub_location

    where = hub_location(path, folder=folder, revision=revision)
    if where is None:
        local = Path(path).expanduser() / (folder or "")
        if not local.exists() and isinstance(path, str) and (hint := hub_hint(path)):
            raise FileNotFoundError(f"{local} does not exist, so it is not an SAE directory; {hint}")
        return _load_dir(local, device, dtype)
    local, source = fetch_sae(where)
    sae = _load_dir(local, device, dtype)
    sae.cfg.metadata["hub"] = source
    return sae


def _load_dir(path: Path, device: str | None, dtype: str | None) -> SAE:
    """Load the local SAE directory `path` (any supported format)."""
    fmt, raw = detect_format(path)
    if fmt in READERS:
        return READERS[fmt](path, raw, device=device, dtype=dtype)
    raw |= {key: value for key, value in (("device", device), ("dtype", dtype)) if value is not None}
    if device is None:
        raw["device"] = available_device(str(raw.get("device", "cpu")))
    try:
        cfg = SAEConfig.from_dict(raw)
    except (ValueError, TypeError) as err:  # SaeKitError (the config's own checks) is a ValueError
        raise SAEFormatError(f"{path / CFG_FILE}: {err}") from None
    sae = SAE(cfg)
    sae.load_weights(read_tensors(path / WEIGHTS_FILE), source=str(path / WEIGHTS_FILE))
    return load_sparsity(sae, path).eval()


def available_device(device: str) -> str:
    """`device` if this machine has it, else "cpu" (an SAE trained on a GPU loads on a laptop), or "cuda" for a GPU
    index this machine lacks."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        return device  # SAEConfig names the fix
    if kind == "cuda" and not torch.cuda.is_available():
        return "cpu"
    if kind == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
        return "cuda"  # a cuda:3 from an 8-GPU node, on a machine with fewer GPUs
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return "cpu"
    return device


def sae_digest(sae_dir: Path) -> str:
    """SHA-256 over the SAE directory's files (config and weights)."""
    h = hashlib.sha256()
    for file in sorted(p for p in sae_dir.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors")):
        h.update(file.name.encode())
        with open(file, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()
