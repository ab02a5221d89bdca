"""sae-kit: sparse autoencoders for language-model interpretability.

Harvest activations with TransformerLens hooks, cache them on disk, train SAEs, evaluate and browse them.
"""

from sae_kit.activations import Harvester, HarvestConfig, contexts, harvester_for, stream
from sae_kit.data import PackConfig, load_corpus, pack
from sae_kit.models import DEFAULT_HOOK, DEFAULT_MODEL, HookError, ModelError, hook_names, load_model, validate_hooks
from sae_kit.rows import ActivationRows
from sae_kit.sae import SAE, SAEConfig, load_sae

__version__ = "0.1.0"
