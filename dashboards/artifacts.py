"""Per-feature artifacts from one pass of codes, computed for all features at once with sorts and scatters.

The pass is the list of nonzero code entries (feature, position, value) over held-out contexts, sorted by feature
then position. From it: density and activation statistics, histograms, the top contexts (at most one per context
row, so the windows differ), contexts sampled from activation-quantile bands, and co-firing counts. From the
weights: logit effects (`sae_kit.heldout.logit_lens`) and the nearest decoder neighbours by cosine.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from sae_kit.dashboards.store import CONTEXT, SHARD_SCHEMA

if TYPE_CHECKING:
    from sae_kit.dashboards.indexer import IndexConfig

MAX_CELLS = 1 << 24
"""Largest dense [features, features-or-vocab] block computed at once (64 MB in fp32)."""


@dataclass
class Pass:
    """The nonzero codes of one pass over held-out contexts."""

    tokens: Tensor
    """[R, T] token ids of the contexts."""
    valid: Tensor
    """[R, T] bool: real tokens (not padding)."""
    feature: Tensor
    """[n] int64 feature of each entry, ascending."""
    position: Tensor
    """[n] int64 flat position (row·T + t) of each entry, ascending within a feature."""
    value: Tensor
    """[n] fp32 activation of each entry (nonzero; negative only for signed rules)."""
    n_read: int
    """Positions the SAE read (the denominator of density)."""
    d_sae: int
    """Number of features."""

    @classmethod
    def from_entries(
        cls, tokens: Tensor, valid: Tensor, feature: Tensor, position: Tensor, value: Tensor, n_read: int, d_sae: int
    ) -> Pass:
        order = (feature * tokens.numel() + position).argsort()
        return cls(tokens, valid, feature[order], position[order], value[order], n_read, d_sae)

    @property
    def keys(self) -> Tensor:
        """feature·(R·T) + position of each entry: ascending, unique."""
        return self.feature * self.tokens.numel() + self.position

    def counts(self) -> Tensor:
        return torch.bincount(self.feature, minlength=self.d_sae)


@dataclass
class Stats:
    """Per-feature scalars [d_sae]."""

    count: Tensor
    max_act: Tensor
    """Largest activation (0 when it never fires positive)."""
    min_act: Tensor
    """Most negative activation (0 when it never fires negative)."""
    mean_abs: Tensor
    """Mean |activation| over the positions where it fires."""
    lo: Tensor
    """Smallest nonzero activation (the histogram's left edge)."""
    hi: Tensor
    """Largest nonzero activation (the histogram's right edge)."""


def stats(p: Pass) -> Stats:
    n = p.d_sae
    count, f, v = p.counts(), p.feature, p.value
    zeros = torch.zeros(n)
    lo = torch.full((n,), torch.inf).scatter_reduce(0, f, v, "amin")
    hi = torch.full((n,), -torch.inf).scatter_reduce(0, f, v, "amax")
    dead = count == 0
    return Stats(
        count,
        zeros.scatter_reduce(0, f, v, "amax"),
        zeros.scatter_reduce(0, f, v, "amin"),
        zeros.index_add(0, f, v.abs()) / count.clamp(min=1),
        lo.masked_fill(dead, 0),
        hi.masked_fill(dead, 0),
    )


def histograms(p: Pass, st: Stats, bins: int) -> Tensor:
    """[d_sae, bins] counts of each feature's nonzero activations over [lo, hi]."""
    lo, hi = st.lo[p.feature], st.hi[p.feature]
    b = ((p.value - lo) / (hi - lo).clamp(min=1e-12) * bins).long().clamp(0, bins - 1)
    return torch.bincount(p.feature * bins + b, minlength=p.d_sae * bins).view(p.d_sae, bins)


# ------------------------------------------------------------------------------------------------- picking contexts
def _rank_in_run(group: Tensor) -> Tensor:
    """The position of each element within its run of equal values of `group` (which is sorted)."""
    idx = torch.arange(len(group))
    new = torch.ones(len(group), dtype=torch.bool)
    new[1:] = group[1:] != group[:-1]
    return idx - torch.where(new, idx, 0).cummax(0).values


def _order(group: Tensor, score: Tensor) -> Tensor:
    """The permutation sorting by group ascending, then score descending (stable)."""
    o = torch.sort(score, descending=True, stable=True).indices
    return o[torch.sort(group[o], stable=True).indices]


def top_entries(p: Pass, n: int, sign: int = 1) -> Tensor:
    """Entry indices of each feature's `n` strongest activations of `sign`, at most one per context row; grouped by
    feature (ascending), strongest first."""
    score = p.value * sign
    cand = (score > 0).nonzero().squeeze(1)
    group = p.feature[cand] * p.tokens.shape[0] + p.position[cand] // p.tokens.shape[1]
    o = _order(group, score[cand])
    best = cand[o[_rank_in_run(group[o]) == 0]]
    best = best[_order(p.feature[best], score[best])]
    return best[_rank_in_run(p.feature[best]) < n]


def quantile_entries(p: Pass, bands: int, per_band: int, exclude: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(entry indices, their band, band ranges [d_sae, bands, 2]): `per_band` random entries from each of `bands`
    equal-count bands of each feature's |activation| distribution, leaving out the `exclude` entries. The range
    (smallest, largest |activation|) of an empty band is NaN."""
    mag = p.value.abs()
    o = _order(p.feature, -mag)  # feature ascending, |activation| ascending
    count = p.counts()
    band = torch.empty_like(p.feature)
    band[o] = (_rank_in_run(p.feature[o]) * bands // count[p.feature[o]]).clamp(max=bands - 1)
    group = p.feature * bands + band
    empty = torch.full((p.d_sae * bands,), torch.nan)
    ranges = torch.stack(
        [
            empty.scatter_reduce(0, group, mag, "amin", include_self=False),
            empty.scatter_reduce(0, group, mag, "amax", include_self=False),
        ],
        1,
    ).view(p.d_sae, bands, 2)
    allowed = torch.ones(len(mag), dtype=torch.bool)
    allowed[exclude] = False
    cand = allowed.nonzero().squeeze(1)
    key = torch.randint(0, 1 << 62, (len(cand),), generator=torch.Generator().manual_seed(seed))
    o = _order(group[cand], key)
    picked = cand[o[_rank_in_run(group[cand][o]) < per_band]]
    return picked, band[picked], ranges


# ------------------------------------------------------------------------------------------------- arrow columns
def _offsets(counts: Tensor) -> pa.Array:
    return pa.array(np.concatenate([[0], counts.cumsum(0).numpy()]).astype(np.int32), pa.int32())


def _lists(values: Tensor, counts: Tensor, kind: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(_offsets(counts), pa.array(values.numpy(), kind))


def contexts(p: Pass, idx: Tensor, band: Tensor | None, before: int, after: int, start: int, stop: int) -> pa.ListArray:
    """One list of CONTEXT structs per feature in [start, stop) for the entries `idx` (grouped by feature): the
    window of tokens around each entry with the feature's activation on every token of it."""
    R, T = p.tokens.shape
    row, pos = p.position[idx] // T, p.position[idx] % T
    q = pos.unsqueeze(1) + torch.arange(-before, after + 1)
    ok = (q >= 0) & (q < T)
    q = q.clamp(0, T - 1)
    ok &= p.valid[row.unsqueeze(1), q]
    keys = p.feature[idx].unsqueeze(1) * (R * T) + row.unsqueeze(1) * T + q
    sorted_keys = p.keys
    loc = torch.searchsorted(sorted_keys, keys).clamp(max=max(len(sorted_keys) - 1, 0))
    hit = ok & (sorted_keys[loc] == keys)
    acts = torch.where(hit, p.value[loc], 0.0)
    n_tok = ok.sum(1)
    struct = pa.StructArray.from_arrays(
        [
            pa.array(row.numpy().astype(np.int32)),
            pa.array(pos.numpy().astype(np.int32)),
            pa.array(p.value[idx].numpy()),
            pa.array(ok[:, :before].sum(1).numpy().astype(np.int32)),
            _lists(p.tokens[row.unsqueeze(1), q][ok].to(torch.int32), n_tok, pa.int32()),
            _lists(acts[ok].float(), n_tok, pa.float32()),
            pa.array((band if band is not None else torch.full_like(idx, -1)).numpy().astype(np.int8)),
        ],
        fields=list(CONTEXT),
    )
    return pa.ListArray.from_arrays(_offsets(torch.bincount(p.feature[idx] - start, minlength=stop - start)), struct)


def _ranked(scores: Tensor, n: int, sign: int = 1) -> tuple[pa.ListArray, pa.ListArray]:
    """Per row of `scores` [r, m] (on any device): the ids and scores of its `n` largest (sign 1) or smallest
    (sign -1) entries."""
    vals, ids = (sign * scores).topk(min(n, scores.shape[1]), dim=1)
    vals, ids = vals.cpu(), ids.cpu()
    counts = torch.full((len(ids),), ids.shape[1])
    return _lists(ids.flatten().to(torch.int32), counts, pa.int32()), _lists(
        sign * vals.flatten().float(), counts, pa.float32()
    )


def _blocks(start: int, stop: int, width: int):
    step = max(1, MAX_CELLS // max(width, 1))
    for a in range(start, stop, step):
        yield a, min(a + step, stop)


# ------------------------------------------------------------------------------------------------- weights
def logit_effects(lens: Callable[[Tensor], Tensor], W_dec: Tensor, start: int, stop: int, n: int) -> list[pa.ListArray]:
    """Top promoted (ids, values) and top suppressed (ids, values) tokens of d_i·W_U for features [start, stop),
    in blocks of features whose [features × vocab] effects hold at most MAX_CELLS entries."""
    vocab = lens(W_dec[start : start + 1]).shape[1] if stop > start else 1
    parts = []
    for a, b in _blocks(start, stop, vocab):
        effect = lens(W_dec[a:b])
        parts.append((*_ranked(effect, n), *_ranked(effect, n, sign=-1)))
    return [pa.concat_arrays([part[i] for part in parts]) for i in range(4)]


def neighbours(W_dec: Tensor, start: int, stop: int, n: int) -> tuple[pa.ListArray, pa.ListArray]:
    """The `n` decoder directions nearest each of features [start, stop) by cosine (itself excluded).

    Computed on W_dec's device (the SAE's: the accelerator when it has one) in blocks of rows whose [rows × d_sae]
    cosines hold at most MAX_CELLS entries; the decoder is read in place (fp32: no copy; another dtype: one fp32 copy
    of it), never normalised into a second full-size matrix: cos = d_a·d_b / (‖d_a‖‖d_b‖)."""
    W = W_dec.detach().float()
    inv = 1 / W.norm(dim=1).clamp_min(1e-12)  # F.normalize's eps
    ids, cos = [], []
    for a, b in _blocks(start, stop, len(W)):
        sims = (W[a:b] @ W.T) * inv[a:b, None] * inv[None, :]
        sims[torch.arange(b - a, device=W.device), torch.arange(a, b, device=W.device)] = -torch.inf
        i, c = _ranked(sims, min(n, len(W) - 1))
        ids.append(i)
        cos.append(c)
    return pa.concat_arrays(ids), pa.concat_arrays(cos)


# ------------------------------------------------------------------------------------------------- co-firing
class CoFiring:
    """Co-firing counts of a range of features with every feature: (range × positions) @ (positions × features),
    sparse products on `device` (the SAE's: the accelerator when it has one) in blocks of features whose dense
    [block × d_sae] counts hold at most MAX_CELLS entries."""

    def __init__(self, p: Pass, device: torch.device | str | None = None) -> None:
        self.p, self.count = p, p.counts()
        self.device = torch.device(device or "cpu")
        by_position = torch.sort(p.position, stable=True).indices
        with warnings.catch_warnings():  # torch marks sparse CSR as beta; the product below is exact
            warnings.simplefilter("ignore")
            self.fired = torch.sparse_csr_tensor(
                _crow(torch.bincount(p.position, minlength=p.tokens.numel())),
                p.feature[by_position],
                torch.ones(len(by_position)),
                (p.tokens.numel(), p.d_sae),
            ).to(self.device)
        self.count_dev = self.count.to(self.device)

    def top(self, start: int, stop: int, n: int) -> tuple[pa.ListArray, pa.ListArray, pa.ListArray]:
        """Per feature in [start, stop): the `n` features with the highest Jaccard index of firing positions
        (ids, Jaccard, fraction of this feature's firings they share); only features that co-fire at all."""
        p, dev = self.p, self.device
        ids, jac, frac = [], [], []
        for a, b in _blocks(start, stop, p.d_sae):
            lo, hi = torch.searchsorted(p.feature, torch.tensor([a, b]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows = torch.sparse_csr_tensor(
                    _crow(self.count[a:b]), p.position[lo:hi], torch.ones(int(hi - lo)), (b - a, p.tokens.numel())
                ).to(dev)
                both = torch.sparse.mm(rows, self.fired).to_dense()
            n_i = self.count_dev[a:b].unsqueeze(1).float()
            both[torch.arange(b - a, device=dev), torch.arange(a, b, device=dev)] = 0
            jaccard = both / (n_i + self.count_dev.float() - both).clamp(min=1)
            vals, idx = jaccard.topk(min(n, p.d_sae), dim=1)
            shared = both.gather(1, idx) / n_i.clamp(min=1)
            vals, idx, shared = vals.cpu(), idx.cpu(), shared.cpu()
            ok = vals > 0
            counts = ok.sum(1)
            ids.append(_lists(idx[ok].to(torch.int32), counts, pa.int32()))
            jac.append(_lists(vals[ok], counts, pa.float32()))
            frac.append(_lists(shared[ok], counts, pa.float32()))
        return pa.concat_arrays(ids), pa.concat_arrays(jac), pa.concat_arrays(frac)


def _crow(counts: Tensor) -> Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])


# ------------------------------------------------------------------------------------------------- one shard
@dataclass
class Picks:
    """The entries each feature's contexts show (indices into the Pass, grouped by feature)."""

    top: Tensor
    top_negative: Tensor
    quantiles: Tensor
    bands: Tensor
    ranges: Tensor

    @classmethod
    def choose(cls, p: Pass, cfg: IndexConfig, signed: bool) -> Picks:
        top = top_entries(p, cfg.top)
        negative = top_entries(p, cfg.top, sign=-1) if signed else torch.zeros(0, dtype=torch.int64)
        quantiles, bands, ranges = quantile_entries(p, cfg.bands, cfg.per_band, torch.cat([top, negative]), cfg.seed)
        return cls(top, negative, quantiles, bands, ranges)

    def peak_tokens(self, p: Pass) -> list[list[int]]:
        """Per feature, the token at the peak of each top context (positive, then negative side)."""
        idx = torch.cat([self.top, self.top_negative])
        idx = idx[torch.sort(p.feature[idx], stable=True).indices]
        counts = torch.bincount(p.feature[idx], minlength=p.d_sae).tolist()
        flat = p.tokens.flatten()[p.position[idx]].tolist()
        out, i = [], 0
        for c in counts:
            out.append(flat[i : i + c])
            i += c
        return out


def shard_table(
    p: Pass,
    st: Stats,
    hist: Tensor,
    picks: Picks,
    cofiring: CoFiring,
    W_dec: Tensor,
    lens: Callable[[Tensor], Tensor],
    cfg: IndexConfig,
    start: int,
    stop: int,
) -> pa.Table:
    """The SHARD_SCHEMA table of features [start, stop)."""

    def within(idx: Tensor, *also: Tensor) -> list[Tensor]:
        lo, hi = torch.searchsorted(p.feature[idx], torch.tensor([start, stop])).tolist()
        return [idx[lo:hi], *(a[lo:hi] for a in also)]

    (top,) = within(picks.top)
    (negative,) = within(picks.top_negative)
    quant, bands = within(picks.quantiles, picks.bands)
    ctx = lambda idx, band=None: contexts(p, idx, band, cfg.before, cfg.after, start, stop)  # noqa: E731
    r = stop - start
    columns = {
        "feature": pa.array(np.arange(start, stop, dtype=np.int32)),
        "hist_counts": _lists(hist[start:stop].flatten().to(torch.int32), torch.full((r,), hist.shape[1]), pa.int32()),
        "hist_lo": pa.array(st.lo[start:stop].numpy()),
        "hist_hi": pa.array(st.hi[start:stop].numpy()),
        "top": ctx(top),
        "top_negative": ctx(negative),
        "quantiles": ctx(quant, bands),
        "band_lo": _lists(
            picks.ranges[start:stop, :, 0].flatten(), torch.full((r,), picks.ranges.shape[1]), pa.float32()
        ),
        "band_hi": _lists(
            picks.ranges[start:stop, :, 1].flatten(), torch.full((r,), picks.ranges.shape[1]), pa.float32()
        ),
    }
    for name, col in zip(
        ("logit_pos_ids", "logit_pos_vals", "logit_neg_ids", "logit_neg_vals"),
        logit_effects(lens, W_dec, start, stop, cfg.logits),
    ):
        columns[name] = col
    columns["neighbour_ids"], columns["neighbour_cos"] = neighbours(W_dec, start, stop, cfg.neighbours)
    columns["cofire_ids"], columns["cofire_jaccard"], columns["cofire_frac"] = cofiring.top(start, stop, cfg.cofire)
    return pa.table(columns, schema=SHARD_SCHEMA)
