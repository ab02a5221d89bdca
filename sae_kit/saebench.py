"""SAEBench's custom-SAE protocol for any sae-kit SAE: `sae.to_saebench()` returns a `SAEBenchAdapter`.

SAEBench (sae_bench/custom_saes/base_sae.py and custom_sae_config.py) evaluates an nn.Module with encode(x) -> dense
codes, decode(f), forward(x) -> reconstruction, parameters W_enc [d_in, d_sae], W_dec [d_sae, d_in] (unit-norm rows:
check_decoder_norms), b_enc, b_dec, `dtype` and `device` attributes kept current by `to(...)`, and a `cfg` with the
fields of its CustomSAEConfig (model_name, d_in, d_sae, hook_layer, hook_name, context_size, dtype, architecture, ...).
SAEBench versions built on SAELens 6 read the provenance from `cfg.metadata` instead, so it is offered there too.

Our SAEConfig keeps hook_name in `metadata` and dtype as a string, so the adapter is a thin wrapper that shares the
SAE's parameters rather than a second config on `SAE`. MP-SAE has no encoder: the adapter shows the tied W_decᵀ as
W_enc and zeros as b_enc (as SAELens's MatchingPursuitSAE does) while encode runs the pursuit. g-SAE cannot receive
dLoss/dx through SAEBench, so it encodes with its plain-TopK selection (and warns once).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sae_kit.errors import SaeKitError
from sae_kit.sparsifiers import ALIASES

if TYPE_CHECKING:
    from sae_kit.sae import SAE

_METADATA_FIELDS = (
    "model_name",
    "hook_name",
    "hook_layer",
    "hook_head_index",
    "context_size",
    "prepend_bos",
    "dataset_path",
    "neuronpedia_id",
    "sae_lens_training_version",
    "sae_lens_version",
    "model_from_pretrained_kwargs",
)


@dataclass
class SAEBenchConfig:
    """SAEBench's CustomSAEConfig fields (the core eval reads several of them through SAELens internals)."""

    model_name: str
    d_in: int
    d_sae: int
    hook_layer: int
    hook_name: str
    context_size: int | None = None
    hook_head_index: int | None = None
    architecture: str = ""
    apply_b_dec_to_input: bool = True
    finetuning_scaling_factor: bool = False
    activation_fn_str: str = ""
    activation_fn_kwargs: dict[str, Any] = field(default_factory=dict)
    prepend_bos: bool = True
    normalize_activations: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    model_from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset_path: str = ""
    dataset_trust_remote_code: bool = True
    seqpos_slice: tuple = (None,)
    training_tokens: int = -100_000
    sae_lens_training_version: str | None = None
    sae_lens_version: str | None = None
    neuronpedia_id: str | None = None

    @property
    def metadata(self) -> SimpleNamespace:
        """The provenance fields as SAELens 6's `cfg.metadata` (model_name, hook_name, hook_layer, ...)."""
        return SimpleNamespace(**{name: getattr(self, name) for name in _METADATA_FIELDS})


def _required(value: Any, name: str, hint: str) -> Any:
    if value is None:
        raise SaeKitError(f"to_saebench: {name} is unknown (the SAE's metadata has none); pass {name}={hint}")
    return value


class SAEBenchAdapter(nn.Module):
    """An sae-kit SAE seen through SAEBench's custom-SAE protocol; it shares (not copies) the SAE's parameters."""

    def __init__(
        self,
        sae: SAE,
        *,
        model_name: str | None = None,
        hook_name: str | None = None,
        hook_layer: int | None = None,
        context_size: int | None = None,
    ) -> None:
        super().__init__()
        self.sae = sae.eval()
        meta, cfg = sae.cfg.metadata, sae.cfg
        hook_name = _required(hook_name or meta.get("hook_name"), "hook_name", "'blocks.6.hook_resid_post'")
        if hook_layer is None:
            hook_layer = meta.get("hook_layer")
        if hook_layer is None and (block := re.match(r"blocks\.(\d+)\.", hook_name)):
            hook_layer = int(block.group(1))
        architecture = ALIASES.get(cfg.architecture, cfg.architecture)
        self.cfg = SAEBenchConfig(
            model_name=_required(model_name or meta.get("model_name"), "model_name", "the TransformerLens model name"),
            d_in=cfg.d_in,
            d_sae=cfg.d_sae,
            hook_name=hook_name,
            hook_layer=_required(hook_layer, "hook_layer", "the block index of hook_name"),
            context_size=context_size or meta.get("context_size"),
            hook_head_index=meta.get("hook_head_index"),
            architecture=architecture,
            apply_b_dec_to_input=cfg.apply_b_dec_to_input,
            activation_fn_str="topk" if cfg.rule.uses_k else "relu",
            activation_fn_kwargs={"k": cfg.k} if cfg.rule.uses_k else {},
            prepend_bos=meta.get("prepend_bos", True) is not False,
            normalize_activations=cfg.normalize_activations,
            dataset_path=meta.get("dataset_path") or "",
            sae_lens_version=meta.get("sae_lens_version"),
        )
        self.dtype: torch.dtype
        self.device: torch.device
        self._sync()

    # SAEBench reads these as attributes of the SAE.
    @property
    def W_enc(self) -> Tensor:
        """[d_in, d_sae]; MP-SAE: the tied W_decᵀ."""
        return self.sae.W_enc if self.sae.cfg.rule.uses_encoder else self.sae.W_dec.t()

    @property
    def b_enc(self) -> Tensor:
        """[d_sae]; MP-SAE: zeros."""
        return self.sae.b_enc if self.sae.cfg.rule.uses_encoder else self.sae.W_dec.new_zeros(self.sae.cfg.d_sae)

    @property
    def W_dec(self) -> nn.Parameter:
        """[d_sae, d_in]: one atom per row."""
        return self.sae.W_dec

    @property
    def b_dec(self) -> nn.Parameter:
        """[d_in]."""
        return self.sae.b_dec

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes [..., d_sae] of x [..., d_in] (the SAE's inference rule)."""
        return self.sae.encode(x)

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Reconstruction [..., d_in] from dense codes."""
        return self.sae.decode(feature_acts)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of x, shaped like x."""
        return self.sae(x).x_hat

    @torch.no_grad()
    def check_decoder_norms(self) -> bool:
        """Whether every atom has unit norm (tolerance 1e-2 in 16-bit dtypes, else 1e-5, as SAEBench's BaseSAE)."""
        norms = self.W_dec.norm(dim=-1)
        tolerance = 1e-2 if self.W_dec.dtype in (torch.bfloat16, torch.float16) else 1e-5
        return bool(torch.allclose(norms, torch.ones_like(norms), atol=tolerance))

    def _sync(self) -> None:
        """Keep `dtype`, `device` and cfg.dtype/cfg.device equal to the parameters'."""
        self.dtype, self.device = self.sae.W_dec.dtype, self.sae.W_dec.device
        self.cfg.dtype, self.cfg.device = str(self.dtype).removeprefix("torch."), str(self.device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SAEBenchAdapter:
        """Every move or cast (to, cuda, half, float, ...) goes through here; resync the attributes after it."""
        super()._apply(fn, recurse)
        self._sync()
        return self
