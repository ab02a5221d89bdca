"""sae_kit.autointerp: explain every SAE feature in words with an LLM, and score how well each explanation predicts
where the feature fires (detection, fuzzing) and what steering it does (intervention).

    from sae_kit import autointerp
    autointerp.explain("runs/topk-k32-...", n=32)                       # local SmolLM2 backend (plumbing only)
    autointerp.score("runs/topk-k32-...", scorers=("detection", "fuzz"))

Both write into the run's feature index (`index/autointerp/`, see `store`), resumably, and return the written table.
"""

from __future__ import annotations

from typing import Any


def explain(run, model=None, client=None, **settings: Any):
    """Explain features of the SAE(s) `run` stands for; `settings` are the fields of `autointerp.run.ExplainConfig`.
    Returns the explanations of the (last) SAE as a pandas DataFrame."""
    from pathlib import Path

    from sae_kit.autointerp.run import ExplainConfig
    from sae_kit.autointerp.run import explain as _explain

    return _explain(ExplainConfig(run=Path(run), **settings), model=model, client=client)


def score(run, model=None, client=None, **settings: Any):
    """Score the explanations of the SAE(s) `run` stands for; `settings` are the fields of `autointerp.run.ScoreConfig`.
    Returns the per-feature scores of the (last) SAE as a pandas DataFrame."""
    from pathlib import Path

    from sae_kit.autointerp.run import ScoreConfig
    from sae_kit.autointerp.run import score as _score

    return _score(ScoreConfig(run=Path(run), **settings), model=model, client=client)
