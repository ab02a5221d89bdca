"""Autointerp scoring without an LLM: the metrics on known answers, and a planted feature judged by a scripted judge.

The planted feature fires exactly on the token " Thursday" of synthetic contexts, and the index rows are built by the
indexer's own artifact code (`sae_kit.dashboards.artifacts`), so the examples come through the real sampling path.
The scripted judge answers from the explanation: detection says Yes iff the explained word is in the excerpt, fuzzing
says Yes iff every highlighted span is that word. The right explanation must score ≥ 0.95, a wrong one ≤ 0.6, and
the right one must drop below 0.95 when negatives are allowed to hold the token, labels are shuffled or highlights
are misplaced (so the test guards each of those bugs).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from sae_kit.autointerp import examples as ex
from sae_kit.autointerp import prompts, scorers
from sae_kit.autointerp.metrics import auroc, classification
from sae_kit.autointerp.types import Completion, Request


# ------------------------------------------------------------------------------------------------ metrics
def test_always_no_on_unbalanced_set_is_half():
    labels = [True] * 3 + [False] * 97
    m = classification(labels, [0] * 100, [0.2] * 100)
    assert m["balanced_accuracy"] == 0.5
    assert m["accuracy"] == pytest.approx(0.97)  # why accuracy is not the headline
    assert m["recall"] == 0.0 and m["f1"] == 0.0 and math.isnan(m["precision"])
    assert m["auroc"] == 0.5  # all ties


def test_auroc_known_values():
    assert auroc([1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auroc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert auroc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert auroc([1, 0, 1, 0], [0.9, 0.8, 0.3, 0.1]) == 0.75  # 3 of 4 pairs ordered
    assert auroc([1, 0, 0], [0.5, 0.5, 0.1]) == 0.75  # a tie counts one half
    assert math.isnan(auroc([1, 1], [0.3, 0.4]))  # one class only


def test_parse_failures_are_counted_and_excluded():
    labels = [True, True, False, False, True]
    m = classification(labels, [1, -1, 0, -1, 1], [0.9, 0.5, 0.1, 0.5, 0.8])
    assert m["failures"] == 2 and m["n"] == 5 and m["n_pos"] == 2 and m["n_neg"] == 1
    assert m["balanced_accuracy"] == 1.0 and m["auroc"] == 1.0
    assert prompts.parse_choice("Yes.", prompts.YES_NO) == 1
    assert prompts.parse_choice("  no, it does not", prompts.YES_NO) == 0
    assert prompts.parse_choice("Maybe", prompts.YES_NO) == -1
    assert prompts.parse_explanation("Sure!\n[EXPLANATION]: dates and times") == "dates and times"
    assert prompts.parse_explanation("I cannot tell.") is None


# ------------------------------------------------------------------------------------------------ the planted index
WORDS = [" the", " meeting", " is", " on", " at", " noon", " we", " go", " home", " banana", " red", " car", " and"]
VOCAB = ["<s>", *WORDS, " Thursday"]
THURSDAY = len(VOCAB) - 1
R, T = 240, 32


@dataclass
class Planted:
    tokens: torch.Tensor
    row: dict
    pool: ex.Pool


@pytest.fixture(scope="module")
def planted() -> Planted:
    from sae_kit.dashboards import artifacts
    from sae_kit.dashboards.indexer import IndexConfig

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, THURSDAY, (R, T), generator=g)
    tokens[torch.rand(R, T, generator=g) < 0.12] = THURSDAY
    tokens[:, 0] = 0
    pos = (tokens == THURSDAY).flatten().nonzero().squeeze(1)
    value = 0.5 + 2.5 * torch.rand(len(pos), generator=g)  # varied, so the quantile bands differ
    banana = (tokens == WORDS.index(" banana") + 1).flatten().nonzero().squeeze(1)  # a second feature
    feature = torch.cat([torch.zeros(len(pos), dtype=torch.long), torch.ones(len(banana), dtype=torch.long)])
    position = torch.cat([pos, banana])
    values = torch.cat([value, torch.ones(len(banana))])
    valid = torch.ones(R, T, dtype=torch.bool)
    p = artifacts.Pass.from_entries(tokens, valid, feature, position, values, R * T, 2)
    cfg = IndexConfig(sae=None, top=20, bands=5, per_band=4, before=8, after=4)  # type: ignore[arg-type]
    st = artifacts.stats(p)
    W_dec = torch.randn(2, 8, generator=g)
    table = artifacts.shard_table(
        p,
        st,
        artifacts.histograms(p, st, cfg.bins),
        artifacts.Picks.choose(p, cfg, signed=False),
        artifacts.CoFiring(p),
        W_dec,
        lambda d: d @ torch.randn(8, len(VOCAB), generator=g),
        cfg,
        0,
        2,
    )
    row = table.to_pylist()[0]
    pool = ex.Pool.from_entries(
        torch.arange(R), tokens, valid, {"feature": feature, "position": position, "value": values}
    )
    return Planted(tokens, row, pool)


class ScriptedJudge:
    """Answers from the explanation's last word, as a perfect reader of that explanation would."""

    model_name = "scripted"

    def complete(self, requests: list[Request]) -> list[Completion]:
        out = []
        for r in requests:
            user = r.messages[-1][1]
            word = re.search(r"Explanation: (.*)\n", user).group(1).split()[-1]  # type: ignore[union-attr]
            text = re.search(r"Text: (.*)\n", user).group(1)  # type: ignore[union-attr]
            if "marked tokens" in user:
                spans = re.findall(r"<<(.*?)>>", text)
                yes = bool(spans) and all(w == word for s in spans for w in s.split())  # adjacent marks merge
            else:
                yes = word in text
            out.append(Completion("Yes" if yes else "No", {"Yes": 0.9 if yes else 0.1, "No": 0.1 if yes else 0.9}))
        return out


def _score(planted: Planted, explanation: str, cfg: ex.ExampleConfig | None = None):
    cfg = cfg or ex.ExampleConfig(n_random=30)
    shown = ex.explain_set(planted.row, VOCAB, cfg)
    rows = {e.row for e in shown}
    activating = ex.activating_test_set(planted.row, VOCAB, cfg, rows)
    negs = ex.negatives(0, planted.pool, VOCAB, cfg, rows | {e.row for e in activating}, 8, 4)
    judge = ScriptedJudge()
    det = scorers.detection(judge, explanation, 0, activating, negs)
    fz = scorers.fuzz(judge, explanation, 0, activating, negs, cfg)
    return shown, activating, negs, det, fz


def test_examples_are_disjoint_and_negatives_silent(planted):
    shown, activating, negs, _, _ = _score(planted, "the word Thursday")
    assert len(shown) == 10 and len(activating) >= 15 and len(negs) == 30
    assert not {e.row for e in shown} & {e.row for e in [*activating, *negs]}  # never a shared context row
    assert {e.band for e in activating} == set(range(5))  # every quantile band is tested
    for e in shown + activating:
        assert any(a > 0 for a in e.acts) and all((a > 0) == (t == " Thursday") for t, a in zip(e.tokens, e.acts))
    for e in negs:
        window = planted.tokens[e.row, e.start : e.start + len(e.tokens)]
        assert [VOCAB[i] for i in window.tolist()] == e.tokens
        assert THURSDAY not in window.tolist()


def test_right_explanation_scores_high_and_wrong_low(planted):
    *_, det, fz = _score(planted, "the word Thursday")
    assert det.metrics["balanced_accuracy"] >= 0.95 and det.metrics["auroc"] >= 0.95
    assert fz.metrics["balanced_accuracy"] >= 0.95
    assert det.metrics["failures"] == 0 and fz.metrics["n_neg"] > len(
        [p for p in fz.predictions if p["kind"] == "random"]
    )
    *_, det, fz = _score(planted, "the word banana")
    assert det.metrics["balanced_accuracy"] <= 0.6
    assert fz.metrics["balanced_accuracy"] <= 0.6


def test_the_planted_check_catches_leaky_negatives(planted, monkeypatch):
    monkeypatch.setattr(ex.Pool, "fires", lambda self, f: torch.zeros_like(self.tokens, dtype=torch.bool))
    *_, det, _ = _score(planted, "the word Thursday")
    assert det.metrics["balanced_accuracy"] < 0.95


def test_the_planted_check_catches_shuffled_labels(planted, monkeypatch):
    real = scorers.detection_trials

    def shuffled(activating, negatives):
        trials = real(activating, negatives)
        labels = np.random.default_rng(0).permutation([t.label for t in trials])
        for t, label in zip(trials, labels):
            t.label = bool(label)
        return trials

    monkeypatch.setattr(scorers, "detection_trials", shuffled)
    *_, det, _ = _score(planted, "the word Thursday")
    assert det.metrics["balanced_accuracy"] < 0.95


def test_the_planted_check_catches_misplaced_highlights(planted, monkeypatch):
    real = ex.Example.marked
    monkeypatch.setattr(ex.Example, "marked", lambda self, threshold=0.3: [False, *real(self, threshold)[:-1]])
    *_, fz = _score(planted, "the word Thursday")
    assert fz.metrics["balanced_accuracy"] < 0.95
