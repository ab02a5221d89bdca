"""Classification metrics of a judge's answers against the truth, for one feature and one scorer.

A prediction is 1 (positive: "the feature is there"), 0, or -1 when the answer could not be parsed; parse failures
are counted and left out of every metric. With P = positives and N = negatives among the parsed answers:

    balanced accuracy = ½ (TP/P + TN/N)          (0.5 for a judge that always says the same thing, whatever P/N)
    precision = TP/(TP+FP),  recall = TP/P,  F1 = 2TP/(2TP+FP+FN)
    AUROC = P(prob of a random positive > that of a random negative), ties counting ½ (Mann–Whitney U)

AUROC uses the judge's answer probability P(yes) (a backend's log-probabilities); NaN when they are missing or a
class is empty. Undefined ratios (no predicted positives, an empty class) are NaN, never a made-up 0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def auroc(labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of `scores` separating True from False labels (ties: ½); NaN if a class is empty
    or a score is NaN."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0 or not np.isfinite(s).all():
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # average ranks of tied groups (1-based)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def classification(
    labels: Sequence[bool], predictions: Sequence[int], probs: Sequence[float] | None = None
) -> dict[str, Any]:
    """The metrics of one feature's judged examples (see the module docstring), with counts."""
    y = np.asarray(labels, dtype=bool)
    pred = np.asarray(predictions, dtype=np.int64)
    if y.shape != pred.shape:
        raise ValueError(f"{len(y)} labels but {len(pred)} predictions")
    ok = pred >= 0
    yy, pp = y[ok], pred[ok] == 1
    tp, fp = int((yy & pp).sum()), int((~yy & pp).sum())
    tn, fn = int((~yy & ~pp).sum()), int((yy & ~pp).sum())
    P, N = tp + fn, tn + fp
    tpr, tnr = _ratio(tp, P), _ratio(tn, N)
    precision, recall = _ratio(tp, tp + fp), tpr
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)  # = 2·precision·recall/(precision+recall); 0 when no positive is found
    prob_auc = math.nan
    if probs is not None:
        pr = np.asarray(probs, dtype=np.float64)
        if pr.shape != y.shape:
            raise ValueError(f"{len(y)} labels but {len(pr)} probabilities")
        prob_auc = auroc(yy, pr[ok])
    return {
        "n": int(len(y)),
        "n_pos": P,
        "n_neg": N,
        "failures": int((~ok).sum()),
        "balanced_accuracy": (tpr + tnr) / 2 if math.isfinite(tpr) and math.isfinite(tnr) else math.nan,
        "accuracy": _ratio(tp + tn, P + N),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auroc": prob_auc,
    }
