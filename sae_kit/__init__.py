"""sae-kit: sparse autoencoders for language-model interpretability.

Harvest activations with TransformerLens hooks, cache them on disk, train SAEs, evaluate and browse them.
"""

from sae_kit.activations import HarvestConfig, Harvester, contexts, harvester_for, stream
from sae_kit.attribution import Attribution, attribute, logit_diff, loss_at, top_features
from sae_kit.data import PackConfig, load_corpus, pack
from sae_kit.models import DEFAULT_HOOK, DEFAULT_MODEL, HookError, ModelError, hook_names, load_model, validate_hooks
from sae_kit.rows import ActivationRows
from sae_kit.sae import SAE, SAEConfig
from sae_kit.sae_io import load_sae, save_sae
from sae_kit.splice import SAE_HOOKS, intervene, sae_hook_name, spliced, steer

__version__ = "0.1.0"


def evaluate(*saes, model=None, **settings):
    """Evaluate SAEs on held-out tokens and write report.json + figures; returns the report as a dict.

    `saes` are SAE/run/sweep directories or in-memory `SAE` objects; `settings` are the fields of
    `sae_kit.eval.evaluate.EvalConfig` (out, tokens, sections, core, dark_matter, steering, seed, ...).
    """
    from pathlib import Path

    from sae_kit.eval.evaluate import EvalConfig
    from sae_kit.eval.evaluate import evaluate as run

    paths = tuple(Path(s) for s in saes if not isinstance(s, SAE))
    loaded = {f"sae{i}": s for i, s in enumerate(saes) if isinstance(s, SAE)}
    return run(EvalConfig(saes=paths, **settings), model=model, saes=loaded)
