"""Core metrics: how sparse the code is, how well x̂ reconstructs x, and what splicing x̂ into the LM costs.

Reconstruction (over every row of `inputs.x`, the kept positions of the held-out contexts; sums in float64):
- `tokens`: rows measured. `l0_mean`, `l0_std`, `l0_p1` … `l0_p99` (percentiles), `l0_hist_edges`/`l0_hist_counts`
  (tokens per L0 bin [edge_i, edge_i+1); integer bins, widened so there are at most 64).
- `mse` = mean_t ||x_t − x̂_t||² (SAELens/SAEBench: the per-token sum of squares, averaged over tokens).
- `normalized_mse` = mean_t ||x_t − x̂_t||²/||x_t||² (the per-token ratio of Gao et al. and the dark-matter paper).
- `fvu` = Σ_t||x_t − x̂_t||² / Σ_t||x_t − μ||², μ the token mean of x; `explained_variance` = 1 − fvu (SAEBench's
  `explained_variance`, not the per-token "legacy" one). A zero reconstruction gives Σ||x||²/Σ||x − μ||² ≥ 1.
- `cossim` = mean_t cos(x_t, x̂_t) (0 where x̂_t = 0); `l2_ratio` = mean_t ||x̂_t||/||x_t||;
  `relative_reconstruction_bias` = E||x̂||² / E⟨x, x̂⟩ (Gated-SAE paper eq. 10, as SAELens/SAEBench; None when
  E⟨x, x̂⟩ = 0).

Downstream (the contexts holding the first `CoreConfig.ce_tokens` kept positions; `ce_tokens` reports how many
positions were spliced, `ce_positions` how many next-token targets were scored): the LM runs clean, with x̂ spliced
in (sae_kit.heldout.splice), with zeros (zero ablation) and with the mean of `inputs.x` (mean ablation). x̂ is
spliced into the kept positions only: BOS, position 0 and special tokens (by the SAE's own rule) are left clean,
because the SAE never trained on them (their activations are outliers an SAE is not asked to reconstruct).
`ablation_positions` (reported) says where the ablations edit: "kept" (default: the same positions as x̂, so the
three runs differ only where the SAE acts) or "all" (every position, BOS included, as SAELens and SAEBench ablate).
CE and KL are averaged over every position with a real next-token target (next_token_ce's mask), so the clean
positions count in every run alike.
- `ce_clean`, `ce_spliced`, `ce_zero_ablation`, `ce_mean_ablation`: mean next-token cross-entropy (nats).
- `ce_loss_recovered` = (CE_zero − CE_sae)/(CE_zero − CE_clean) (SAELens `ce_loss_score`);
  `ce_loss_recovered_mean` = the same against mean ablation; `delta_ce` = CE_sae − CE_clean.
- `kl_spliced`, `kl_zero`, `kl_mean`: mean KL(p_clean ‖ p_edited) summed over the vocabulary;
  `kl_score` = (KL_zero − KL_sae)/KL_zero (SAEBench `kl_div_score`).
Mean-ablation values are None with `mean_ablation=False`, every downstream value with `ce_tokens=0`; ratios with a
zero denominator are None.

Architecture specifics:
- g-SAE: encoded with the real gradients `inputs.grad` (prepare() harvests them); the spliced pass uses that x̂.
- Mutual/Feature Choice: eval mode, i.e. the learned inference thresholds; `l0_mean` is the inference L0, reported
  beside `l0_training_target` (k, the batch-average L0 the training allocation enforces) and `l0_training`
  (metadata["training_l0"] when the trainer recorded it, else None).
- MP-SAE: the main metrics use the eval-mode rule; `mp_curve_l0`/`mp_curve_fvu` give mean L0 and FVU after each of `mp_curve_steps` (default 2k) pursuit
  steps without early stopping, on a seeded sample of `mp_curve_tokens` rows; `mp_fvu_at_k` is the curve at the
  trained k (the training rule).

Figures: `l0_hist` (every SAE) and `mp_curve` (MP-SAE: FVU against L0, with the eval-mode point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from torch import Tensor

from sae_kit.eval.inputs import EvalError, EvalInputs, Section
from sae_kit.heldout import fill, fvu, kl_from, next_token_ce, run_lm, splice, vocab_size

PERCENTILES = (1, 10, 25, 50, 75, 90, 99)
MAX_L0_BINS = 64


@dataclass(frozen=True)
class CoreConfig:
    """What `measure` runs."""

    ce_tokens: int = 16384
    """Kept positions used for the downstream CE/KL passes (whole contexts, so up to one context more); the
    reconstruction metrics use all of inputs.x. 0 skips the LM passes."""
    mean_ablation: bool = True
    """Also run the LM with the mean activation spliced in (ce_mean_ablation, ce_loss_recovered_mean, kl_mean)."""
    ablation_positions: Literal["kept", "all"] = "kept"
    """Where zero/mean ablation edits: "kept" (the positions x̂ is spliced into) or "all" (every position, BOS
    included, as SAELens and SAEBench do)."""
    mp_curve_steps: int | None = None
    """MP-SAE: pursuit steps of the (L0, FVU) curve (None = 2k)."""
    mp_curve_tokens: int = 4096
    """MP-SAE: rows of inputs.x (a seeded random sample) the curve runs on; each step costs a [rows, d_sae] matmul."""

    def __post_init__(self) -> None:
        if self.ce_tokens < 0:
            raise EvalError(f"ce_tokens={self.ce_tokens}; use 0 (skip CE/KL) or a positive number of tokens")
        if self.mp_curve_steps is not None and self.mp_curve_steps < 1:
            raise EvalError(f"mp_curve_steps={self.mp_curve_steps}; use None (= 2k) or an integer >= 1")
        if self.mp_curve_tokens < 2:
            raise EvalError(f"mp_curve_tokens={self.mp_curve_tokens}; use at least 2 rows")
        if self.ablation_positions not in ("kept", "all"):
            raise EvalError(f"ablation_positions={self.ablation_positions!r}; use 'kept' or 'all'")


def measure(inputs: EvalInputs, cfg: CoreConfig = CoreConfig()) -> Section:
    """Sparsity, reconstruction and downstream metrics of `inputs.sae` (see the module docstring)."""
    sae = inputs.sae.eval()
    check_grads(inputs)
    encoded = inputs.encoded()
    metrics: dict[str, Any] = {
        "architecture": sae.cfg.architecture,
        "tokens": len(inputs.x),
        "input_scale": inputs.input_scale,
    }
    metrics |= l0_stats(encoded.l0)
    metrics |= reconstruction(inputs.x, encoded.x_hat)
    metrics |= downstream(inputs, encoded.x_hat, cfg)
    figures = {"l0_hist": l0_figure(metrics)}
    # Architecture-specific metrics come from the rule (MP-SAE's pursuit curve, the batch rules' training budget).
    metrics |= sae.sparsifier.eval_metrics(
        sae, inputs.x, inputs.grad, curve_steps=cfg.mp_curve_steps, curve_tokens=cfg.mp_curve_tokens, seed=inputs.seed
    )
    if "l0_training_target" in metrics:
        metrics["l0_training"] = sae.cfg.metadata.get("training_l0")
    if "mp_curve_fvu" in metrics:
        figures["mp_curve"] = mp_figure(metrics)
    return Section(metrics, figures, summary_lines(metrics))


def check_grads(inputs: EvalInputs) -> None:
    """A gradient-reading SAE (g-SAE) is evaluated with real gradients only."""
    if inputs.sae.sparsifier.uses_grad and inputs.grad is None:
        raise EvalError(
            f"{inputs.sae.cfg.architecture} selects latents with dLoss/dx, but the inputs carry no gradients; "
            "build them with sae_kit.eval.inputs.prepare(), which harvests them for this SAE"
        )


def ratio(num: float, den: float) -> float | None:
    """num/den, or None when den is zero or either is not finite."""
    if den == 0 or not (math.isfinite(num) and math.isfinite(den)):
        return None
    return num / den


# ------------------------------------------------------------------------------------------------- sparsity
def l0_stats(l0: Tensor) -> dict[str, Any]:
    """Mean, std, percentiles and an integer-binned histogram of the per-token L0, exactly, from the count of tokens
    at each L0 (percentiles interpolate linearly between order statistics, as torch.quantile and numpy do)."""
    counts = torch.bincount(l0.long())
    n = int(counts.sum())
    values, c = torch.arange(len(counts), dtype=torch.float64), counts.double()
    mean = float((values * c).sum()) / n
    out: dict[str, Any] = {
        "l0_mean": mean,
        "l0_std": math.sqrt(float(((values - mean).square() * c).sum()) / (n - 1)) if n > 1 else 0.0,
    }
    cumulative = counts.cumsum(0)

    def order_statistic(i: int) -> int:  # the i-th smallest L0 (0-based)
        return int(torch.searchsorted(cumulative, torch.tensor([i]), right=True)[0])

    for p in PERCENTILES:
        rank = p / 100 * (n - 1)
        lo = math.floor(rank)
        a, b = order_statistic(lo), order_statistic(min(lo + 1, n - 1))
        out[f"l0_p{p}"] = a + (rank - lo) * (b - a)
    width = max(1, math.ceil(len(counts) / MAX_L0_BINS))
    binned = F.pad(counts, (0, -len(counts) % width)).view(-1, width).sum(1)
    out["l0_hist_edges"] = [i * width for i in range(len(binned) + 1)]
    out["l0_hist_counts"] = binned.tolist()
    return out


# ------------------------------------------------------------------------------------------- reconstruction
@torch.no_grad()
def reconstruction(x: Tensor, x_hat: Tensor, chunk: int = 16384) -> dict[str, float | None]:
    """MSE, normalised MSE, FVU (sae_kit.heldout.fvu), explained variance, cosine, L2 ratio and relative bias of x̂."""
    per_token: dict[str, list[Tensor]] = {"err": [], "xx": [], "hh": [], "xh": []}
    for xs, hs in zip(x.split(chunk), x_hat.split(chunk)):
        xs, hs = xs.double(), hs.double()
        per_token["err"].append((xs - hs).square().sum(-1))
        per_token["xx"].append(xs.square().sum(-1))
        per_token["hh"].append(hs.square().sum(-1))
        per_token["xh"].append((xs * hs).sum(-1))
    err, xx, hh, xh = (torch.cat(per_token[k]) for k in ("err", "xx", "hh", "xh"))
    tiny = torch.finfo(torch.float64).tiny
    value = fvu(x, x_hat, chunk)
    unexplained = value if math.isfinite(value) else None
    return {
        "mse": float(err.mean()),
        "normalized_mse": float((err / xx.clamp_min(tiny)).mean()),
        "fvu": unexplained,
        "explained_variance": None if unexplained is None else 1 - unexplained,
        "cossim": float((xh / (xx.sqrt() * hh.sqrt()).clamp_min(tiny)).mean()),
        "l2_ratio": float((hh.sqrt() / xx.sqrt().clamp_min(tiny)).mean()),
        "relative_reconstruction_bias": ratio(float(hh.mean()), float(xh.mean())),
    }


# ----------------------------------------------------------------------------------------------- downstream
def downstream(inputs: EvalInputs, x_hat: Tensor, cfg: CoreConfig) -> dict[str, Any]:
    """CE and KL of the LM with x̂, zeros and (optionally) the mean spliced in, against the clean run."""
    runs = ("spliced", "zero", "mean") if cfg.mean_ablation else ("spliced", "zero")
    ce = dict.fromkeys(("clean", *runs), 0.0)
    kl = dict.fromkeys(runs, 0.0)
    positions = spliced = 0
    mean, vocab = inputs.x.mean(0), vocab_size(inputs.model)
    for b, (batch, rows) in enumerate(inputs.batches()):
        if spliced >= cfg.ce_tokens:
            break
        batch = batch.first(cfg.ce_tokens - spliced)
        n = batch.n_kept
        for before, sub in batch.logit_batches(vocab):  # at most LOGIT_CELLS fp32 logits per forward
            edits = {
                "spliced": splice(x_hat[rows.start + before : rows.start + before + sub.n_kept]),
                "zero": fill(torch.zeros_like(mean)),
                "mean": fill(mean),
            }
            ablated = sub.keep if cfg.ablation_positions == "kept" else torch.ones_like(sub.keep)
            clean, _ = run_lm(inputs.model, sub.tokens, inputs.hook)
            ce_clean, mask = next_token_ce(clean, sub.tokens, sub.pad)
            ce["clean"] += float(ce_clean[mask].sum())
            for name in runs:
                # the ablations do not depend on the SAE: once per LM batch for every SAE sharing these inputs
                key = ("ablation", name, cfg.ablation_positions, b, n, before, sub.n_kept, len(sub.tokens))
                if name == "spliced" or key not in inputs.memo:
                    keep = sub.keep if name == "spliced" else ablated
                    logits, _ = run_lm(inputs.model, sub.tokens, inputs.hook, edit=edits[name], keep=keep)
                    result = (
                        float(next_token_ce(logits, sub.tokens, sub.pad)[0][mask].sum()),
                        float(kl_from(clean, logits)[:, :-1][mask].sum()),
                    )
                    del logits
                    if name != "spliced":
                        inputs.memo[key] = result
                else:
                    result = inputs.memo[key]
                ce[name] += result[0]
                kl[name] += result[1]
            positions += int(mask.sum())
            del clean
        spliced += n
    return downstream_metrics(ce, kl, positions, spliced, cfg)


def downstream_metrics(
    ce: dict[str, float], kl: dict[str, float], positions: int, spliced: int, cfg: CoreConfig
) -> dict[str, Any]:
    """Means and scores from the summed CE/KL of each run (None where a run did not happen)."""
    ce_mean = {name: total / positions if positions else None for name, total in ce.items()}
    kl_mean = {name: total / positions if positions else None for name, total in kl.items()}
    clean, sae, zero, mean_abl = (ce_mean.get(name) for name in ("clean", "spliced", "zero", "mean"))

    def recovered(ablated: float | None) -> float | None:
        return None if ablated is None or clean is None or sae is None else ratio(ablated - sae, ablated - clean)

    kl_zero, kl_sae = kl_mean.get("zero"), kl_mean.get("spliced")
    return {
        "ce_tokens": spliced,
        "ce_positions": positions,
        "ablation_positions": cfg.ablation_positions,
        "ce_clean": clean,
        "ce_spliced": sae,
        "ce_zero_ablation": zero,
        "ce_mean_ablation": mean_abl,
        "ce_loss_recovered": recovered(zero),
        "ce_loss_recovered_mean": recovered(mean_abl),
        "delta_ce": None if clean is None or sae is None else sae - clean,
        "kl_spliced": kl_sae,
        "kl_zero": kl_zero,
        "kl_mean": kl_mean.get("mean"),
        "kl_score": None if kl_zero is None or kl_sae is None else ratio(kl_zero - kl_sae, kl_zero),
    }


# -------------------------------------------------------------------------------------------------- output
def l0_figure(metrics: dict[str, Any]) -> go.Figure:
    """Tokens per L0 bin."""
    edges, counts = metrics["l0_hist_edges"], metrics["l0_hist_counts"]
    width = edges[1] - edges[0]
    fig = go.Figure(go.Bar(x=[e + width / 2 for e in edges[:-1]], y=counts, width=width, name="tokens"))
    fig.update_layout(
        title=f"L0 per token (mean {metrics['l0_mean']:.1f}, {metrics['tokens']} tokens)",
        xaxis_title="L0 (active latents)",
        yaxis_title="tokens",
        bargap=0.05,
    )
    return fig


def mp_figure(metrics: dict[str, Any]) -> go.Figure:
    """MP-SAE: FVU against mean L0 along the pursuit, with the eval-mode (adaptive stopping) point."""
    fig = go.Figure(
        go.Scatter(
            x=metrics["mp_curve_l0"],
            y=metrics["mp_curve_fvu"],
            mode="lines+markers",
            name=f"fixed steps ({metrics['mp_curve_tokens']} tokens)",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[metrics["l0_mean"]],
            y=[metrics["fvu"]],
            mode="markers",
            marker={"size": 12, "symbol": "star"},
            name="eval mode (adaptive stopping)",
        )
    )
    fig.update_layout(title="MP-SAE: FVU along the pursuit", xaxis_title="mean L0", yaxis_title="FVU", yaxis_type="log")
    return fig


def summary_lines(m: dict[str, Any]) -> list[str]:
    """Two or three short lines for stdout."""
    cos = "n/a" if m["cossim"] is None else f"{m['cossim']:.3f}"
    line = f"core: FVU {fmt(m['fvu'])}  L0 {m['l0_mean']:.1f}  cos {cos}"
    if m["ce_clean"] is not None:
        line += (
            f"  CE clean {m['ce_clean']:.3f} → SAE {m['ce_spliced']:.3f} (recovered {fmt(m['ce_loss_recovered'])} against "
            f"ablating {'every position' if m['ablation_positions'] == 'all' else 'the kept positions'}, "
            f"ΔCE {m['delta_ce']:.3f}, KL {m['kl_spliced']:.3f})"
        )
    lines = [line]
    if "l0_training_target" in m:
        trained = "" if m["l0_training"] is None else f", training L0 {m['l0_training']:.1f}"
        lines.append(
            f"core: inference L0 {m['l0_mean']:.1f} with learned thresholds "
            f"(training target k={m['l0_training_target']}{trained})"
        )
    if "mp_curve_fvu" in m:
        l0, fvu = m["mp_curve_l0"], m["mp_curve_fvu"]
        lines.append(
            f"core: MP curve FVU {fvu[0]:.3f} at L0 {l0[0]:.1f} → {fvu[-1]:.3f} at L0 {l0[-1]:.1f} "
            f"(at k: {fmt(m['mp_fvu_at_k'])})"
        )
    if m["input_scale"] is not None:
        lines.append(
            f"core: the SAE expects normalised inputs; scale {m['input_scale']:.4g} = sqrt(d_in)/E||x|| on held-out tokens folded in"
        )
    return lines


def fmt(value: float | None) -> str:
    """A metric with three decimals, or n/a."""
    return "n/a" if value is None else f"{value:.3f}"
