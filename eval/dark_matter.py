"""Dark matter (Engels, Riggs & Tegmark, arXiv 2410.14670): how much of an SAE's error is a linear function of its input.

Definitions, with x the clean activation at a kept position, x̂ the SAE's reconstruction and e = x − x̂:
- `fit_linear`: least squares with an intercept column, Y ≈ [X, 1]·W, solved in float64.
- vector R²: per error dimension R²_j = 1 − SS_res,j / SS_tot,j of predicting e from x on held-out tokens, averaged
  over dimensions; a dimension constant on the held-out tokens has no variance to explain: its R² is NaN and it is
  left out of the mean (`vector_r2_skipped_dims` counts them). norm R²: the same for the scalar target ||e||².
- `decompose`: e_L = [x, 1]·W* and e_NL = e − e_L, with W* fitted on the tokens outside the CE contexts
  (`decomposition_tokens` of them; the paper fits on all tokens), so the CE attribution below measures e_L and
  e_NL on contexts the fit never saw. With the intercept, e_NL has zero mean and is uncorrelated with x on the fit
  tokens, so there FVU_sae = FVU(e_L) + FVU(e_NL), where FVU(v) = Σ||v||² / Σ||x − μ||² (the `fvu_*` metrics).
- CE attribution: next-token CE with x̂, x̂ + e_L and x̂ + e_NL spliced into the kept positions of the CE contexts;
  the share of the CE gap a component closes is (CE_sae − CE_{x̂+component}) / (CE_sae − CE_clean).
- Across widths (`cross_width`): R² of regressing ||e_j|| on [||e_i||, 1] for consecutive widths i < j, then with
  ||e_NL,i|| added, and the % of the remaining variance explained = (R²_new − R²_old) / (1 − R²_old) · 100.

Differences from the paper's protocol: we fit on a random `fit_fraction` (60%) of the evaluation tokens and score on
the rest (the paper: the first 150k tokens of a permutation, scored on the next ~97k); the regression always has an
intercept column (the paper's text includes biases, its released script does not); the tokens are the kept positions
of held-out contexts, with positions excluded as in training (position 0, special tokens, padding) instead of the
paper's positions ≥ 200 of 1024-token contexts; CE is averaged over every position with a real next-token target in
the contexts of the first `ce_tokens` kept positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
import torch
from torch import Tensor

from sae_kit.eval.inputs import EvalError, EvalInputs, Section
from sae_kit.heldout import next_token_ce, run_lm, splice, vocab_size

PAPER_HEADLINE = {"norm_r2": ">0.9", "vector_r2": "~0.5", "model": "Gemma 2 9B layer 20, Gemma Scope, L0≈60"}
MIN_TOKENS_PER_REGRESSOR = 10
_CHUNK = 16384


@dataclass
class DarkMatterConfig:
    """Settings of the dark-matter regressions and CE passes."""

    fit_fraction: float = 0.6
    """Random share of the evaluation tokens the regressions are fitted on; R² is reported on the rest."""
    min_tokens: int | None = None
    """Fewest fit tokens accepted (None: 10·(d_in + 1), ten per regressor). Least squares with p regressors fitted on
    n tokens reads held-out R² low by about (1 − R²)·p/(n − p − 1): 11% of the unexplained variance at n = 10p,
    33% at 4p (the paper fits 3,585 regressors on 150k tokens, 42p)."""
    ce_tokens: int = 8192
    """Kept positions whose contexts (whole LM batches) are used for the CE splicing passes."""
    ridge: float = 0.0
    """Ridge penalty added to the unit diagonal of the standardised XᵀX (0: ordinary least squares; directions
    with eigenvalues below 1e-12 of the largest are dropped either way)."""

    def __post_init__(self) -> None:
        if not 0 < self.fit_fraction < 1:
            raise EvalError(f"dark matter fit_fraction={self.fit_fraction}; use a share in (0, 1), e.g. 0.6")
        if self.min_tokens is not None and self.min_tokens < 1:
            raise EvalError(f"dark matter min_tokens={self.min_tokens}; use a positive count or None (10·(d_in + 1))")
        if self.ce_tokens < 1:
            raise EvalError(f"dark matter ce_tokens={self.ce_tokens}; use a positive count")
        if not self.ridge >= 0:
            raise EvalError(f"dark matter ridge={self.ridge}; use a value >= 0")

    def min_fit_tokens(self, d_in: int) -> int:
        """Fewest fit tokens for a regression on `d_in` inputs (plus the intercept)."""
        return self.min_tokens if self.min_tokens is not None else MIN_TOKENS_PER_REGRESSOR * (d_in + 1)

    def tokens_needed(self, d_in: int, context_size: int, lm_batch_size: int) -> int:
        """Evaluation tokens that are enough for `measure` on `d_in` inputs: the fit share must hold
        `min_fit_tokens`, and so must the tokens outside the CE contexts (whole LM batches of `lm_batch_size`
        contexts of `context_size` holding the first `ce_tokens` kept positions, so at most one batch more).
        `sae-kit eval` raises its default --tokens to this where it is larger (d_in ≳ 2000 at the defaults)."""
        need = self.min_fit_tokens(d_in)
        by_split = max(math.ceil(need / self.fit_fraction), math.ceil(2 / (1 - self.fit_fraction))) + 1
        return max(by_split, need + self.ce_tokens + lm_batch_size * context_size)


# ----------------------------------------------------------------------------------------------- pure tensors
def _rows(n: int):
    return (slice(i, min(i + _CHUNK, n)) for i in range(0, n, _CHUNK))


def _columns(t: Tensor) -> Tensor:
    return t[:, None] if t.ndim == 1 else t


def fit_linear(X: Tensor, Y: Tensor, ridge: float = 0.0) -> Tensor:
    """W [d+1, k] (float64; the last row is the intercept) minimising ||[X, 1]·W − Y||² for X [n, d], Y [n, k] or [n].

    Solved from the centred, standardised normal equations accumulated in float64 chunks.
    """
    X, Y = _columns(X), _columns(Y)
    n, d = X.shape
    mx = torch.stack([X[s].double().sum(0) for s in _rows(n)]).sum(0) / n
    my = torch.stack([Y[s].double().sum(0) for s in _rows(n)]).sum(0) / n
    f64: dict[str, Any] = {"dtype": torch.float64, "device": X.device}
    xx = torch.zeros(d, d, **f64)
    xy = torch.zeros(d, Y.shape[1], **f64)
    for s in _rows(n):
        xc = X[s].double() - mx
        xx += xc.T @ xc
        xy += xc.T @ (Y[s].double() - my)
    scale = xx.diagonal().sqrt()
    live = scale > 1e-12 * scale.max()  # constant columns carry nothing the intercept does not
    sd = scale[live, None]
    gram = xx[live][:, live] / sd / sd.T + ridge * torch.eye(len(sd), **f64)
    w = torch.zeros(d, Y.shape[1], **f64)
    if live.any():
        w[live] = _pinv_solve(gram, xy[live] / sd) / sd
    return torch.cat([w, (my - mx @ w)[None]])


def _pinv_solve(gram: Tensor, rhs: Tensor) -> Tensor:
    """gram⁺·rhs for a symmetric PSD gram, dropping eigenvalues below 1e-12 of the largest (fast and stable)."""
    values, vectors = torch.linalg.eigh(gram)
    inverse = torch.where(values > 1e-12 * values.max(), 1 / values, torch.zeros_like(values))
    return vectors @ (inverse[:, None] * (vectors.T @ rhs))


def predict(X: Tensor, W: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """[X, 1]·W [n, k] (W from `fit_linear`), computed in float64 and returned in `dtype`."""
    X = _columns(X)
    return torch.cat([(X[s].double() @ W[:-1] + W[-1]).to(dtype) for s in _rows(len(X))])


def r2(Y: Tensor, Y_hat: Tensor) -> Tensor:
    """Per-column R² = 1 − SS_res/SS_tot [k] (float64; NaN for a column constant on these rows: nothing to explain)."""
    Y, Y_hat = _columns(Y).double(), _columns(Y_hat).double()
    value = 1 - (Y - Y_hat).pow(2).sum(0) / (Y - Y.mean(0)).pow(2).sum(0)
    return value.masked_fill(Y.amax(0) == Y.amin(0), math.nan)


def decompose(x: Tensor, e: Tensor, ridge: float = 0.0, fit: slice | Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(e_L, e_NL) in e's dtype for every row: the part of e linear in x, fitted on the rows `fit` (None: all), and the
    rest, e_L + e_NL = e."""
    rows = slice(None) if fit is None else fit
    e_lin = predict(x, fit_linear(x[rows], e[rows], ridge), e.dtype)
    return e_lin, e - e_lin


def split_tokens(n: int, d_in: int, cfg: DarkMatterConfig, seed: int) -> tuple[Tensor, Tensor]:
    """(fit rows, held rows): a seeded random `cfg.fit_fraction` of n tokens and the rest; EvalError when too few."""
    n_fit = int(cfg.fit_fraction * n + 1e-9)
    need = cfg.min_fit_tokens(d_in)
    if n_fit < need or n - n_fit < 2:
        total = max(math.ceil(need / cfg.fit_fraction), math.ceil(2 / (1 - cfg.fit_fraction)))
        raise EvalError(
            f"dark matter needs {need} fit tokens for {d_in + 1} regressors ({cfg.fit_fraction:.0%} of at least {total} "
            f"evaluation tokens), but has {n}; raise --tokens to {total} or more"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_fit], perm[n_fit:]


@dataclass
class Predictability:
    """Held-out linear predictability of the error from x."""

    r2_per_dim: Tensor
    """[d_in] R² of each error dimension."""
    norm_r2: float
    """R² of ||e||²."""
    norm: Tensor
    """[n_held] actual ||e||²."""
    norm_pred: Tensor
    """[n_held] predicted ||e||²."""

    @property
    def vector_r2(self) -> float:
        """Mean R² over the error dimensions that vary on the held-out tokens."""
        return float(self.r2_per_dim.nanmean())

    @property
    def skipped_dims(self) -> int:
        """Error dimensions left out of vector_r2 (constant on the held-out tokens)."""
        return int(self.r2_per_dim.isnan().sum())


def predictability(x: Tensor, e: Tensor, fit: Tensor, held: Tensor, ridge: float = 0.0) -> Predictability:
    """Fit e and ||e||² on x at the `fit` rows (one regression with both targets), score them at the `held` rows."""
    norm2 = e.double().pow(2).sum(1)
    targets = torch.cat([e[fit].double(), norm2[fit, None]], 1)
    pred = predict(x[held], fit_linear(x[fit], targets, ridge))
    return Predictability(r2(e[held], pred[:, :-1]), float(r2(norm2[held], pred[:, -1])[0]), norm2[held], pred[:, -1])


def _energy(v: Tensor) -> float:
    return float(sum(v[s].double().pow(2).sum() for s in _rows(len(v))))


def _centred_energy(x: Tensor) -> float:
    mean = sum(x[s].double().sum(0) for s in _rows(len(x))) / len(x)
    return float(sum((x[s].double() - mean).pow(2).sum() for s in _rows(len(x))))


# ----------------------------------------------------------------------------------------------- CE passes
def ce_rows(inputs: EvalInputs, n_tokens: int) -> int:
    """Rows of x covered by the whole LM batches that hold the first `n_tokens` kept positions."""
    stop = 0
    for _, rows in inputs.batches():
        if rows.start >= n_tokens:
            break
        stop = rows.stop
    return stop


def ce_with(inputs: EvalInputs, x_new: Tensor | None, n_tokens: int) -> float:
    """Mean next-token CE over positions with a real target, in the LM batches holding the first `n_tokens` kept
    positions, with the rows of `x_new` [≥ ce_rows(...), d_in] spliced into the kept positions (None: clean)."""
    total, count = 0.0, 0
    vocab = vocab_size(inputs.model)
    for batch, rows in inputs.batches():
        if rows.start >= n_tokens:
            break
        for before, sub in batch.logit_batches(vocab):  # at most LOGIT_CELLS fp32 logits per forward
            start = rows.start + before
            edit = None if x_new is None else splice(x_new[start : start + sub.n_kept])
            logits, _ = run_lm(inputs.model, sub.tokens, inputs.hook, edit=edit, keep=sub.keep)
            ce, mask = next_token_ce(logits, sub.tokens, sub.pad)
            total += float(ce[mask].double().sum())
            count += int(mask.sum())
            del logits
    return total / count


def check(inputs: EvalInputs, cfg: DarkMatterConfig) -> tuple[Tensor, Tensor, int]:
    """(fit rows, held rows, CE rows m) of `measure`; EvalError when the tokens cannot support the regressions."""
    n, d_in = inputs.x.shape
    fit, held = split_tokens(n, d_in, cfg, inputs.seed)
    m, need = ce_rows(inputs, cfg.ce_tokens), cfg.min_fit_tokens(d_in)
    if n - m < need:
        raise EvalError(
            f"dark matter fits its linear/nonlinear split on the tokens outside the CE contexts: needs {need}, but {m} of "
            f"the {n} evaluation tokens are in the CE contexts; raise --tokens to {m + need} or more, or lower --dark-matter.ce-tokens"
        )
    return fit, held, m


def _share(ce_sae: float, ce_variant: float, ce_clean: float) -> float | None:
    gap = ce_sae - ce_clean
    return (ce_sae - ce_variant) / gap if gap != 0 else None


# ----------------------------------------------------------------------------------------------- one SAE
def measure(inputs: EvalInputs, cfg: DarkMatterConfig = DarkMatterConfig()) -> Section:
    """Error predictability (held-out vector and norm R²), the linear/nonlinear decomposition and its CE attribution."""
    x = inputs.x
    fit, held, m = check(inputs, cfg)
    x_hat = inputs.encoded().x_hat
    e = x - x_hat
    pred = predictability(x, e, fit, held, cfg.ridge)
    e_lin, e_nl = decompose(x, e, cfg.ridge, fit=slice(m, None))  # fitted outside the CE contexts
    total = _centred_energy(x[m:])
    ce = {
        "ce_clean": ce_with(inputs, None, cfg.ce_tokens),
        "ce_sae": ce_with(inputs, x_hat[:m], cfg.ce_tokens),
        "ce_sae_plus_linear": ce_with(inputs, x_hat[:m] + e_lin[:m], cfg.ce_tokens),
        "ce_sae_plus_nonlinear": ce_with(inputs, x_hat[:m] + e_nl[:m], cfg.ce_tokens),
    }
    metrics = {
        "vector_r2": pred.vector_r2,
        "vector_r2_skipped_dims": pred.skipped_dims,
        "norm_r2": pred.norm_r2,
        "fvu_sae": _energy(e[m:]) / total,
        "fvu_linear_error": _energy(e_lin[m:]) / total,
        "fvu_nonlinear_error": _energy(e_nl[m:]) / total,
        **ce,
        "share_of_ce_gap_closed_by_linear": _share(ce["ce_sae"], ce["ce_sae_plus_linear"], ce["ce_clean"]),
        "share_of_ce_gap_closed_by_nonlinear": _share(ce["ce_sae"], ce["ce_sae_plus_nonlinear"], ce["ce_clean"]),
        "fit_tokens": len(fit),
        "held_tokens": len(held),
        "ce_kept_tokens": m,
        "decomposition_tokens": len(x) - m,
        "paper_headline": dict(PAPER_HEADLINE),
    }
    return Section(metrics, _figures(pred, inputs.seed), [_line(metrics)])


def _line(m: dict) -> str:
    shares = "  ".join(
        f"CE gap closed by {name} {'n/a' if s is None else f'{s:.0%}'}"
        for name, s in (
            ("e_L", m["share_of_ce_gap_closed_by_linear"]),
            ("e_NL", m["share_of_ce_gap_closed_by_nonlinear"]),
        )
    )
    skipped = f"; {m['vector_r2_skipped_dims']} constant dimensions skipped" if m["vector_r2_skipped_dims"] else ""
    return (
        f"dark matter: norm R² {m['norm_r2']:.2f} (paper: >0.9 on Gemma 2)  vector R² {m['vector_r2']:.2f} (paper: ~0.5{skipped})  "
        f"FVU {m['fvu_sae']:.3f} = linear {m['fvu_linear_error']:.3f} + nonlinear {m['fvu_nonlinear_error']:.3f}  {shares}"
    )


def _figures(pred: Predictability, seed: int, points: int = 2000) -> dict[str, go.Figure]:
    pick = torch.randperm(len(pred.norm), generator=torch.Generator().manual_seed(seed))[:points]
    actual, guess = pred.norm[pick].tolist(), pred.norm_pred[pick].tolist()
    lo, hi = min(actual + guess), max(actual + guess)
    scatter = go.Figure(
        [
            go.Scatter(x=actual, y=guess, mode="markers", marker={"size": 3, "opacity": 0.5}, name="held-out tokens"),
            go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dash"}, name="y = x"),
        ]
    )
    scatter.update_layout(
        title=f"Dark matter: ||e||² predicted linearly from x (held-out R² {pred.norm_r2:.3f})",
        xaxis_title="actual ||e||²",
        yaxis_title="predicted ||e||²",
    )
    r2s = pred.r2_per_dim
    hist = go.Figure([go.Histogram(x=r2s[~r2s.isnan()].tolist(), nbinsx=50)])
    skipped = f", {pred.skipped_dims} constant dimensions skipped" if pred.skipped_dims else ""
    hist.update_layout(
        title=f"Dark matter: held-out R² per error dimension (mean {pred.vector_r2:.3f}{skipped})",
        xaxis_title="R² of e_j predicted from x",
        yaxis_title="dimensions",
    )
    return {"norm_scatter": scatter, "r2_per_dim": hist}


# ----------------------------------------------------------------------------------------------- across widths
def _check_group(inputs: list[EvalInputs]) -> list[EvalInputs]:
    """The SAEs sorted by width, after checking they read one hook at the same tokens."""
    if len(inputs) < 2:
        raise EvalError(f"dark matter across widths needs at least 2 SAEs on one hook, got {len(inputs)}")
    hooks = sorted({i.hook for i in inputs})
    if len(hooks) > 1:
        raise EvalError(f"dark matter across widths compares SAEs on one hook, got {hooks}; group the SAEs by hook")
    widths = sorted({i.sae.cfg.d_in for i in inputs})
    if len(widths) > 1:
        raise EvalError(f"dark matter across widths needs one d_in, got {widths}")
    first = inputs[0].contexts
    for other in inputs[1:]:
        c = other.contexts
        if not (
            torch.equal(c.tokens, first.tokens)
            and torch.equal(c.keep, first.keep)
            and other.x.shape == inputs[0].x.shape
        ):
            raise EvalError(
                "dark matter across widths needs the SAEs evaluated on the same tokens; "
                "prepare one EvalInputs and swap only its SAE (dataclasses.replace(inputs, sae=...))"
            )
    return sorted(inputs, key=lambda i: i.sae.cfg.d_sae)


def _error_norms(inputs: EvalInputs, ridge: float) -> tuple[Tensor, Tensor, float]:
    """(||e|| [n], ||e_NL|| [n], mean L0) of one SAE."""
    encoded = inputs.encoded()
    x_hat, l0 = encoded.x_hat, encoded.l0
    e = inputs.x - x_hat
    _, e_nl = decompose(inputs.x, e, ridge)
    return e.double().norm(dim=1), e_nl.double().norm(dim=1), float(l0.float().mean())


def _held_r2(X: Tensor, y: Tensor, fit: Tensor, held: Tensor) -> float:
    return float(r2(y[held], predict(X[held], fit_linear(X[fit], y[fit])))[0])


def cross_width(inputs: list[EvalInputs], cfg: DarkMatterConfig = DarkMatterConfig()) -> Section:
    """Per-token error-norm predictability from each width to the next (same hook, same tokens), alone and with the
    smaller SAE's nonlinear-error norm added. The paper compares SAEs of one L0; mixed groups are paired as sorted."""
    runs = _check_group(inputs)
    fit, held = split_tokens(len(runs[0].x), runs[0].sae.cfg.d_in, cfg, runs[0].seed)
    stats = [_error_norms(r, cfg.ridge) for r in runs]
    pairs = []
    for (small, (norm_i, nl_i, l0_i)), (large, (norm_j, _, l0_j)) in zip(zip(runs, stats), zip(runs[1:], stats[1:])):
        old = _held_r2(norm_i, norm_j, fit, held)
        new = _held_r2(torch.stack([norm_i, nl_i], 1), norm_j, fit, held)
        pairs.append(
            {
                "d_sae_small": small.sae.cfg.d_sae,
                "d_sae_large": large.sae.cfg.d_sae,
                "l0_small": l0_i,
                "l0_large": l0_j,
                "r2_norm": old,
                "r2_norm_plus_nonlinear": new,
                "pct_remaining_variance_explained": (new - old) / (1 - old) * 100 if old < 1 else None,
            }
        )
    lines = [
        f"dark matter across widths: ||e|| at {p['d_sae_large']} from {p['d_sae_small']}: R² {p['r2_norm']:.3f}, "
        f"with ||e_NL|| {p['r2_norm_plus_nonlinear']:.3f} ({_pct(p['pct_remaining_variance_explained'])} of the remaining variance)"
        for p in pairs
    ]
    metrics = {
        "widths": [r.sae.cfg.d_sae for r in runs],
        "l0": [s[2] for s in stats],
        "pairs": pairs,
        "fit_tokens": len(fit),
        "held_tokens": len(held),
    }
    return Section(metrics, {"norm_r2": _pairs_figure(pairs)}, lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def _pairs_figure(pairs: list[dict]) -> go.Figure:
    labels = [f"{p['d_sae_small']} → {p['d_sae_large']}" for p in pairs]
    fig = go.Figure(
        [
            go.Bar(x=labels, y=[p["r2_norm"] for p in pairs], name="from ||e_i||"),
            go.Bar(x=labels, y=[p["r2_norm_plus_nonlinear"] for p in pairs], name="from ||e_i|| and ||e_NL,i||"),
        ]
    )
    fig.update_layout(
        title="Dark matter across widths: held-out R² of the larger SAE's per-token error norm",
        xaxis_title="widths (smaller → larger)",
        yaxis_title="R²",
        barmode="group",
    )
    return fig
