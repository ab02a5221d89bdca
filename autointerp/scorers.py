"""Scorers: how well an explanation predicts a feature, each judged by an LLM one example per request.

* **Detection** (does the excerpt contain the feature?): activating test windows (label 1) and verified
  non-activating windows (label 0), shown without highlights.
* **Fuzzing** (are the highlighted tokens the right ones?): activating windows with the tokens at ≥ 0.3 × the
  window's peak marked (label 1); the same kind of windows with as many *wrong* tokens marked (a share of the
  activating windows; label 0), and non-activating windows with random tokens marked (label 0). The number of wrong
  marks is the mean number of correct marks over the feature's activating windows.
* **Intervention** (Paulo et al.'s intervention scoring, judged as a two-way choice): the feature's decoder atom is
  added at every position the SAE reads, at the strength whose mean next-token KL(clean ‖ steered) at the end of
  the prompts reaches `kl_target` (bisection on a log scale, in units of the feature's max activation); the judge sees
  the clean and the steered greedy continuation of each prompt in a balanced A/B order and says which one was
  steered, given the explanation. Chance is 0.5 whatever the judge's position bias.

Each scorer returns the `metrics.classification` of its examples and one prediction record per example (what the
judge saw, the label, its parsed answer and P(positive) when the backend gives probabilities).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae_kit.autointerp import prompts
from sae_kit.autointerp.examples import Example, ExampleConfig, misplaced, rng_for
from sae_kit.autointerp.metrics import classification
from sae_kit.autointerp.types import ChatClient, Completion, Request
from sae_kit.heldout import generate, prompt_tokens, run_lm, steer_edit

JUDGE_TOKENS = 3
"""Completion tokens a judge may write (the answer is its first word)."""


@dataclass
class Trial:
    """One judged example before the judge answers."""

    text: str
    label: bool
    kind: str
    row: int = -1
    band: int = -1
    start: int = -1


@dataclass
class Scored:
    """A scorer's result for one feature."""

    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    prompt_tokens: int
    completion_tokens: int
    extra: dict[str, Any]


def judge(
    client: ChatClient, trials: Sequence[Trial], messages, choices: tuple[str, str], scorer: str, feature: int
) -> Scored:
    """Ask the judge about every trial (`messages(trial) -> chat`), parse, and score."""
    requests = [Request(messages(t), max_tokens=JUDGE_TOKENS, answer_tokens=choices) for t in trials]
    answers: list[Completion] = client.complete(requests) if requests else []
    preds = [prompts.parse_choice(a.text, choices) if a.error is None else -1 for a in answers]
    probs = [prompts.positive_prob(a.answer_probs, choices) for a in answers]
    have_probs = bool(probs) and all(math.isfinite(p) for p, q in zip(probs, preds) if q >= 0)
    metrics = classification([t.label for t in trials], preds, probs if have_probs else None)
    records = [
        {
            "feature": feature,
            "scorer": scorer,
            "example": i,
            "row": t.row,
            "kind": t.kind,
            "band": t.band,
            "start": t.start,
            "label": t.label,
            "prediction": p,
            "prob": q,
            "text": t.text,
            "answer": a.text if a.error is None else f"error: {a.error}",
        }
        for i, (t, p, q, a) in enumerate(zip(trials, preds, probs, answers))
    ]
    return Scored(
        metrics,
        records,
        sum(a.prompt_tokens for a in answers),
        sum(a.completion_tokens for a in answers),
        {},
    )


def detection_trials(activating: Sequence[Example], negatives: Sequence[Example]) -> list[Trial]:
    return [Trial(e.text(), e.label, e.kind, e.row, e.band, e.start) for e in [*activating, *negatives]]


def fuzz_trials(
    activating: Sequence[Example], negatives: Sequence[Example], cfg: ExampleConfig, feature: int
) -> list[Trial]:
    rng = rng_for(cfg.seed, feature, 2)
    correct = [e.marked(cfg.highlight_threshold) for e in activating]
    n_marks = max(1, round(float(np.mean([sum(m) for m in correct])))) if correct else 1
    trials = [
        Trial(prompts.highlight(e.tokens, m), True, e.kind, e.row, e.band, e.start) for e, m in zip(activating, correct)
    ]
    n_wrong = round(cfg.misplaced_fraction * len(activating))
    for i in sorted(rng.choice(len(activating), size=n_wrong, replace=False).tolist()) if n_wrong else []:
        e = activating[i]
        trials.append(
            Trial(prompts.highlight(e.tokens, misplaced(e, n_marks, rng)), False, "misplaced", e.row, e.band, e.start)
        )
    for e in negatives:
        trials.append(
            Trial(prompts.highlight(e.tokens, misplaced(e, n_marks, rng)), False, e.kind, e.row, e.band, e.start)
        )
    return trials


def detection(
    client: ChatClient, explanation: str, feature: int, activating: Sequence[Example], negatives: Sequence[Example]
) -> Scored:
    trials = detection_trials(activating, negatives)
    return judge(
        client,
        trials,
        lambda t: prompts.detection_messages(explanation, t.text),
        prompts.YES_NO,
        "detection",
        feature,
    )


def fuzz(
    client: ChatClient,
    explanation: str,
    feature: int,
    activating: Sequence[Example],
    negatives: Sequence[Example],
    cfg: ExampleConfig,
) -> Scored:
    trials = fuzz_trials(activating, negatives, cfg, feature)
    return judge(client, trials, lambda t: prompts.fuzz_messages(explanation, t.text), prompts.YES_NO, "fuzz", feature)


# ------------------------------------------------------------------------------------------------ intervention
PROMPTS = (
    "The",
    "I think that",
    "My favourite thing is",
    "Once upon a time,",
    "In the news today,",
    "Here is a list:",
    "The best way to",
    "She said that",
)


class Steerer:
    """Steers one SAE's features on a fixed set of prompts: the clean continuations once, then per feature the
    strength reaching the KL target and the steered continuations (`sae_kit.heldout`'s steering edit and greedy
    generation, under the SAE's own data settings)."""

    def __init__(self, model, hcfg, prompt_texts: Sequence[str], n_tokens: int, kl_target: float, steps: int = 10):
        self.model, self.hcfg, self.prompts = model, hcfg, tuple(prompt_texts)
        self.n_tokens, self.kl_target, self.steps = n_tokens, kl_target, steps
        toks = [prompt_tokens(model, hcfg, p) for p in self.prompts]
        T = max(t.shape[1] for t, _ in toks)
        pad_id = model.tokenizer.pad_token_id or model.tokenizer.eos_token_id or 0
        self.tokens = torch.full((len(toks), T), pad_id, dtype=torch.long)
        self.keep = torch.zeros(len(toks), T, dtype=torch.bool)
        self.last = torch.tensor([t.shape[1] - 1 for t, _ in toks])
        for i, (t, k) in enumerate(toks):  # right padding: a causal LM's real positions never see it
            self.tokens[i, : t.shape[1]] = t[0]
            self.keep[i, : t.shape[1]] = k[0]
        self.clean_logp = self._last_logp(None)
        self.clean = [generate(model, hcfg, p, n_tokens) for p in self.prompts]

    def _last_logp(self, edit) -> Tensor:
        logits, _ = run_lm(self.model, self.tokens, self.hcfg.hook[0], edit=edit, keep=self.keep)
        return logits[torch.arange(len(self.last)), self.last].log_softmax(-1)

    def kl(self, direction: Tensor, alpha: float) -> float:
        """Mean KL(clean ‖ steered) of the next token at the end of the prompts."""
        lp = self._last_logp(steer_edit(direction, alpha))
        return float((self.clean_logp.exp() * (self.clean_logp - lp)).sum(-1).mean())

    def strength(self, direction: Tensor, unit: float, lo: float = -1.0, hi: float = 3.0) -> tuple[float, float]:
        """(α, its KL): bisection on log10(α/unit) in [lo, hi] for the mean KL nearest `kl_target` (α = unit·10^hi
        when even that stays below it)."""
        unit = max(unit, 1e-6)
        if self.kl(direction, unit * 10**hi) < self.kl_target:
            return unit * 10**hi, self.kl(direction, unit * 10**hi)
        for _ in range(self.steps):
            mid = (lo + hi) / 2
            if self.kl(direction, unit * 10**mid) < self.kl_target:
                lo = mid
            else:
                hi = mid
        alpha = unit * 10 ** ((lo + hi) / 2)
        return alpha, self.kl(direction, alpha)

    def steered(self, direction: Tensor, alpha: float) -> list[str]:
        return [
            generate(self.model, self.hcfg, p, self.n_tokens, edit=steer_edit(direction, alpha)) for p in self.prompts
        ]


def intervention_trials(prompt_texts: Sequence[str], clean: Sequence[str], steered: Sequence[str]) -> list[Trial]:
    """One A/B trial per prompt; the steered continuation is A on even prompts and B on odd ones (label: A)."""
    out = []
    for i, (p, c, s) in enumerate(zip(prompt_texts, clean, steered)):
        first, second = (s, c) if i % 2 == 0 else (c, s)
        out.append(Trial(f"{p}\x00{first}\x00{second}", i % 2 == 0, "steered"))
    return out


def intervention(
    client: ChatClient, explanation: str, feature: int, steerer: Steerer, direction: Tensor, unit: float
) -> Scored:
    alpha, kl = steerer.strength(direction, unit)
    steered = steerer.steered(direction, alpha)
    trials = intervention_trials(steerer.prompts, steerer.clean, steered)

    def messages(t: Trial):
        p, a, b = t.text.split("\x00")
        return prompts.intervention_messages(explanation, p, a, b)

    out = judge(client, trials, messages, prompts.A_B, "intervention", feature)
    for r in out.predictions:
        p, a, b = r["text"].split("\x00")
        r["text"] = f"{p} | A: {a} | B: {b}"
    out.extra = {"strength": alpha, "kl": kl}
    return out
