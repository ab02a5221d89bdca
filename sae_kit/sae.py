"""The `SAE` module (one class for every architecture), its `SAEConfig`, and the file-level helpers of SAE directories.

Saving and loading whole directories (sae-kit's own and the peer formats) live in `sae_kit.sae_io`, above this module
and `sae_kit.formats`; `SAE.save` is a shortcut to `sae_kit.sae_io.save_sae`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from sae_kit.errors import SaeKitError
from sae_kit.kernels import pair_decode
from sae_kit.sparsifiers import ARCHITECTURES, DEFAULT_ARCHITECTURE, Codes, Sparsifier, get_sparsifier
from sae_kit.sparsifiers.base import RuleConfig

if TYPE_CHECKING:
    from sae_kit.saebench import SAEBenchAdapter

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
SPARSITY_FILE = "sparsity.safetensors"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
NORMALIZE_ACTIVATIONS = ("none", "expected_average_only_in")
METADATA_KEYS = ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path", "exclude_special_tokens")
_COMMON_KEYS = ("architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations")


class SAEFormatError(SaeKitError):
    """An SAE directory exists but a file in it is unreadable or does not match cfg.json."""


def dtype_name(dtype: torch.dtype) -> str:
    """The cfg.json name of a torch dtype (a key of DTYPES)."""
    return next(name for name, dt in DTYPES.items() if dt == dtype)


def package_version() -> str:
    """The installed sae-kit version ("unknown" when it is not installed)."""
    try:
        return importlib_metadata.version("sae-kit")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


@dataclass(kw_only=True)
class SAEConfig:
    """Everything needed to rebuild an SAE; saved as cfg.json (common keys, the rule's fields, `metadata`)."""

    architecture: str = DEFAULT_ARCHITECTURE
    """The architecture: a name or alias in sae_kit.sparsifiers.REGISTRY (topk, abstopk, gsae, mpsae, mutual_choice,
    feature_choice, relu, jumprelu, gated, matryoshka_batchtopk, ...)."""
    d_in: int
    """Width of the activations the SAE reads (the hook's d_model)."""
    d_sae: int
    """Number of latents (dictionary atoms)."""
    k: int = 32
    """Active latents per token, for rules with `uses_k`: exact for topk/abstopk/gsae, the batch average for
    mutual_choice/feature_choice, the number of pursuit steps for mpsae."""
    dtype: str = "float32"
    """Parameter dtype (float32, float64, bfloat16, float16); train in float32."""
    device: str = "cpu"
    """torch device the SAE is built on."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (required for mpsae)."""
    normalize_activations: str = "none"
    """Input normalisation the SAE expects: "none" (raw activations), or "expected_average_only_in" (inputs scaled
    so that E||x|| = sqrt(d_in)). `SAE.fold_activation_scale` folds the scale in and sets "none"."""
    rule_config: RuleConfig | None = None
    """The architecture's own settings (an instance of its rule's `Config`; None: that rule's defaults). cfg.json
    writes its fields flat beside the common keys (gsae_beta, mp_max_steps, threshold_ema, jumprelu_bandwidth, ...)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free provenance filled by the trainer: model_name, hook_name, context_size, prepend_bos, dataset_path,
    exclude_special_tokens, and any other JSON-serialisable facts. Saving adds sae_kit_version (the version that
    wrote the SAE first; a loaded SAE keeps it)."""

    def __post_init__(self) -> None:
        def fail(msg: str) -> NoReturn:
            raise SaeKitError(f"SAEConfig: {msg}")

        if not isinstance(self.architecture, str):
            fail(f"architecture={self.architecture!r}; use one of: {', '.join(ARCHITECTURES)}")
        try:
            get_sparsifier(self.architecture)
        except SaeKitError as err:
            fail(str(err))
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(f"{name}={value!r}; use a positive integer")
        rule = self.rule
        if rule.uses_k:
            if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
                fail(f"k={self.k!r}; use an integer k >= 1")
            if self.k > self.d_sae:
                fail(f"k={self.k} exceeds d_sae={self.d_sae}; use k <= d_sae or a wider SAE")
        self.dtype = self.dtype.removeprefix("torch.") if isinstance(self.dtype, str) else self.dtype
        if self.dtype not in DTYPES:
            fail(f"dtype={self.dtype!r}; use one of: {', '.join(DTYPES)}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            fail(f"device={self.device!r} is not a torch device; use e.g. 'cpu', 'cuda' or 'cuda:0'")
        if self.normalize_activations not in NORMALIZE_ACTIVATIONS:
            fail(
                f"normalize_activations={self.normalize_activations!r}; use one of: {', '.join(NORMALIZE_ACTIVATIONS)}"
            )
        if not self.apply_b_dec_to_input and not rule.uses_encoder:
            fail(f"{self.architecture} pursues the residual x − b_dec; set apply_b_dec_to_input=True")
        if self.rule_config is None:
            self.rule_config = rule.Config()
        elif type(self.rule_config) is not rule.Config:
            fail(
                f"rule_config is a {type(self.rule_config).__name__}, but architecture {self.architecture!r} takes a {rule.Config.__name__}"
            )
        try:
            self.rule_config.check()
        except SaeKitError as err:
            fail(str(err))
        if not isinstance(self.metadata, dict):
            fail(f"metadata={self.metadata!r}; use a dict")
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as err:
            fail(f"metadata must be JSON-serialisable ({err}); convert paths and tensors to str/float")

    @property
    def rule(self) -> type[Sparsifier]:
        """The sparsifier class for `architecture`."""
        return get_sparsifier(self.architecture)

    @property
    def settings(self) -> RuleConfig:
        """`rule_config`, never None once the config is built."""
        assert self.rule_config is not None
        return self.rule_config

    @property
    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a torch.dtype."""
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        """cfg.json content: the common keys, k (for rules that use it), the rule's settings flat, and `metadata`
        with every standard key."""
        out = {key: getattr(self, key) for key in _COMMON_KEYS}
        if self.rule.uses_k:
            out["k"] = self.k
        out |= self.settings.to_flat()
        out["metadata"] = {**dict.fromkeys(METADATA_KEYS), "sae_kit_version": package_version(), **self.metadata}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Rebuild from flat cfg.json content (that of every sae-kit version); keys sae-kit does not know are ignored."""
        missing = [key for key in ("architecture", "d_in", "d_sae") if key not in data]
        if missing:
            raise ValueError(
                f"SAEConfig: cfg lacks {', '.join(missing)}; an SAE config needs architecture, d_in and d_sae"
            )
        if not isinstance(data["architecture"], str):
            raise SaeKitError(
                f"SAEConfig: architecture={data['architecture']!r}; use one of: {', '.join(ARCHITECTURES)}"
            )
        try:
            rule_config = get_sparsifier(data["architecture"]).Config.from_flat(data)
        except SaeKitError as err:
            raise SaeKitError(f"SAEConfig: {err}") from None
        known = {f.name for f in fields(cls)} - {"rule_config"}
        return cls(**{key: value for key, value in data.items() if key in known}, rule_config=rule_config)


@dataclass(eq=False)
class SAEOutput:
    """What `SAE.forward` returns."""

    x_hat: Tensor
    """Reconstruction, shaped like the input."""
    codes: Codes
    """The code of the flattened batch [N, ...] (values/indices or dense, pre-activations, aux hooks)."""

    @property
    def z(self) -> Tensor | None:
        """Detached encoder pre-activations [N, d_sae] (None for MP-SAE)."""
        return self.codes.z


class SAE(nn.Module):
    """A sparse autoencoder: x̂ = f·W_dec + b_dec, where the code f comes from the rule named by cfg.architecture.

    `train()` selects the training-time rule (batch allocation for mutual/feature choice, k fixed MP steps) and
    `eval()` the inference rule (learned thresholds, adaptive MP stopping). Inputs may have leading dimensions
    [..., d_in]; they are cast to the parameter dtype.
    """

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        rule = cfg.rule
        dtype, device = cfg.torch_dtype, cfg.device
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, dtype=dtype, device=device)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        if rule.uses_encoder:
            self.W_enc = nn.Parameter(W_dec.t().clone())
            self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype, device=device))
        self.sparsifier = rule(cfg)
        self.sparsity: Tensor | None = None
        """log10 feature density [d_sae], written to sparsity.safetensors when set (or passed to `save`)."""

    @property
    def threshold(self) -> Tensor | None:
        """Inference thresholds [d_sae] (mutual/feature choice, jumprelu), else None."""
        return getattr(self.sparsifier, "threshold", None)

    # ----------------------------------------------------------------------------------------------- encode/decode
    def _flat(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"input has last dimension {x.shape[-1]}, but this SAE reads d_in={self.cfg.d_in}")
        return x.reshape(-1, self.cfg.d_in).to(self.W_dec.dtype)

    def forward_codes(self, x: Tensor, grad: Tensor | None = None, **options: Any) -> Codes:
        """The code of x [..., d_in] as the rule returns it (flattened to N tokens), with pre-activations and aux hooks.

        `grad` (dLoss/dx, shaped like x) is read by gsae and ignored by other rules; `options` are rule keywords
        (mpsae: max_steps, stop_residual, stop_on_same_support).
        """
        x = self._flat(x)
        if grad is not None:
            if grad.shape[-1] != self.cfg.d_in or grad.numel() != x.numel():
                raise ValueError(f"grad has shape {tuple(grad.shape)}; pass dLoss/dx with the shape of x")
            grad = self._flat(grad)
        xc = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        return self.sparsifier(self, xc, grad, **options)

    def decode_codes(self, codes: Codes) -> Tensor:
        """x̂ [N, d_in] from `forward_codes` output: a sparse gather for (values, indices), a matmul for dense codes."""
        if codes.dense is not None:
            return codes.dense @ self.W_dec + self.b_dec
        crow, cols, values = codes.pairs()
        return pair_decode(values, crow, cols, self.W_dec) + self.b_dec

    def forward(self, x: Tensor, grad: Tensor | None = None, **options: Any) -> SAEOutput:
        """Encode and decode: x̂ shaped like x, plus the codes the losses need."""
        codes = self.forward_codes(x, grad, **options)
        return SAEOutput(x_hat=self.decode_codes(codes).reshape(x.shape), codes=codes)

    def encode(self, x: Tensor, grad: Tensor | None = None, **options: Any) -> Tensor:
        """Dense codes [..., d_sae]; g-SAE takes grad=dLoss/dx (without it: plain TopK, with a one-time warning)."""
        return self.forward_codes(x, grad, **options).to_dense().reshape(*x.shape[:-1], self.cfg.d_sae)

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction [..., d_in] from dense codes [..., d_sae]."""
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    # ------------------------------------------------------------------------------------------ trainer helpers
    @torch.no_grad()
    def init_b_dec(self, x: Tensor, method: str = "geometric_median", max_iter: int = 100, tol: float = 1e-6) -> None:
        """Set b_dec to the mean or the geometric median (Weiszfeld iterations) of a sample x [..., d_in]."""
        x = self._flat(x).double()
        center = x.mean(0)
        if method == "geometric_median":
            for _ in range(max_iter):
                weights = 1 / (x - center).norm(dim=-1).clamp_min(1e-12)
                new = (weights[:, None] * x).sum(0) / weights.sum()
                moved = (new - center).norm()
                center = new
                if moved <= tol * center.norm().clamp_min(1e-12):
                    break
        elif method != "mean":
            raise ValueError(f"init_b_dec: method={method!r}; use 'mean' or 'geometric_median'")
        self.b_dec.copy_(center)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale every atom (row of W_dec) to unit L2 norm."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project each atom's gradient onto the tangent space of its unit sphere: g_i ← g_i − (g_i·d_i)d_i/||d_i||²."""
        grad = self.W_dec.grad
        if grad is None:
            return
        W = self.W_dec
        coef = (grad * W).sum(-1, keepdim=True) / W.square().sum(-1, keepdim=True).clamp_min(1e-12)
        grad.sub_(coef * W)

    @torch.no_grad()
    def fold_activation_scale(self, scale: float) -> None:
        """The SAE was trained on x·scale; make it take raw x and return raw x̂ (codes shrink by `scale`).

        Divides b_dec, b_enc and any threshold by `scale` (atoms stay unit-norm and W_enc is unchanged), sets
        normalize_activations to "none" and records the folded scale in metadata["activation_scale_folded"].
        """
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"fold_activation_scale: scale={scale!r}; use a finite value > 0")
        self.b_dec.div_(scale)
        if self.cfg.rule.uses_encoder:
            self.b_enc.div_(scale)
        self.sparsifier.fold_scale(scale)
        self.cfg.normalize_activations = "none"
        self.cfg.metadata["activation_scale_folded"] = self.cfg.metadata.get("activation_scale_folded", 1.0) * scale

    # ---------------------------------------------------------------------------------------------------- I/O
    def weights(self) -> dict[str, Tensor]:
        """The tensors of sae_weights.safetensors, under SAELens names (detached): the shared ones and the rule's own."""
        out: dict[str, Tensor] = {"W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.cfg.rule.uses_encoder:
            out |= {"W_enc": self.W_enc, "b_enc": self.b_enc}
        out |= self.sparsifier.state_tensors()
        return {name: t.detach() for name, t in out.items()}

    def save(self, path: str | Path, sparsity: Tensor | None = None, format: str = "sae_kit") -> Path:
        """Write the SAE directory atomically (see `sae_kit.sae_io.save_sae`)."""
        from sae_kit.sae_io import save_sae

        return save_sae(self, path, sparsity=sparsity, format=format)

    def to_saebench(self, **cfg: Any) -> SAEBenchAdapter:
        """This SAE behind SAEBench's custom-SAE protocol (sharing its parameters), in eval mode; `cfg` overrides
        model_name, hook_name, hook_layer or context_size. See `sae_kit.saebench`."""
        from sae_kit.saebench import SAEBenchAdapter

        return SAEBenchAdapter(self, **cfg)

    @torch.no_grad()
    def load_weights(self, tensors: dict[str, Tensor], source: str = "weights") -> None:
        """Copy SAELens-named tensors into the SAE, checking names, shapes and finiteness (SAEFormatError on mismatch)."""
        expected = {name: tuple(t.shape) for name, t in self.weights().items()}
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise SAEFormatError(
                f"{source}: architecture {self.cfg.architecture!r} needs tensors {sorted(expected)}, "
                f"but {'lacks ' + str(missing) if missing else 'has extra ' + str(unexpected)}"
            )
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise SAEFormatError(
                    f"{source}: {name} has shape {tuple(tensors[name].shape)}, but cfg.json implies {shape}"
                )
            bad = int((~torch.isfinite(tensors[name])).sum()) if tensors[name].is_floating_point() else 0
            if bad:
                raise SAEFormatError(
                    f"{source}: {name} holds {bad} NaN/inf value(s), so every code and reconstruction would be "
                    "NaN; re-train the SAE or load an earlier checkpoint"
                )
        cast = {name: tensors[name].to(device=self.W_dec.device, dtype=self.W_dec.dtype) for name in expected}
        own = set(self.sparsifier.state_tensors())
        for name, value in cast.items():
            if name not in own:
                getattr(self, name).copy_(value)
        try:
            self.sparsifier.load_state_tensors({name: cast[name] for name in own})
        except ValueError as err:
            raise SAEFormatError(f"{source}: {err}") from None


def read_tensors(file: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors; FileNotFoundError when missing, SAEFormatError when damaged."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; an SAE directory needs it beside {CFG_FILE}")
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises SafetensorError, OSError or ValueError on damaged files
        raise SAEFormatError(f"{file} is not a readable safetensors file ({err}); re-save the SAE") from None


def read_cfg(file: Path) -> dict[str, Any]:
    """cfg.json as a dict (SAEFormatError when it is not a JSON object)."""
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAEFormatError(f"{file} is not valid JSON ({err}); re-save the SAE") from None
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{file} holds a {type(raw).__name__}, not a JSON object; re-save the SAE")
    return raw


def load_sparsity(sae: SAE, path: Path) -> SAE:
    """Attach `path`/sparsity.safetensors (log10 feature densities, SAELens layout) to `sae` when it exists."""
    sparsity_file = path / SPARSITY_FILE
    if sparsity_file.exists():
        sparsity = read_tensors(sparsity_file).get("sparsity")
        if sparsity is None or tuple(sparsity.shape) != (sae.cfg.d_sae,):
            raise SAEFormatError(
                f"{sparsity_file} needs a 'sparsity' tensor of shape ({sae.cfg.d_sae},); re-save the SAE"
            )
        sae.sparsity = sparsity
    return sae
