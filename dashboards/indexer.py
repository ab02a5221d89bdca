"""`sae-kit index`: one pass over held-out tokens, then every feature's artifacts in sharded parquet (see `store`).

The pass runs in chunks of contexts; each finished chunk's codes are saved under index/.work/, and each finished
shard is a complete file, so a killed run resumes where it stopped (same settings, same SAE weights). The index
describes the SAE by a SHA-256 of its files, so the browser can tell when the SAE changed since indexing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import tyro
from safetensors.torch import load_file
from tqdm.auto import tqdm

from sae_kit import rundir
from sae_kit.atomic import save_tensors, write_json
from sae_kit.dashboards import artifacts
from sae_kit.dashboards.store import SCHEMA, SUMMARY_SCHEMA, VERSION, FeatureIndexError, shard_name, write_table
from sae_kit.heldout import (
    HeldoutContexts,
    check_pair,
    encode_positions,
    fold_input_scale,
    harvest_config_for,
    heldout_contexts,
    logit_lens,
)
from sae_kit.sae import SAE
from sae_kit.sae_io import load_sae, sae_digest


@dataclass
class IndexConfig:
    """Precompute every feature's artifacts for the browser: statistics, histograms, contexts, logits, neighbours."""

    sae: tyro.conf.Positional[Path]
    """An SAE directory, a run directory (its sae/) or a sweep run directory (every member is indexed)."""
    tokens: int = 100_000
    """Held-out token positions to read (fewer if the held-out split holds fewer)."""
    out: Path | None = None
    """Index directory (None: <run dir>/index beside sae/; only for a single SAE)."""
    top: int = 20
    """Top-activating contexts kept per feature (and per sign, for signed rules), at most one per context."""
    bands: int = 5
    """Activation-quantile bands that contexts are sampled from."""
    per_band: int = 4
    """Contexts sampled per quantile band."""
    before: int = 16
    """Tokens shown before the activating token."""
    after: int = 6
    """Tokens shown after the activating token."""
    bins: int = 40
    """Histogram bins over each feature's nonzero activations."""
    logits: int = 10
    """Promoted and suppressed tokens kept per feature (d_i·W_U)."""
    neighbours: int = 10
    """Nearest decoder directions (cosine) kept per feature."""
    cofire: int = 10
    """Most co-firing features (Jaccard index of firing positions) kept per feature."""
    shard_size: int = 1024
    """Features per shard file."""
    row_group: int = 16
    """Features per parquet row group: the unit the browser reads for one feature."""
    chunk_contexts: int = 64
    """Contexts per pass chunk: the unit of resume."""
    corpus: str | None = None
    """Corpus (None: the SAE's training corpus, whose held-out documents are read)."""
    context_size: int | None = None
    """Context length (None: the SAE's training context length)."""
    lm_batch_size: int = 16
    """Contexts per LM forward pass."""
    seed: int = 0
    """Seed of the quantile-band samples."""
    force: bool = False
    """Rebuild from scratch, discarding an existing or unfinished index."""
    progress: bool = True
    """Show progress bars."""
    device: str | None = None
    """Torch device for the LM and SAE (None: cuda if available, else cpu)."""

    def settings(self) -> dict[str, Any]:
        """What the index's content depends on (a resumed run must match it)."""
        skip = {"sae", "out", "force", "progress", "device", "lm_batch_size"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


def build_index(cfg: IndexConfig, model=None) -> list[dict[str, Any]]:
    """Index every SAE `cfg.sae` stands for; returns each index.json."""
    from sae_kit.models import load_model

    for name, value in (
        ("tokens", cfg.tokens),
        ("top", cfg.top),
        ("bands", cfg.bands),
        ("bins", cfg.bins),
        ("shard_size", cfg.shard_size),
        ("row_group", cfg.row_group),
        ("chunk_contexts", cfg.chunk_contexts),
    ):
        if value < 1:
            raise FeatureIndexError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if cfg.shard_size % cfg.row_group:
        raise FeatureIndexError(f"--shard-size ({cfg.shard_size}) must be a multiple of --row-group ({cfg.row_group})")
    found = rundir.resolve((cfg.sae,))
    if cfg.out is not None and len(found) > 1:
        raise FeatureIndexError(
            f"{cfg.sae} holds {len(found)} SAEs; drop --out (each member is indexed into <member>/index)"
        )
    results: list[dict[str, Any]] = []
    models: dict[str | None, Any] = {}
    for loc in found:
        sae = load_sae(loc.sae_dir, device=cfg.device)
        model_name = sae.cfg.metadata.get("model_name")
        if model_name not in models:
            models[model_name] = model or load_model(model_name, device=cfg.device)
        results.append(index_sae(sae, loc.sae_dir, models[model_name], cfg, cfg.out or loc.index_dir))
    return results


def index_sae(sae: SAE, sae_dir: Path, model, cfg: IndexConfig, out: Path) -> dict[str, Any]:
    """Build (or resume, or confirm up to date) the index of one SAE in `out`."""
    hcfg = harvest_config_for(sae, corpus=cfg.corpus, context_size=cfg.context_size, lm_batch_size=cfg.lm_batch_size)
    hook = hcfg.hook[0]
    check_pair(model, sae, hook)
    meta: dict[str, Any] = {
        "schema": SCHEMA,
        "version": VERSION,
        "complete": False,
        "settings": cfg.settings(),
        "sae": {
            "dir": str(sae_dir.resolve()),
            "sha256": sae_digest(sae_dir),
            "architecture": sae.cfg.architecture,
            "d_sae": sae.cfg.d_sae,
            "d_in": sae.cfg.d_in,
            "hook": hook,
            "model": sae.cfg.metadata.get("model_name"),
            "k": sae.cfg.k if sae.cfg.rule.uses_k else None,
        },
        "corpus": hcfg.corpus,
        "shard_size": cfg.shard_size,
        "row_group": cfg.row_group,
    }
    if _reuse(out, meta, cfg.force) == "done":
        return json.loads((out / "index.json").read_text())
    meta["sae"]["input_scale"] = fold_input_scale(model, sae.eval(), hcfg)  # SAEs that expect normalised inputs
    write_json(out / "index.json", meta)
    start = time.perf_counter()
    p = _pass(sae, model, hcfg, cfg, out / ".work")
    pass_seconds = time.perf_counter() - start
    _write_vocab(model, out)
    meta["sae"]["signed"] = bool((p.value < 0).any())  # from the codes: AbsTopK, and MP-SAE with mp_signed
    start = time.perf_counter()
    _write_features(p, sae, model, cfg, out, meta["sae"]["signed"])
    feature_seconds = time.perf_counter() - start
    R, T = p.tokens.shape
    meta |= {
        "complete": True,
        "tokens": p.n_read,
        "contexts": R,
        "context_size": T,
        "shards": [
            shard_name(a, min(a + cfg.shard_size, sae.cfg.d_sae)) for a in range(0, sae.cfg.d_sae, cfg.shard_size)
        ],
        "seconds": {"pass": round(pass_seconds, 2), "features": round(feature_seconds, 2)},
        "throughput": {
            "tokens_per_s": round(p.n_read / max(pass_seconds, 1e-9)),
            "features_per_s": round(sae.cfg.d_sae / max(feature_seconds, 1e-9)),
        },
        "short": p.n_read < cfg.tokens,
    }
    write_json(out / "index.json", meta)
    shutil.rmtree(out / ".work", ignore_errors=True)
    return meta


def _reuse(out: Path, meta: dict[str, Any], force: bool) -> str:
    """'done' when `out` already holds this index, 'resume'/'new' otherwise; a one-line error when it holds another."""
    file = out / "index.json"
    if (
        out.exists() and any(out.iterdir()) and not file.is_file()
    ):  # never delete, or write into, a folder that is not ours
        raise FeatureIndexError(f"{out} exists and is not a feature index; pass another --out or remove it")
    if force and out.exists():
        shutil.rmtree(out)
    if not file.is_file():
        return "new"
    try:
        old = json.loads(file.read_text())
    except ValueError:
        raise FeatureIndexError(f"{file} is damaged; rebuild with --force") from None
    if _identity(old) == _identity(meta):
        return "done" if old.get("complete") else "resume"
    what = (
        "the SAE changed since it was indexed"
        if _identity(old)[1] != _identity(meta)[1]
        else "it was built with other settings"
    )
    raise FeatureIndexError(f"{out} holds an index, but {what}; rebuild it with --force")


def _identity(meta: dict[str, Any]) -> tuple:
    """What an index's content depends on (not where its run directory lives now)."""
    return (
        meta.get("settings"),
        meta.get("sae", {}).get("sha256"),
        meta.get("corpus"),
        meta.get("shard_size"),
        meta.get("row_group"),
    )


def _pass(sae: SAE, model, hcfg, cfg: IndexConfig, work: Path) -> artifacts.Pass:
    """The nonzero codes over the held-out contexts, chunk by chunk, reusing the chunks a killed run finished."""
    ctx_file = work / "contexts.safetensors"
    if ctx_file.is_file():
        saved = load_file(str(ctx_file))
        ctxs = HeldoutContexts(saved["tokens"], saved["keep"], saved["pad"])
    else:
        ctxs = heldout_contexts(model, hcfg, cfg.tokens)
        save_tensors(ctx_file, {"tokens": ctxs.tokens, "keep": ctxs.keep, "pad": ctxs.pad})
    R, T = ctxs.tokens.shape
    parts = []
    bar = tqdm(total=ctxs.n_kept, unit="tok", desc="index: pass", disable=not cfg.progress)
    for c, a in enumerate(range(0, R, cfg.chunk_contexts)):
        chunk = ctxs.rows(a, a + cfg.chunk_contexts)
        file = work / f"pass-{c:05d}.safetensors"
        try:
            part = load_file(str(file)) if file.is_file() else None
        except Exception:  # a chunk file is written atomically, so this is damage from outside: recompute it
            part = None
        if part is None:
            part = encode_positions(sae, model, hcfg, chunk, offset=a * T)
            save_tensors(file, part)
        parts.append(part)
        bar.update(chunk.n_kept)
    bar.close()
    cat = {k: torch.cat([part[k] for part in parts]) for k in ("feature", "position", "value")}
    return artifacts.Pass.from_entries(
        ctxs.tokens, ~ctxs.pad, cat["feature"], cat["position"], cat["value"], ctxs.n_kept, sae.cfg.d_sae
    )


def _write_vocab(model, out: Path) -> None:
    write_json(out / "vocab.json", token_strings(model.tokenizer))


def token_strings(tokenizer) -> list[str]:
    """The display string of every token id. A byte-level BPE token holding part of a UTF-8 character shows its
    bytes (e.g. \\xe2\\x80) instead of a bare replacement character."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    out = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        raw = tokenizer.convert_ids_to_tokens(i)
        if "\ufffd" in text and isinstance(raw, str) and all(c in byte_of for c in raw):
            text = bytes(byte_of[c] for c in raw).decode("utf-8", errors="backslashreplace")
        out.append(text)
    return out


def _write_features(p: artifacts.Pass, sae: SAE, model, cfg: IndexConfig, out: Path, signed: bool) -> None:
    st = artifacts.stats(p)
    hist = artifacts.histograms(p, st, cfg.bins)
    picks = artifacts.Picks.choose(p, cfg, signed)
    W_dec = sae.W_dec.detach().float()  # on the SAE's device, read in blocks (fp32 SAE: no copy; else one, once)
    cofiring = artifacts.CoFiring(p, device=W_dec.device)
    d_sae = sae.cfg.d_sae
    logit_ids = []  # the summary's copy of each shard's promoted tokens
    bar = tqdm(total=d_sae, unit="feat", desc="index: features", disable=not cfg.progress)
    for a in range(0, d_sae, cfg.shard_size):
        b = min(a + cfg.shard_size, d_sae)
        file = out / shard_name(a, b)
        if _complete(file, b - a):
            logit_ids.append(pq.read_table(file, columns=["logit_pos_ids"])["logit_pos_ids"].combine_chunks())
        else:
            table = artifacts.shard_table(
                p, st, hist, picks, cofiring, W_dec, lambda d: logit_lens(model, d), cfg, a, b
            )
            write_table(file, table, row_group=cfg.row_group)
            logit_ids.append(table["logit_pos_ids"].combine_chunks())
        bar.update(b - a)
    bar.close()
    summary = pa.table(
        {
            "feature": pa.array(range(d_sae), pa.int32()),
            "count": st.count.numpy(),
            "density": (st.count / max(p.n_read, 1)).double().numpy(),
            "max_act": st.max_act.numpy(),
            "min_act": st.min_act.numpy(),
            "mean_act": st.mean_abs.numpy(),
            "top_token_ids": pa.array(picks.peak_tokens(p), pa.list_(pa.int32())),
            "logit_pos_ids": pa.concat_arrays(logit_ids),
        },
        schema=SUMMARY_SCHEMA,
    )
    write_table(out / "features.parquet", summary)


def _complete(file: Path, rows: int) -> bool:
    """Whether a shard from an earlier run is whole (written atomically, so present means finished, unless damaged)."""
    try:
        return file.is_file() and pq.ParquetFile(file).metadata.num_rows == rows
    except (OSError, pa.ArrowException):
        return False
