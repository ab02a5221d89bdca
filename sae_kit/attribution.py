"""Which SAE features drive a prediction: attribution patching, checked by exact ablation, and each token's strongest
features with their explanations.

    import sae_kit
    model = sae_kit.load_model()
    sae = sae_kit.load_sae("runs/topk-k32/sae")
    metric = sae_kit.logit_diff(model, " Paris", " London")          # or sae_kit.loss_at(-1)
    att = sae_kit.attribute(model, sae, "The Eiffel Tower is in the city of", metric)
    att.table.head(10)        # feature, activation, attribution, exact (top 10 by |attribution|), explanation
    att.figure()              # attribution against exact ablation
    att.agreement()           # sign agreement and Spearman rank correlation of the two
    sae_kit.top_features(model, "runs/topk-k32", "The Eiffel Tower")  # per token, the 5 strongest features

attribution(i) = Σ_t f_i,t · (d_i · ∂metric/∂x_t), summed over the positions the SAE reads (its own position rule, as
eval uses it): the first-order (attribution-patching) estimate of metric(clean) − metric(feature i ablated), where the
ablation keeps the SAE's error term, so the clean forward is the model's own and ablating feature i subtracts exactly
f_i,t · d_i from the hook's activations. It costs one forward with a gradient at the hook and one backward for every
feature at once. `exact` is that difference measured, by a forward with the feature ablated
(`heldout.feature_edit(sae, {i: 0.0})`), for the `exact_top` features of largest |attribution|.

Measured on SmolLM2-135M (blocks.6.hook_resid_post, a TopK SAE with 4608 latents, k 32, trained on 131k tokens;
tests/test_attribution.py), a logit difference on three real prompts: over each prompt's top 10 features the signs
agree on 9, 10 and 8 of 10 and the Spearman rank correlations of attribution and exact are 0.79, 0.94 and 0.67
(means 0.90 and 0.80; the test asserts ≥ 0.75 and ≥ 0.55, which a flipped sign, the gradient one position off or
activations without the decoder·gradient factor all fail). The estimate is weakest on features of positions with
massive activations (SmolLM2's residual norm reaches ~700 on some tokens, ~100 elsewhere): there the ablation is far
from linear, so read `exact` for those.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from sae_kit import heldout
from sae_kit.errors import SaeKitError
from sae_kit.sae import SAE

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

Metric = Callable[[Tensor, Tensor], Tensor]
"""metric(logits [1, T, vocab] (fp32; fp64 for a float64 model), tokens [1, T]) -> a 0-dim tensor, differentiable in
the logits: what `attribute` explains (`logit_diff`, `loss_at`, or your own)."""


class AttributionError(SaeKitError):
    """An attribution or top-features request that cannot run as asked (empty text, bad metric, position or feature)."""


# ------------------------------------------------------------------------------------------------ metrics
def _token_id(model, token: str | int, role: str) -> int:
    vocab = heldout.vocab_size(model)
    if isinstance(token, bool) or not isinstance(token, (str, int)):
        raise AttributionError(f"{role}={token!r}; pass a token string such as ' Paris' or a token id")
    if isinstance(token, int):
        if not 0 <= token < vocab:
            raise AttributionError(f"{role}={token} is out of range: token ids are 0..{vocab - 1}")
        return token
    ids = model.tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise AttributionError(
            f"{role}={token!r} is {len(ids)} tokens {pieces}; pass a single token (mind the leading space: ' Paris')"
        )
    return int(ids[0])


def _position(position: int, n: float, what: str) -> int:
    """`position` (negative counts from the end) as an index in [0, n), or a one-line error."""
    if isinstance(position, bool) or not isinstance(position, int):
        raise AttributionError(f"position={position!r}; pass an integer token position (negative counts from the end)")
    if math.isinf(n):
        return position
    p = position + int(n) if position < 0 else position
    if not 0 <= p < n:
        raise AttributionError(f"position {position} is out of range: {what} 0..{int(n) - 1} (or -1..-{int(n)})")
    return p


def logit_diff(model, good: str | int, bad: str | int, position: int = -1) -> Metric:
    """The metric logit[good] − logit[bad] at token `position` (default: the last, the next-token prediction).

    `good` and `bad` are single tokens, as strings (" Paris", with its leading space) or token ids. Attribution then
    says which features push the prediction towards `good` and away from `bad`.
    """
    g, b = _token_id(model, good, "good"), _token_id(model, bad, "bad")
    _position(position, math.inf, "")  # the type now; the range against each prompt

    def metric(logits: Tensor, tokens: Tensor) -> Tensor:  # noqa: ARG001 (the Metric signature)
        p = _position(position, logits.shape[1], "the prompt has token positions")
        return logits[0, p, g] - logits[0, p, b]

    metric.__doc__ = f"logit[{g}] - logit[{b}] at position {position}"
    return metric


def loss_at(position: int = -1) -> Metric:
    """The metric: next-token cross-entropy of the prediction made at token `position`, i.e. of tokens[position + 1].

    Positions index the prompt's T tokens as the logits do (negative ones count from the end). The last token predicts
    nothing inside the prompt, so the default -1 means the last prediction (position T-2, of the last token), as -2
    does; 0..T-2 are the others. Attribution estimates metric(clean) − metric(ablated), so a feature that helps the
    prediction (its ablation raises the loss) has a negative attribution.
    """
    _position(position, math.inf, "")  # the type now; the range against each prompt

    def metric(logits: Tensor, tokens: Tensor) -> Tensor:
        T = logits.shape[1]
        p = T - 2 if position == -1 else position + T if position < 0 else position
        if not 0 <= p < T - 1:
            raise AttributionError(
                f"position {position} is out of range: the prompt of {T} tokens has predictions at positions "
                f"0..{T - 2} (or -{T}..-2; -1 is the last prediction)"
            )
        return torch.nn.functional.cross_entropy(logits[0, p], tokens[0, p + 1].to(logits.device))

    metric.__doc__ = f"next-token cross-entropy of the prediction at position {position}"
    return metric


# ------------------------------------------------------------------------------------------------ SAE, prompt, index
def _open(sae: SAE | str | Path, index: str | Path | None) -> tuple[SAE, dict[int, str] | None]:
    """The SAE (loaded when given as a directory) and its explanations {feature: text} (None without any)."""
    from sae_kit import rundir
    from sae_kit.sae_io import load_sae

    located: rundir.Located | None = None
    if not isinstance(sae, SAE):
        if not isinstance(sae, (str, Path)):
            raise AttributionError(f"sae is a {type(sae).__name__}; pass an SAE (sae_kit.load_sae) or its directory")
        found = rundir.resolve([Path(sae)])
        if len(found) != 1:
            raise AttributionError(
                f"{sae} holds {len(found)} SAEs ({', '.join(f.name for f in found)}); pass one member's directory"
            )
        located = found[0]
        sae = load_sae(located.sae_dir)
    sae.eval()
    if sae.cfg.normalize_activations != "none":
        raise AttributionError(
            "this SAE expects normalised inputs; fold the scale in first: "
            "sae_kit.heldout.fold_input_scale(model, sae, sae_kit.heldout.harvest_config_for(sae))"
        )
    if index is not None:
        return sae, _explanations(_index_dir(Path(index)), sae, required=True)
    if located is not None:
        return sae, _explanations(located.index_dir, sae, required=False)
    return sae, None


def _index_dir(path: Path) -> Path:
    """An index directory, or the index/ of the run directory `path` names."""
    from sae_kit import rundir
    from sae_kit.autointerp.store import DIR

    if (path / "index.json").is_file() or (path / DIR).is_dir():
        return path
    found = rundir.find(path) if path.is_dir() else []
    if len(found) == 1 and found[0].index_dir.is_dir():
        return found[0].index_dir
    raise AttributionError(
        f"{path} holds no feature index; pass the index/ folder of the SAE's run (build it: sae-kit index <run>)"
    )


def _explanations(index_dir: Path, sae: SAE, required: bool) -> dict[int, str] | None:
    """{feature: explanation} from the autointerp results in `index_dir` (None when there are none)."""
    import json

    from sae_kit.autointerp.store import Results

    meta = index_dir / "index.json"
    if meta.is_file():
        try:
            d_sae = json.loads(meta.read_text())["sae"]["d_sae"]
        except (OSError, ValueError, KeyError, TypeError):
            d_sae = None
        if d_sae is not None and d_sae != sae.cfg.d_sae:
            raise AttributionError(
                f"the index in {index_dir} describes an SAE with {d_sae} latents, not this one ({sae.cfg.d_sae}); "
                "pass the index of this SAE's run"
            )
    results = Results(index_dir)
    if not results.has_explanations:
        if required and not meta.is_file():
            raise AttributionError(f"{index_dir} holds no feature index or explanations; pass the run's index/ folder")
        return None
    df = results.explanations
    df = df[df["ok"].fillna(False).astype(bool) & df["explanation"].notna()]
    return {int(f): str(e) for f, e in zip(df["feature"], df["explanation"])}


@dataclass
class _Prompt:
    tokens: Tensor
    """[1, T] token ids."""
    keep: Tensor
    """[1, T] positions the SAE reads."""
    strings: list[str]
    """The T tokens as text."""


def _prompt(model, sae: SAE, text: str) -> tuple[heldout.HarvestConfig, _Prompt]:
    if not isinstance(text, str) or not text.strip():
        raise AttributionError(f"text={text!r} is empty; pass a prompt, e.g. 'The Eiffel Tower is in the city of'")
    cfg = heldout.harvest_config_for(sae)
    heldout.check_pair(model, sae, cfg.hook[0])
    tokens, keep = heldout.prompt_tokens(model, cfg, text)
    if not bool(keep.any()):
        raise AttributionError(
            f"the SAE reads none of the {tokens.shape[1]} positions of {text!r} (its rule skips position 0 and special "
            "tokens); pass a longer prompt"
        )
    strings = [model.tokenizer.decode([int(t)]) for t in tokens[0]]
    return cfg, _Prompt(tokens, keep, strings)


def _codes(model, sae: SAE, cfg: heldout.HarvestConfig, prompt: _Prompt, acts: Tensor | None = None):
    """(positions [n] of the kept tokens, their activations [n, d_in], codes) of the prompt."""
    hook = cfg.hook[0]
    grad = None
    if acts is None or sae.sparsifier.uses_grad:  # rules that read ∂CE/∂x get it as in training
        got, grads = heldout.harvester_for(model, cfg, with_grads=sae.sparsifier.uses_grad).run(prompt.tokens)
        acts = got[hook] if acts is None else acts
        grad = None if grads is None else grads[hook][0][prompt.keep[0].to(grads[hook].device)]
    where = prompt.keep[0].nonzero().squeeze(1)
    x = acts[0][prompt.keep[0].to(acts.device)]
    device = sae.W_dec.device
    with torch.no_grad():
        codes = sae.forward_codes(x.to(device), None if grad is None else grad.to(device))
    return where, x, codes


# ------------------------------------------------------------------------------------------------ attribution
@dataclass
class Attribution:
    """What `attribute` found for one prompt and metric.

    `table` has one row per feature active anywhere on the prompt, sorted by |attribution|: `feature`, `activation`
    (Σ_t f_i,t over the positions the SAE reads), `max_activation` (the largest |f_i,t|, signed), `positions` (how
    many positions it is active on), `attribution` (the estimate of metric(clean) − metric(ablated)), `exact` (that
    difference measured; NaN beyond the `exact_top` largest |attribution|) and `explanation` (from the index;
    missing (NaN) without one). `per_position` splits every attribution over positions: `feature`, `position`, `token`,
    `activation`, `attribution`.
    """

    table: pd.DataFrame
    """One row per active feature (see the class docstring), largest |attribution| first."""
    per_position: pd.DataFrame
    """One row per (feature, position) where the feature is active: feature, position, token, activation, attribution."""
    clean: float
    """The metric on the unedited prompt (the model's own forward)."""
    text: str
    """The prompt."""
    tokens: list[str] = field(default_factory=list)
    """The prompt's tokens as text (BOS included when the SAE's rule prepends it)."""
    d_sae: int = 0
    """The SAE's number of latents."""

    def feature(self, i: int) -> pd.DataFrame:
        """Feature `i`'s activation and attribution at each position where it is active (empty if it is silent)."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.d_sae:
            raise AttributionError(
                f"feature {i!r} is out of range: this SAE has d_sae={self.d_sae} latents (ids 0..{self.d_sae - 1})"
            )
        return self.per_position[self.per_position["feature"] == i].reset_index(drop=True)

    def agreement(self) -> dict[str, float]:
        """How well attribution predicts exact ablation over the features with an exact value: `n` (how many),
        `sign_agreement` (the fraction whose signs agree) and `spearman` (rank correlation of the two; NaN for
        fewer than two features or a constant column)."""
        both = self.table.dropna(subset=["exact"])
        a, e = both["attribution"].to_numpy(), both["exact"].to_numpy()
        n = len(both)
        if n == 0:
            return {"n": 0.0, "sign_agreement": math.nan, "spearman": math.nan}
        sign = float((np.sign(a) == np.sign(e)).mean())
        ra, re = both["attribution"].rank().to_numpy(), both["exact"].rank().to_numpy()
        ra, re = ra - ra.mean(), re - re.mean()
        denom = math.sqrt(float((ra * ra).sum() * (re * re).sum()))
        spearman = float((ra * re).sum()) / denom if n > 1 and denom > 0 else math.nan
        return {"n": float(n), "sign_agreement": sign, "spearman": spearman}

    def figure(self, top: int = 20) -> go.Figure:
        """Bars of attribution and exact ablation effect for the `top` features of largest |attribution|."""
        import plotly.graph_objects as go

        rows = self.table.head(top)
        labels = [
            f"#{f}" + (f": {e[:40]}" if isinstance(e, str) else "")
            for f, e in zip(rows["feature"], rows["explanation"])
        ]
        fig = go.Figure(
            [
                go.Bar(name="attribution (activation × gradient)", y=labels, x=rows["attribution"], orientation="h"),
                go.Bar(name="exact (ablation)", y=labels, x=rows["exact"], orientation="h"),
            ]
        )
        fig.update_layout(
            barmode="group",
            title=f"Feature attribution: metric(clean) − metric(ablated); clean = {self.clean:.4g}",
            xaxis_title="effect on the metric",
            yaxis={"autorange": "reversed"},
            height=max(300, 28 * len(rows) + 120),
        )
        return fig


def attribute(
    model,
    sae: SAE | str | Path,
    text: str,
    metric: Metric,
    *,
    exact_top: int = 10,
    index: str | Path | None = None,
) -> Attribution:
    """Each SAE feature's attribution to `metric` on `text`, and the exact effect of ablating the top `exact_top`.

    attribution(i) = Σ_t f_i,t · (d_i · ∂metric/∂x_t) over the positions the SAE reads (its own position rule): the
    attribution-patching estimate of metric(clean) − metric(feature i ablated), the ablation keeping the SAE's error
    term (so the clean run is the model's own). Positive: the feature raises the metric. One forward with a gradient
    at the SAE's hook and one backward give every feature's attribution; `exact` comes from one forward per feature
    (batched) with `heldout.feature_edit(sae, {i: 0.0})`.

    `sae` is an SAE or its (run) directory; `metric` a `Metric` (`logit_diff`, `loss_at`, or your own function of the
    logits [1, T, vocab] and tokens [1, T] returning a 0-dim tensor). `index` (an index or run directory; default: the
    run directory of an `sae` given as a path) supplies the explanations. See `Attribution` for what comes back.
    """
    import pandas as pd

    if isinstance(exact_top, bool) or not isinstance(exact_top, int) or exact_top < 0:
        raise AttributionError(f"exact_top={exact_top!r}; pass how many features to ablate exactly (0 for none)")
    if not callable(metric):
        raise AttributionError(
            f"metric is a {type(metric).__name__}; pass a function of (logits, tokens), e.g. sae_kit.loss_at(-1)"
        )
    sae, explanations = _open(sae, index)
    cfg, prompt = _prompt(model, sae, text)
    hook = cfg.hook[0]
    try:
        value, acts, grad = heldout.grad_at_hook(model, prompt.tokens, hook, metric)
    except heldout.HeldoutError as err:
        raise AttributionError(str(err)) from None
    where, _, codes = _codes(model, sae, cfg, prompt, acts)
    tok, lat, val = codes.nonzeros()
    g = grad[0][prompt.keep[0].to(grad.device)]  # [n, d_in] at the kept positions
    dtype = torch.promote_types(torch.promote_types(sae.W_dec.dtype, g.dtype), torch.float32)
    attr = torch.empty(len(val), dtype=dtype)
    with torch.no_grad():
        for rows in heldout.row_chunks(len(val), sae.cfg.d_in):  # bounded [pairs × d_in] scratch
            d = sae.W_dec[lat[rows]].to(dtype)
            attr[rows] = (val[rows].to(dtype) * (d * g[tok[rows]].to(d.device, dtype)).sum(-1)).cpu()
    tok, lat, val = tok.cpu(), lat.cpu(), val.detach().cpu().to(dtype)
    pos = where[tok]
    per_position = pd.DataFrame(
        {
            "feature": lat.numpy(),
            "position": pos.numpy(),
            "token": [prompt.strings[int(p)] for p in pos],
            "activation": val.numpy(),
            "attribution": attr.numpy(),
        }
    )
    grouped = per_position.groupby("feature", sort=False)
    table = pd.DataFrame(
        {
            "activation": grouped["activation"].sum(),
            "max_activation": grouped["activation"].agg(lambda s: s.iloc[s.abs().argmax()]),
            "positions": grouped.size(),
            "attribution": grouped["attribution"].sum(),
        }
    ).reset_index()
    table = table.reindex(table["attribution"].abs().sort_values(ascending=False, kind="stable").index)
    table = table.reset_index(drop=True)
    table["exact"] = math.nan
    chosen = [int(f) for f in table["feature"].head(exact_top)]
    if chosen:
        table.loc[: len(chosen) - 1, "exact"] = _exact(model, sae, prompt, hook, metric, chosen)
    table["explanation"] = [None if explanations is None else explanations.get(int(f)) for f in table["feature"]]
    per_position = per_position.sort_values(["feature", "position"], kind="stable").reset_index(drop=True)
    return Attribution(
        table=table,
        per_position=per_position,
        clean=float(value),
        text=text,
        tokens=prompt.strings,
        d_sae=sae.cfg.d_sae,
    )


def _exact(model, sae: SAE, prompt: _Prompt, hook: str, metric: Metric, features: Sequence[int]) -> list[float]:
    """metric(clean) − metric(feature i ablated, error term kept) for each feature: one feature per context row, a
    clean row first in every LM batch (so the difference is taken within one batched forward)."""
    T, V = prompt.tokens.shape[1], heldout.vocab_size(model)
    per_batch = max(2, heldout.LOGIT_CELLS // max(1, T * V))  # rows per forward, the clean one included
    out: list[float] = []
    for i in range(0, len(features), per_batch - 1):
        part = features[i : i + per_batch - 1]
        edits: list[heldout.Edit | None] = [None] + [heldout.feature_edit(sae, {f: 0.0}) for f in part]

        def edit(acts: Tensor, keep: Tensor, edits=edits) -> Tensor:
            rows = [a if e is None else e(a, k) for e, a, k in zip(edits, acts.split(1), keep.split(1))]
            return torch.cat(rows)

        n = len(edits)
        logits, _ = heldout.run_lm(model, prompt.tokens.expand(n, T), hook, edit=edit, keep=prompt.keep.expand(n, T))
        tokens = prompt.tokens.to(logits.device)
        values = [float(metric(logits[r : r + 1], tokens)) for r in range(n)]
        out += [values[0] - v for v in values[1:]]
    return out


# ------------------------------------------------------------------------------------------------ top features
def top_features(model, sae: SAE | str | Path, text: str, k: int = 5, index: str | Path | None = None) -> pd.DataFrame:
    """Per token of `text`, the `k` strongest features of the SAE: one row per (token, rank) with `position`,
    `token`, `rank` (0 = strongest), `feature`, `activation` and `explanation`.

    Only the positions the SAE reads appear (its rule skips position 0 / BOS and special tokens), and only active
    features (a token with fewer than k active features has fewer rows). Strength is the activation, or |activation|
    for rules whose codes keep their sign (AbsTopK). `sae` is an SAE or its (run) directory; explanations come from
    `index` (an index or run directory) or, when `sae` is a directory, from its run's index/, when autointerp has
    explained features there (missing, NaN, otherwise).
    """
    import pandas as pd

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise AttributionError(f"k={k!r}; pass how many features to show per token (k >= 1)")
    sae, explanations = _open(sae, index)
    cfg, prompt = _prompt(model, sae, text)
    where, _, codes = _codes(model, sae, cfg, prompt)
    dense = codes.to_dense().float().cpu()  # [n, d_sae]
    strength = dense.abs() if sae.sparsifier.signed else dense
    top = strength.topk(min(k, sae.cfg.d_sae), dim=1)
    rows = []
    for j, t in enumerate(where.tolist()):
        for rank, (s, f) in enumerate(zip(top.values[j].tolist(), top.indices[j].tolist())):
            if s <= 0:
                break
            rows.append(
                {
                    "position": t,
                    "token": prompt.strings[t],
                    "rank": rank,
                    "feature": f,
                    "activation": float(dense[j, f]),
                    "explanation": None if explanations is None else explanations.get(f),
                }
            )
    columns = ["position", "token", "rank", "feature", "activation", "explanation"]
    return pd.DataFrame(rows, columns=columns)
