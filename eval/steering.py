"""Steering: how far adding a feature's decoder atom to the residual stream pushes the LM toward the tokens the atom
writes, at what cost in KL from the clean model; a difference-in-means (DiM) baseline; a generated-text example.

Protocol (the g-SAE paper's "steering in arbitrary contexts", with the AbsTopK paper's signs and DiM baseline; every
choice the papers leave open is marked "our choice"):

1. Sample `n_features` live features (those that fire at least once on `inputs.x`), seeded by `inputs.seed`.
2. A feature's unit of α is its max |activation| over `inputs.x` times ‖d_i‖ (atoms are unit-norm in sae-kit). Our
   choice: the max, not a high percentile; over a few thousand tokens the 99.9th percentile of a feature rarer than
   0.1% is zero.
3. Target tokens T_i: the `top_tokens` tokens of the logit lens of d_i (sae_kit.heldout.logit_lens: the final norm's
   weight applied, its data-dependent scale not; our choice, see there).
4. On `contexts` held-out contexts (the first rows of `inputs.contexts`: text unrelated to the feature), add α·unit·d̂_i
   at every kept position (`positions="all"`, our choice) in one batched forward per (feature, α), and average over
   the same positions the increase of Σ_{t∈T_i} p(t) (Δmass) and KL(clean ‖ steered).
5. Signed SAEs (a feature takes negative values on `inputs.x`: abstopk, or mpsae with mp_signed) are also steered
   along −d̂_i, targeting the feature's bottom lens tokens (most negative d̂_i·W_U).
6. Steering-effectiveness score (our choice): per feature, the largest Δmass over α ∈ {0} ∪ `alphas` (and both signs
   for signed SAEs) whose mean KL stays within `kl_budget`; the SAE's score is the mean over the sampled features.
   The Δmass and KL curves over α are reported too (the fixed-α view).
7. DiM: v = mean activation over the kept positions (the SAE's own rule) of `contrast_positive` − that of
   `contrast_negative`. Its
   targets are the positive set's characteristic tokens: those in some positive prompt and in no negative one (our
   choice; at an early layer the lens tokens of v are mostly noise, and with parallel sentences this set is exactly
   the positive words). v̂ is steered with norms α·‖v‖; the feature whose atom has the highest cosine with v (highest
   |cosine| for signed SAEs, steered with that sign) is steered with the same norms toward the same tokens (our
   choice), so the two curves differ only in direction, and both get the score of step 6.
8. Text: greedy continuations of `generate_prompt`, clean and with `generate_alpha`·unit·d̂ added at every
   position the SAE's rule keeps (prompt and generated tokens alike; by default not BOS, special tokens or position 0).

Cost: one LM forward over `contexts` rows per (feature, α, sign). The defaults (16 features × 4 α × 4 contexts)
make 64 forwards plus 8 for DiM and 48 short ones for the text: about 1.5 min for 128-token contexts of
SmolLM2-135M on 2 CPU cores (2 min or more when the cores are shared; the feature forwards double for signed SAEs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
import torch
from torch import Tensor

from sae_kit.activations import HarvestConfig
from sae_kit.eval.inputs import EvalError, EvalInputs, Section
from sae_kit.heldout import (
    MAX_CELLS,
    HeldoutContexts,
    atoms,
    generate,
    kl_from,
    logit_lens,
    mean_activation,
    position_chunks,
    row_chunks,
    run_lm,
    steer_edit,
    steering_units,
)

POSITIVE = (
    "I love this movie, it was wonderful.",
    "What a beautiful, happy day!",
    "The food was delicious and the staff were kind.",
    "She was thrilled with the excellent results.",
    "This is the best gift I have ever received.",
    "We had a fantastic time at the party.",
    "The team did a great job and everyone is delighted.",
    "I feel so grateful and joyful today.",
)
NEGATIVE = (
    "I hate this movie, it was awful.",
    "What a miserable, sad day!",
    "The food was disgusting and the staff were rude.",
    "She was upset with the terrible results.",
    "This is the worst gift I have ever received.",
    "We had a horrible time at the party.",
    "The team did a poor job and everyone is disappointed.",
    "I feel so angry and miserable today.",
)


@dataclass
class SteeringConfig:
    """What `measure` steers, where, and how hard."""

    n_features: int = 16
    """Live features to sample (seeded by inputs.seed); all live ones when fewer."""
    alphas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    """Steering strengths, in multiples of each feature's max |activation| over inputs.x (of ‖v‖ for DiM)."""
    top_tokens: int = 10
    """|T_i|: logit-lens tokens whose probability mass is measured."""
    contexts: int = 4
    """Held-out contexts (the first rows of inputs.contexts) to steer on, in LM batches of the eval's size."""
    positions: str = "all"
    """Where the vector is added and the effect measured: "all" kept positions of each context (the only mode)."""
    kl_budget: float = 1.0
    """Mean KL(clean ‖ steered) in nats per position above which an α does not count toward the score."""
    generate_feature: int | None = None
    """Feature for the text comparison; None = the sampled feature with the highest score (on its better sign)."""
    generate_prompt: str = "I think the new restaurant downtown is"
    """Prompt continued greedily, clean and steered."""
    generate_tokens: int = 24
    """Tokens to generate (fewer if the LM emits end-of-sequence)."""
    generate_alpha: float = 4.0
    """Steering strength of the text comparison, in units of the feature's max |activation|; negative steers along
    −d_i (the automatic choice flips it when the feature scored on its negative side)."""
    contrast_positive: tuple[str, ...] = POSITIVE
    """Prompts whose mean activation is the + side of the DiM vector (default: positive sentiment)."""
    contrast_negative: tuple[str, ...] = NEGATIVE
    """Prompts whose mean activation is the − side of the DiM vector (default: the matching negative sentences)."""

    def __post_init__(self) -> None:
        if self.positions != "all":
            raise EvalError(
                f"SteeringConfig.positions={self.positions!r}; only 'all' (every kept position) is supported"
            )
        if self.n_features < 1 or self.top_tokens < 1 or self.contexts < 1 or not self.alphas:
            raise EvalError("SteeringConfig: n_features, top_tokens and contexts must be >= 1, and alphas non-empty")
        if not self.contrast_positive or not self.contrast_negative:
            raise EvalError("SteeringConfig: give at least one prompt in contrast_positive and in contrast_negative")


# ------------------------------------------------------------------------------------------------------ pure helpers
def token_mass_increase(
    model,
    inputs: EvalInputs,
    direction: Tensor,
    alpha: float,
    token_ids: Tensor,
    contexts: int = SteeringConfig.contexts,
) -> tuple[float, float]:
    """(mean increase of the next-token probability mass on `token_ids`, mean KL(clean ‖ steered)) over the kept
    positions of the first `contexts` held-out contexts, with alpha·direction added at each of them."""
    return _Probe.on(model, inputs, contexts).effect(direction, alpha, token_ids)


def dim_vector(model, data: HarvestConfig, positive: tuple[str, ...], negative: tuple[str, ...]) -> Tensor:
    """Difference in means [d_in]: mean activation at the SAE's hook over the positions its rule keeps (`data`, e.g.
    EvalInputs.data) of `positive` minus `negative`."""
    return mean_activation(model, data, positive) - mean_activation(model, data, negative)


def contrast_tokens(model, positive: tuple[str, ...], negative: tuple[str, ...]) -> Tensor:
    """Token ids [n] that occur in some `positive` prompt and in no `negative` one (special tokens excluded)."""

    def ids(prompts: tuple[str, ...]) -> set[int]:
        return {int(i) for p in prompts for i in model.to_tokens(p)[0]}

    chosen = ids(positive) - ids(negative) - set(model.tokenizer.all_special_ids)
    if not chosen:
        raise EvalError(
            "every token of the positive contrast prompts also occurs in the negative ones; use contrasting prompts"
        )
    return torch.tensor(sorted(chosen))


def budgeted_best(delta_mass: list[float], kl: list[float], budget: float) -> float:
    """The largest Δmass over α ∈ {0} ∪ alphas (α = 0: Δmass 0, KL 0) among those whose KL ≤ budget."""
    return max([0.0, *(m for m, k in zip(delta_mass, kl) if k <= budget)])


# ------------------------------------------------------------------------------------------------------ internals
@dataclass
class _Probe:
    """The steering contexts and their clean next-token log-probabilities at the kept positions."""

    model: Any
    hook: str
    batches: list[HeldoutContexts]
    clean: list[Tensor]

    @classmethod
    def on(cls, model, inputs: EvalInputs, contexts: int) -> _Probe:
        rows = inputs.contexts.rows(0, contexts)
        if rows.n_kept == 0:
            raise EvalError("the steering contexts have no kept positions; raise SteeringConfig.contexts")
        batches = list(rows.batches(inputs.data.lm_batch_size))
        clean = [cls._log_probs(run_lm(model, b.tokens, inputs.hook)[0], b) for b in batches]
        return cls(model, inputs.hook, batches, clean)

    @staticmethod
    def _log_probs(logits: Tensor, batch: HeldoutContexts) -> Tensor:
        """Log-probabilities [n_kept, vocab] (fp32) at the kept positions, normalised in bounded position chunks."""
        flat, where = _kept_rows(logits, batch)
        out = torch.empty(len(where), logits.shape[-1], device=logits.device)
        for rows in position_chunks(len(where), logits.shape[-1]):
            out[rows] = flat.index_select(0, where[rows]).float().log_softmax(-1)
        return out

    def effect(self, direction: Tensor, alpha: float, token_ids: Tensor) -> tuple[float, float]:
        """(mean Δmass on token_ids, mean KL(clean ‖ steered)) with alpha·direction added at the kept positions."""
        d_mass = kl = 0.0
        n = 0
        for batch, clean in zip(self.batches, self.clean):
            logits, _ = run_lm(self.model, batch.tokens, self.hook, edit=steer_edit(direction, alpha), keep=batch.keep)
            flat, where = _kept_rows(logits, batch)
            ids = token_ids.to(logits.device)
            for rows in position_chunks(len(where), logits.shape[-1]):  # never a second [n_kept, vocab] copy
                steered = flat.index_select(0, where[rows]).float().log_softmax(-1)
                base = clean[rows]
                d_mass += float((steered[:, ids].exp().sum(-1) - base[:, ids].exp().sum(-1)).sum())
                kl += float(kl_from(base, steered).sum())
            n += len(clean)
            del logits
        return d_mass / n, kl / n

    def curve(
        self, direction: Tensor, unit: float, alphas: tuple[float, ...], token_ids: Tensor
    ) -> tuple[list[float], list[float]]:
        """(Δmass per α, KL per α) steering with alpha·unit·direction."""
        points = [self.effect(direction, a * unit, token_ids) for a in alphas]
        return [p[0] for p in points], [p[1] for p in points]


# ------------------------------------------------------------------------------------------------------ measure
def measure(inputs: EvalInputs, cfg: SteeringConfig = SteeringConfig()) -> Section:
    """Steering curves and score of a sample of live features, the DiM baseline and a text comparison."""
    encoded = inputs.encoded()
    max_act, signed = encoded.max_abs, encoded.signed
    live = (max_act > 0).nonzero().squeeze(1)
    if len(live) == 0:
        raise EvalError("no feature fires on the evaluation tokens, so none can be steered")
    chosen = cfg.generate_feature
    if chosen is not None and not (0 <= chosen < inputs.sae.cfg.d_sae and max_act[chosen] > 0):
        raise EvalError(
            f"generate_feature={chosen} is not a live feature of this SAE; pick one that fires on the evaluation tokens"
        )
    pick = torch.randperm(len(live), generator=torch.Generator().manual_seed(inputs.seed))[: cfg.n_features]
    features = live[pick].sort().values
    directions, units = _atoms(inputs, features, max_act)
    probe = _Probe.on(inputs.model, inputs, cfg.contexts)
    metrics, side_scores = _feature_curves(inputs, cfg, probe, features, directions, units, signed)
    metrics["dim"] = _dim(inputs, cfg, probe, signed, max_act)
    metrics["generation"] = _generation(inputs, cfg, features, side_scores, max_act)
    return Section(metrics, _figures(metrics), _lines(metrics))


def _atoms(inputs: EvalInputs, features: Tensor, max_act: Tensor) -> tuple[Tensor, Tensor]:
    """(unit directions d̂_i [n, d_in], units of α = max |activation|·‖d_i‖ [n]) of `features` (heldout.steering_units)."""
    return steering_units(inputs.sae.W_dec, features, max_act)


def closest_atom(W_dec: Tensor, v_hat: Tensor, signed: bool, max_cells: int = MAX_CELLS) -> tuple[int, float]:
    """(index, cosine) of the decoder row with the highest cosine with v̂ (highest |cosine| when `signed`), computed
    on the decoder's device in blocks of rows holding at most `max_cells` entries in fp32 (no full-size copy)."""
    W = W_dec.detach()
    v = v_hat.to(W.device, torch.float32)
    cos = torch.empty(len(W), device=W.device)
    for rows in row_chunks(len(W), W.shape[1], max_cells):
        block = W[rows].float()
        cos[rows] = (block @ v) / block.norm(dim=-1)
    best = int((cos.abs() if signed else cos).argmax())
    return best, float(cos[best])


def _feature_curves(
    inputs: EvalInputs,
    cfg: SteeringConfig,
    probe: _Probe,
    features: Tensor,
    directions: Tensor,
    units: Tensor,
    signed: bool,
) -> tuple[dict[str, Any], Tensor]:
    """(the features' metrics: curves per side, per-feature and SAE scores; scores per feature and side [n, sides])."""
    lens = logit_lens(inputs.model, directions)
    sides = [("", 1.0, lens.topk(cfg.top_tokens).indices)]
    if signed:
        sides.append(("_negative", -1.0, (-lens).topk(cfg.top_tokens).indices))
    metrics: dict[str, Any] = {
        "features": features.tolist(),
        "alphas": list(cfg.alphas),
        "kl_budget": cfg.kl_budget,
        "signed": signed,
        "contexts": sum(len(b.tokens) for b in probe.batches),
        "positions": sum(len(c) for c in probe.clean),
        "max_activation": units.tolist(),
    }
    side_scores = torch.zeros(len(features), len(sides))
    for s, (suffix, sign, targets) in enumerate(sides):
        curves = [
            probe.curve(sign * directions[j], float(units[j]), cfg.alphas, targets[j]) for j in range(len(features))
        ]
        metrics["target_tokens" + suffix] = [_decode(inputs.model, t) for t in targets]
        metrics["delta_mass" + suffix] = [m for m, _ in curves]
        metrics["kl" + suffix] = [k for _, k in curves]
        metrics["mean_delta_mass" + suffix] = torch.tensor(metrics["delta_mass" + suffix]).mean(0).tolist()
        metrics["mean_kl" + suffix] = torch.tensor(metrics["kl" + suffix]).mean(0).tolist()
        side_scores[:, s] = torch.tensor([budgeted_best(m, k, cfg.kl_budget) for m, k in curves])
    metrics["feature_score"] = side_scores.max(1).values.tolist()
    metrics["score"] = float(side_scores.max(1).values.mean())
    for s, (suffix, _, _) in enumerate(sides):  # each sign alone: steering along +d_i, and along -d_i when signed
        metrics["score" + (suffix or "_positive")] = float(side_scores[:, s].mean())
    return metrics, side_scores


def _dim(inputs: EvalInputs, cfg: SteeringConfig, probe: _Probe, signed: bool, max_act: Tensor) -> dict[str, Any]:
    """The DiM vector's curve and score, and those of the closest feature steered with the same norms and targets."""
    model = inputs.model
    v = dim_vector(model, inputs.data, cfg.contrast_positive, cfg.contrast_negative)
    norm = float(v.norm())
    v_hat = v / norm
    targets = contrast_tokens(model, cfg.contrast_positive, cfg.contrast_negative)
    closest, cosine = closest_atom(inputs.sae.W_dec, v_hat, signed)
    sign = 1.0 if cosine >= 0 or not signed else -1.0
    d_closest = sign * atoms(inputs.sae.W_dec, torch.tensor([closest]))[0][0]
    dim_mass, dim_kl = probe.curve(v_hat, norm, cfg.alphas, targets)
    feat_mass, feat_kl = probe.curve(d_closest, norm, cfg.alphas, targets)
    return {
        "norm": norm,
        "target_tokens": _decode(model, targets),
        "delta_mass": dim_mass,
        "kl": dim_kl,
        "score": budgeted_best(dim_mass, dim_kl, cfg.kl_budget),
        "closest_feature": closest,
        "closest_cosine": cosine,
        "closest_live": bool(max_act[closest] > 0),
        "closest_delta_mass": feat_mass,
        "closest_kl": feat_kl,
        "closest_score": budgeted_best(feat_mass, feat_kl, cfg.kl_budget),
    }


def _generation(
    inputs: EvalInputs, cfg: SteeringConfig, features: Tensor, side_scores: Tensor, max_act: Tensor
) -> dict[str, Any]:
    """Greedy text, clean and steered, for cfg.generate_feature or the best-scoring sampled feature (on its better side)."""
    feature, alpha = cfg.generate_feature, cfg.generate_alpha
    if feature is None:
        j, side = divmod(int(side_scores.argmax()), side_scores.shape[1])
        feature, alpha = int(features[j]), (-alpha if side == 1 else alpha)
    direction, unit = _atoms(inputs, torch.tensor([feature]), max_act)
    edit = steer_edit(direction[0], alpha * float(unit[0]))
    return {
        "feature": feature,
        "alpha": alpha,
        "prompt": cfg.generate_prompt,
        "clean": generate(inputs.model, inputs.data, cfg.generate_prompt, cfg.generate_tokens),
        "steered": generate(inputs.model, inputs.data, cfg.generate_prompt, cfg.generate_tokens, edit),
    }


def _kept_rows(logits: Tensor, batch: HeldoutContexts) -> tuple[Tensor, Tensor]:
    """(logits viewed as [R·T, vocab], the flat indices of the kept positions, row-major)."""
    return logits.reshape(-1, logits.shape[-1]), batch.keep.to(logits.device).flatten().nonzero().squeeze(1)


def _decode(model, ids: Tensor) -> list[str]:
    """Each token id as its string."""
    return [model.tokenizer.decode([int(i)]) for i in ids]


def _figures(metrics: dict[str, Any]) -> dict[str, go.Figure]:
    """Δmass and KL against signed α (mean and the first five features), and DiM against its closest feature."""
    figs = {}
    sides = [("", 1)] + ([("_negative", -1)] if metrics["signed"] else [])
    for key, title in (("delta_mass", "Δ probability mass on the target tokens"), ("kl", "KL(clean ‖ steered), nats")):
        fig = go.Figure()
        for suffix, sign in sides:
            xs = [sign * a for a in metrics["alphas"]]
            for feature, ys in list(zip(metrics["features"], metrics[key + suffix]))[:5]:
                fig.add_scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    line={"width": 1},
                    opacity=0.5,
                    name=f"feature {feature}",
                    legendgroup=str(feature),
                    showlegend=sign > 0,
                )
            fig.add_scatter(
                x=xs,
                y=metrics["mean_" + key + suffix],
                mode="lines+markers",
                line={"width": 3, "color": "black"},
                name="mean" + (" (−α)" if sign < 0 else ""),
            )
        fig.update_layout(
            title=f"Steering: {title}", xaxis_title="α (× the feature's max |activation|)", yaxis_title=key
        )
        figs[f"steering_{key}"] = fig
    dim, fig = metrics["dim"], go.Figure()
    fig.add_scatter(x=metrics["alphas"], y=dim["delta_mass"], mode="lines+markers", name="DiM vector")
    fig.add_scatter(
        x=metrics["alphas"],
        y=dim["closest_delta_mass"],
        mode="lines+markers",
        name=f"feature {dim['closest_feature']} (cos {dim['closest_cosine']:.2f})",
    )
    fig.update_layout(
        title="Steering toward the positive contrast prompts' tokens", xaxis_title="α (× ‖v‖)", yaxis_title="Δ mass"
    )
    figs["steering_dim"] = fig
    return figs


def _lines(metrics: dict[str, Any]) -> list[str]:
    """The stdout summary: score and mean curves, DiM against its closest feature, the steered text."""
    curve = "/".join(f"{m:+.4f}" for m in metrics["mean_delta_mass"])
    kls = "/".join(f"{k:.2f}" for k in metrics["mean_kl"])
    alphas = "/".join(f"{a:g}" for a in metrics["alphas"])
    dim, gen = metrics["dim"], metrics["generation"]
    lines = [
        f"steering: score {metrics['score']:.4f} over {len(metrics['features'])} live features (best Δmass with KL ≤ "
        f"{metrics['kl_budget']:g}); α={alphas}: Δmass {curve}, KL {kls}"
    ]
    if metrics["signed"]:
        lines.append("steering −α: Δmass " + "/".join(f"{m:+.4f}" for m in metrics["mean_delta_mass_negative"]))
    lines.append(
        f"steering: DiM vector score {dim['score']:.4f} → closest feature {dim['closest_feature']} "
        f"(cos {dim['closest_cosine']:.2f}) score {dim['closest_score']:.4f}"
    )
    lines.append(
        f"steering text, feature {gen['feature']} at α={gen['alpha']:g}: {gen['steered']!r} (clean: {gen['clean']!r})"
    )
    return lines
