"""Where autointerp results live: columnar files inside the run's feature index, each written atomically.

    index/autointerp/
      explain.json            settings, explainer model, prompt version, the SAE's SHA-256, counts, timings, tokens
      explanations.parquet    one row per explained feature (EXPLANATIONS)
      score.json              the same for scoring, plus `summary`: each scorer's score distribution over features
      scores.parquet          one row per (feature, scorer) (SCORES)
      predictions.parquet     one row per judged example (PREDICTIONS): what the judge saw and said, for auditing
      responses/              the on-disk response cache (a rerun or resumed run never asks twice)
      .work/                  per-feature results of an unfinished run (deleted once the tables are written)

Readers (the browser, notebooks) open it with `Results`.
"""

from __future__ import annotations

import json
import math
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sae_kit.atomic import atomic_path
from sae_kit.autointerp.types import AutoInterpError

DIR = "autointerp"
SCHEMA = "sae-kit/autointerp"
VERSION = 1
EXPLAIN_META = "explain.json"
SCORE_META = "score.json"
SCORERS = ("detection", "fuzz", "intervention")
"""Every scorer, in the order they run and show."""
HEADLINE = "balanced_accuracy"
"""The per-feature number each scorer is summarised and sorted by."""

EXPLANATIONS = pa.schema(
    [
        ("feature", pa.int32()),
        ("explanation", pa.string()),  # null when the answer could not be parsed (ok false)
        ("ok", pa.bool_()),
        ("raw", pa.string()),  # the explainer's whole answer
        ("n_examples", pa.int32()),  # activating contexts shown to the explainer
        ("rows", pa.list_(pa.int32())),  # their index context rows (the test set never uses them)
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
    ]
)
SCORES = pa.schema(
    [
        ("feature", pa.int32()),
        ("scorer", pa.string()),
        ("n", pa.int32()),  # examples judged (parse failures included)
        ("n_pos", pa.int32()),
        ("n_neg", pa.int32()),
        ("failures", pa.int32()),  # answers that could not be parsed (excluded from the metrics)
        ("balanced_accuracy", pa.float64()),
        ("accuracy", pa.float64()),
        ("precision", pa.float64()),
        ("recall", pa.float64()),
        ("f1", pa.float64()),
        ("auroc", pa.float64()),  # NaN without answer probabilities or without both classes
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("strength", pa.float64()),  # intervention: the steering strength reached (NaN for the other scorers)
        ("kl", pa.float64()),  # intervention: the mean next-token KL at that strength (NaN otherwise)
    ]
)
PREDICTIONS = pa.schema(
    [
        ("feature", pa.int32()),
        ("scorer", pa.string()),
        ("example", pa.int32()),
        ("row", pa.int32()),  # index context row (-1 for intervention prompts)
        ("kind", pa.string()),  # activating | random | hard | misplaced | steered | clean
        ("band", pa.int8()),  # activation-quantile band of an activating example (-1 otherwise)
        ("start", pa.int32()),  # position of the window's first token in its row (-1 for intervention prompts)
        ("label", pa.bool_()),
        ("prediction", pa.int8()),  # 1 / 0, or -1 when the answer could not be parsed
        ("prob", pa.float32()),  # P(positive answer) from the answer probabilities, NaN without them
        ("text", pa.string()),  # what the judge was shown (highlights included)
        ("answer", pa.string()),  # what the judge wrote (or "error: ..." when no answer came back)
    ]
)


def folder(index_dir: str | Path) -> Path:
    return Path(index_dir) / DIR


def write_table(target: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    """Write `rows` (dicts with the schema's fields) as a parquet file, atomically."""
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)


def read_table(file: Path) -> pa.Table:
    try:
        return pq.read_table(file)
    except (OSError, pa.ArrowException) as err:
        raise AutoInterpError(f"{file} is damaged ({type(err).__name__}); rerun the command that wrote it") from None


def distribution(values: list[float] | np.ndarray, bins: int = 20) -> dict[str, Any]:
    """Mean, median, spread and a [0, 1] histogram of per-feature scores (NaNs left out and counted)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    counts, edges = np.histogram(finite, bins=bins, range=(0.0, 1.0))
    stat = lambda f: float(f(finite)) if len(finite) else math.nan  # noqa: E731
    return {
        "n": int(len(finite)),
        "missing": int(len(v) - len(finite)),
        "mean": stat(np.mean),
        "median": stat(np.median),
        "std": stat(np.std),
        "p10": float(np.quantile(finite, 0.1)) if len(finite) else math.nan,
        "p90": float(np.quantile(finite, 0.9)) if len(finite) else math.nan,
        "hist_edges": [float(e) for e in edges],
        "hist_counts": [int(c) for c in counts],
    }


class Results:
    """The autointerp results of one index, opened read-only (any part may be missing: explained but not scored)."""

    def __init__(self, index_dir: str | Path) -> None:
        self.path = folder(index_dir)

    def _meta(self, name: str) -> dict[str, Any] | None:
        file = self.path / name
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text())
        except (OSError, ValueError):
            raise AutoInterpError(f"{file} is damaged; rerun the command that wrote it") from None

    @cached_property
    def explain_meta(self) -> dict[str, Any] | None:
        return self._meta(EXPLAIN_META)

    @cached_property
    def score_meta(self) -> dict[str, Any] | None:
        return self._meta(SCORE_META)

    @property
    def has_explanations(self) -> bool:
        return (self.path / "explanations.parquet").is_file()

    @property
    def has_scores(self) -> bool:
        return (self.path / "scores.parquet").is_file()

    @cached_property
    def explanations(self):
        """pandas DataFrame of EXPLANATIONS (empty when there are none)."""
        file = self.path / "explanations.parquet"
        return (read_table(file) if file.is_file() else EXPLANATIONS.empty_table()).to_pandas()

    @cached_property
    def scores(self):
        """pandas DataFrame of SCORES (empty when there are none)."""
        file = self.path / "scores.parquet"
        return (read_table(file) if file.is_file() else SCORES.empty_table()).to_pandas()

    @cached_property
    def wide(self):
        """One row per explained feature: its explanation and each scorer's balanced accuracy and AUROC as columns
        (`detection`, `detection_auroc`, `fuzz`, ...), NaN where a scorer did not run."""
        df = self.explanations[["feature", "explanation", "ok"]].copy()
        s = self.scores
        for scorer in SCORERS:
            part = s[s["scorer"] == scorer].set_index("feature")
            df[scorer] = df["feature"].map(part[HEADLINE]) if len(part) else np.nan
            df[f"{scorer}_auroc"] = df["feature"].map(part["auroc"]) if len(part) else np.nan
        return df

    def scorers(self) -> list[str]:
        """Scorers with results, in SCORERS order."""
        present = set(self.scores["scorer"])
        return [s for s in SCORERS if s in present]

    def summary(self) -> dict[str, Any]:
        """score.json's summary (each scorer's distribution), or {} when not scored."""
        return (self.score_meta or {}).get("summary", {})

    def predictions(self, feature: int):
        """pandas DataFrame of the judged examples of one feature (empty when none), read with a row filter."""
        file = self.path / "predictions.parquet"
        if not file.is_file():
            return PREDICTIONS.empty_table().to_pandas()
        try:
            return pq.read_table(file, filters=[("feature", "==", int(feature))]).to_pandas()
        except (OSError, pa.ArrowException) as err:
            raise AutoInterpError(
                f"{file} is damaged ({type(err).__name__}); rerun the command that wrote it"
            ) from None
