"""The examples an explainer reads and a judge is tested on, for one feature.

* **Explain set**: the index's top contexts (`explain_top` of them, strongest first) and, optionally,
  `explain_per_band` contexts from each activation-quantile band.
* **Test set** (never sharing a context row with the explain set): the index's quantile-band contexts
  (`test_per_band` per band, so every part of the activation range is tested, not only the peaks), plus
  non-activating windows: `n_random` random held-out windows and, optionally, `n_hard` hard negatives (windows from
  the top contexts of the feature's decoder neighbours and co-firing features). Every non-activating window is
  verified by re-encoding its whole context row with the SAE on the real model: the feature is zero on every
  position of the window (`Pool`).

Windows are the index's (`before` tokens before the activating token, `after` after) unless shortened by
`window_before` / `window_after`; random windows have the same length. Every choice is seeded per feature
(`seed`, feature id), so a resumed run draws the same examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae_kit.autointerp import prompts

ACTIVATING, RANDOM, HARD = "activating", "random", "hard"


@dataclass
class Example:
    """One window of text with the feature's activation on each token."""

    tokens: list[str]
    """Display string of each token."""
    acts: list[float]
    """The feature's activation on each token (all zero for a non-activating window)."""
    row: int
    """Context row of the index's held-out contexts it comes from."""
    kind: str
    """activating | random | hard."""
    band: int = -1
    """Activation-quantile band of an activating test example (-1 for the top contexts and negatives)."""
    start: int = -1
    """Position of the window's first token in its context row."""

    @property
    def label(self) -> bool:
        return self.kind == ACTIVATING

    def text(self) -> str:
        """The excerpt without highlights."""
        return prompts.highlight(self.tokens, [False] * len(self.tokens))

    def marked(self, threshold: float = 0.3) -> list[bool]:
        """Tokens whose |activation| is at least `threshold` × this window's max |activation| (the paper's rule)."""
        peak = max((abs(a) for a in self.acts), default=0.0)
        return [peak > 0 and abs(a) >= threshold * peak for a in self.acts]


@dataclass
class ExampleConfig:
    """How examples are drawn from the index and the held-out data (recorded with the results)."""

    explain_top: int = 10
    """Top-activating contexts shown to the explainer (at most the index's --top)."""
    explain_per_band: int = 0
    """Contexts per activation-quantile band also shown to the explainer (taken before the test set's)."""
    show_activations: bool = False
    """Also show the explainer each marked token's activation on a 0–9 scale."""
    test_per_band: int = 4
    """Activating test contexts per quantile band (at most the index's --per-band, fewer after the row split)."""
    n_random: int = 20
    """Random held-out windows where the feature is silent (verified by re-encoding), per feature."""
    n_hard: int = 0
    """Hard negatives per feature: windows from the top contexts of its decoder neighbours and co-firing features
    where it is silent (verified by re-encoding); 0 turns them off."""
    pool_rows: int = 64
    """Held-out context rows encoded once and shared by every feature as the source of random negatives."""
    window_before: int | None = None
    """Tokens before the activating token in every window (None: the index's --before)."""
    window_after: int | None = None
    """Tokens after the activating token in every window (None: the index's --after)."""
    highlight_threshold: float = 0.3
    """Fuzzing marks the tokens of an activating window with |activation| ≥ this × the window's max."""
    misplaced_fraction: float = 0.5
    """Fuzzing: the share of activating test windows also shown with wrongly placed highlights (label 0)."""
    seed: int = 0
    """Seed of every draw (combined with the feature id)."""

    def check(self) -> None:
        from sae_kit.autointerp.types import AutoInterpError

        for name in ("explain_top", "explain_per_band", "test_per_band", "n_random", "n_hard", "pool_rows"):
            if getattr(self, name) < 0:
                raise AutoInterpError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.explain_top + self.explain_per_band < 1:
            raise AutoInterpError("the explainer needs examples: set --explain-top or --explain-per-band >= 1")
        if not 0 < self.highlight_threshold <= 1 or not 0 <= self.misplaced_fraction <= 1:
            raise AutoInterpError("--highlight-threshold must be in (0, 1] and --misplaced-fraction in [0, 1]")

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rng_for(seed: int, feature: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, feature, salt])


def _example(ctx: dict[str, Any], vocab: list[str], cfg: ExampleConfig, band: int = -1) -> Example:
    """An index context (CONTEXT struct) as an activating example, cut to the configured window around its peak."""
    peak, ids, acts = ctx["peak"], ctx["tokens"], ctx["acts"]
    a = 0 if cfg.window_before is None else max(0, peak - cfg.window_before)
    b = len(ids) if cfg.window_after is None else min(len(ids), peak + cfg.window_after + 1)
    return Example(
        [vocab[i] for i in ids[a:b]],
        [float(v) for v in acts[a:b]],
        row=ctx["row"],
        kind=ACTIVATING,
        band=band,
        start=ctx["pos"] - peak + a,
    )


def explain_set(row: dict[str, Any], vocab: list[str], cfg: ExampleConfig) -> list[Example]:
    """The explainer's examples from a feature's index row: its top contexts, then `explain_per_band` per band."""
    out = [_example(c, vocab, cfg) for c in row["top"][: cfg.explain_top]]
    if cfg.explain_per_band:
        used = {e.row for e in out}
        taken: dict[int, int] = {}
        for c in row["quantiles"]:
            if c["row"] in used or taken.get(c["band"], 0) >= cfg.explain_per_band:
                continue
            taken[c["band"]] = taken.get(c["band"], 0) + 1
            used.add(c["row"])
            out.append(_example(c, vocab, cfg))
    return out


def activating_test_set(row: dict[str, Any], vocab: list[str], cfg: ExampleConfig, exclude: set[int]) -> list[Example]:
    """Up to `test_per_band` quantile contexts per band whose rows are not in `exclude` (the explain set's rows), at
    most one per row."""
    out: list[Example] = []
    used, taken = set(exclude), dict[int, int]()
    for c in row["quantiles"]:
        if c["row"] in used or taken.get(c["band"], 0) >= cfg.test_per_band:
            continue
        taken[c["band"]] = taken.get(c["band"], 0) + 1
        used.add(c["row"])
        out.append(_example(c, vocab, cfg, band=c["band"]))
    return out


@dataclass
class Pool:
    """Context rows re-encoded by the SAE on the real model: the source of verified non-activating windows.

    `entries` holds the nonzero codes of these rows, sorted by (feature, position); positions are flat in
    `tokens` (local row · T + t)."""

    rows: Tensor
    """[P] the index context row of each pooled row."""
    tokens: Tensor
    """[P, T] their token ids."""
    valid: Tensor
    """[P, T] real (non-padding) tokens."""
    feature: Tensor
    position: Tensor
    value: Tensor

    @classmethod
    def from_entries(cls, rows: Tensor, tokens: Tensor, valid: Tensor, entries: dict[str, Tensor]) -> Pool:
        f, p, v = entries["feature"], entries["position"], entries["value"]
        order = (f * tokens.numel() + p).argsort()
        return cls(rows, tokens, valid, f[order], p[order], v[order])

    def fires(self, feature: int) -> Tensor:
        """[P, T] bool: where `feature` is nonzero."""
        a = int(torch.searchsorted(self.feature, feature))
        b = int(torch.searchsorted(self.feature, feature, right=True))
        out = torch.zeros(self.tokens.numel(), dtype=torch.bool)
        out[self.position[a:b]] = True
        return out.view_as(self.tokens)

    def local(self, row: int) -> int | None:
        hit = (self.rows == row).nonzero()
        return int(hit[0, 0]) if len(hit) else None

    def silent_window(self, feature: int, local: int, pos: int, before: int, after: int, fires: Tensor | None = None):
        """(a, b) bounds of the window around `pos` in pooled row `local` when `feature` is zero on all of it and
        every token is real; None otherwise."""
        fires = self.fires(feature) if fires is None else fires
        a, b = pos - before, pos + after + 1
        if a < 0 or b > self.tokens.shape[1] or not bool(self.valid[local, a:b].all()):
            return None
        return None if bool(fires[local, a:b].any()) else (a, b)


def negatives(
    feature: int,
    pool: Pool,
    vocab: list[str],
    cfg: ExampleConfig,
    exclude: set[int],
    before: int,
    after: int,
    hard_candidates: Sequence[tuple[int, int]] = (),
) -> list[Example]:
    """`n_random` random windows of the pool (at most one per row, none from `exclude` rows) and up to `n_hard` of
    the `hard_candidates` (row, position) windows where the feature is silent."""
    fires = pool.fires(feature)
    out: list[Example] = []

    def make(local: int, bounds: tuple[int, int], kind: str) -> Example:
        ids = pool.tokens[local, bounds[0] : bounds[1]].tolist()
        return Example([vocab[i] for i in ids], [0.0] * len(ids), int(pool.rows[local]), kind, start=bounds[0])

    used = set(exclude)
    if cfg.n_hard:
        for row, pos in hard_candidates:
            local = pool.local(row)
            if row in used or local is None:
                continue
            bounds = pool.silent_window(feature, local, pos, before, after, fires)
            if bounds is not None:
                out.append(make(local, bounds, HARD))
                used.add(row)
            if len(out) >= cfg.n_hard:
                break
    rng = rng_for(cfg.seed, feature, 1)
    T = pool.tokens.shape[1]
    found = 0
    for local in rng.permutation(len(pool.rows)):
        if found >= cfg.n_random:
            break
        if int(pool.rows[local]) in used:
            continue
        for pos in rng.permutation(np.arange(before, T - after)):
            bounds = pool.silent_window(feature, int(local), int(pos), before, after, fires)
            if bounds is not None:
                out.append(make(int(local), bounds, RANDOM))
                used.add(int(pool.rows[local]))
                found += 1
                break
    return out


def misplaced(example: Example, n_marks: int, rng: np.random.Generator) -> list[bool]:
    """Highlights on `n_marks` random tokens where the feature is zero (for a negative: any tokens)."""
    silent = [i for i, a in enumerate(example.acts) if a == 0]
    chosen = set(rng.choice(silent, size=min(n_marks, len(silent)), replace=False).tolist()) if silent else set()
    return [i in chosen for i in range(len(example.tokens))]
