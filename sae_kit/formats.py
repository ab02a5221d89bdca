"""Peer SAE directory formats: SAELens (the cfg.json of SAELens >= 6 and of earlier versions) and EleutherAI sparsify.

`load_sae` detects the format from the files present (`detect_format`); `SAE.save(path, format=...)` writes one.
Checked against the source of SAELens 6.54.12 (sae_lens/saes/*.py, loading/pretrained_sae_loaders.py) and sparsify
1.3.3 (sparse_coder.py, fused_encoder.py, config.py) plus earlier sparsify revisions.

SAELens, encode f = act((x − b_dec·apply_b_dec_to_input)·W_enc + b_enc), decode x̂ = f·W_dec + b_dec:
  standard ↔ relu; topk ↔ topk (TopK of z, then ReLU); abstopk ↔ abstopk (top-k of |z|, signed); jumprelu
  (ReLU(z)·1[z > θ]) ↔ jumprelu, and also ← mutual_choice / feature_choice, whose inference rule r·1[r > θ], r = ReLU(z),
  is the same function for every θ (SAELens itself saves a trained batchtopk SAE as jumprelu with its global
  threshold; `metadata.training_architecture` = "batchtopk" brings it back as mutual_choice, "matryoshka_batchtopk"
  as matryoshka_batchtopk, its `matryoshka_widths` becoming our prefix fractions); gated ↔ gated (SAELens names the
  gate bias b_gate: it is our b_enc; r_mag and b_mag as they are); matching_pursuit ↔ mpsae
  when no residual-norm stop is used (SAELens's `residual_threshold` is absolute, ours is relative to ||x − b_dec||).
  Folded exactly into the weights on load: `rescale_acts_by_decoder_norm` (W_enc·n, b_enc·n, W_dec/n with n the atom
  norms, as SAELens's own fold), a pre-6 `finetuning_scaling_factor` s (W_dec ← s·W_dec: SAELens decodes (f·s)·W_dec),
  old checkpoints' `log_threshold`, a batchtopk checkpoint's scalar `topk_threshold`. A jumprelu θ <= 0 acts as
  θ = 0 in SAELens (ReLU first); sae-kit's θ is positive, so it becomes the dtype's smallest normal number.
  `apply_b_dec_to_input` missing means True in every SAELens version (SAEConfig default, handle_pre_6_0_config); it is
  always written out. hook_z SAEs (`reshape_activations`) read the flattened [..., n_heads·d_head] input.
  Unsupported (SAEFormatError): transcoders, temporal, per-token input normalisation (constant_norm_rescale,
  layer_norm, covariance_whitening), pre-6 activation functions other than relu/topk.

sparsify, encode: top-k of ReLU((x − b_dec)·encoder.weightᵀ + encoder.bias) (the same dense code as ReLU of the top-k
  of z), decode: Σ f_i·W_dec[i] + b_dec; encoder.weight is [d_sae, d_in], W_dec is [d_sae, d_in]. b_dec is subtracted
  for every SAE and skipped only for transcoders (`transcode`), whatever `normalize_decoder` says. SAELens's own
  sparsify converter gets this wrong: it sets apply_b_dec_to_input = not normalize_decoder, transposes W_dec to
  [d_in, d_sae], ignores `signed` and maps any folder containing "layers.N" to blocks.N.hook_resid_post. Early
  sparsify's `signed` (top-k of |z|, no ReLU) loads as abstopk. Unsupported: transcoders, skip connections, groupmax.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_kit.atomic import atomic_dir, save_tensors, write_json
from sae_kit.errors import SaeKitError
from sae_kit.sae import (
    CFG_FILE,
    DTYPES,
    NORMALIZE_ACTIVATIONS,
    SAE,
    SPARSITY_FILE,
    WEIGHTS_FILE,
    SAEConfig,
    SAEFormatError,
    dtype_name,
    load_sparsity,
    package_version,
    read_cfg,
    read_tensors,
)
from sae_kit.sparsifiers import ARCHITECTURES, canonical_name, get_sparsifier

SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
SAELENS_CFG_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version when the SAE carries none >= 6: SAELens reads it to pick its v6 cfg parser."""

_SAELENS_ARCHITECTURES = {
    "standard": "relu",
    "topk": "topk",
    "abstopk": "abstopk",
    "jumprelu": "jumprelu",
    "batchtopk": "mutual_choice",
    "matching_pursuit": "mpsae",
    "gated": "gated",
}
_SAELENS_UNSUPPORTED = {
    "transcoder": "transcoders (they predict another hook's output)",
    "skip_transcoder": "transcoders",
    "jumprelu_transcoder": "transcoders",
    "jumprelu_skip_transcoder": "transcoders",
    "temporal": "temporal SAEs",
    "matryoshka_batchtopk": "matryoshka checkpoints (load the jumprelu SAE SAELens saves after training)",
}
_PRE6_RENAMES = {
    "hook_point": "hook_name",
    "hook_point_head_index": "hook_head_index",
    "hook_point_layer": "hook_layer",
    "activation_fn_str": "activation_fn",
}
_PRE6_METADATA = (
    "model_name",
    "hook_name",
    "hook_layer",
    "hook_head_index",
    "model_class_name",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "sae_lens_training_version",
)
_SAELENS_TENSORS: dict[tuple[str, str], str] = {("gated", "b_enc"): "b_gate"}
"""(SAELens architecture, our tensor name) -> SAELens's name for it, where they differ (renamed back on load)."""
_SAELENS_JUMPRELU_TRAINED = ("mutual_choice", "feature_choice", "matryoshka_batchtopk")
"""Our batch-level rules that SAELens stores as jumprelu: metadata.training_architecture brings them back."""
_SAELENS_NAMES = {"relu": "standard", "mutual_choice": "batchtopk", "mpsae": "matching_pursuit"}
"""Our architecture -> the SAELens name written as metadata.training_architecture."""
_SPARSIFY_UNSUPPORTED = {
    "transcode": "a transcoder (it predicts another hook's output)",
    "skip_connection": "a skip connection (W_skip)",
    "embed_skip": "an embedding skip connection",
    "gram_lookup": "an n-gram lookup subtracted from its input",
}


def _integral(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer() and value >= 1


def _make_sae(cfg_file: Path, fields: dict[str, Any], tensors: dict[str, Tensor], source: Path) -> SAE:
    try:
        sae = SAE(SAEConfig.from_dict(fields))
    except (SaeKitError, TypeError, ValueError) as err:
        raise SAEFormatError(f"{cfg_file}: {err}") from None
    sae.load_weights(tensors, source=str(source))
    return sae


def _check_shapes(tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], file: Path) -> None:
    for name, shape in shapes.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise SAEFormatError(
                f"{file}: {name} has shape {tuple(tensors[name].shape)}, but this format stores it as "
                f"{shape} for cfg.json's d_in and d_sae; check the tensor's orientation"
            )


# ------------------------------------------------------------------------------------------------------- detection
def detect_format(path: Path) -> tuple[str, dict[str, Any]]:
    """("sae_kit" | "saelens" | "sparsify", cfg.json content) for the SAE directory `path`.

    sae_kit: cfg.json whose metadata has sae_kit_version + sae_weights.safetensors; saelens: any other cfg.json +
    sae_weights.safetensors; sparsify: cfg.json + sae.safetensors (or a cfg.json with num_latents/expansion_factor
    and no d_sae).
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist, so it is not an SAE directory")
    if not path.is_dir():
        raise SAEFormatError(f"{path} is a file; pass the SAE directory that holds it")
    cfg_file = path / CFG_FILE
    weights = [name for name in (WEIGHTS_FILE, SPARSIFY_WEIGHTS_FILE) if (path / name).is_file()]
    if not cfg_file.is_file():
        if weights:
            raise FileNotFoundError(f"{cfg_file} is missing; an SAE directory needs {CFG_FILE} beside {weights[0]}")
        hooks = sorted(p.name for p in path.iterdir() if (p / CFG_FILE).is_file())
        if hooks:
            raise SAEFormatError(
                f"{path} holds {len(hooks)} SAE(s), one per hook (a sparsify run); pass one of: "
                + ", ".join(str(path / name) for name in hooks)
            )
        raise SAEFormatError(
            f"{path} is not an SAE directory: sae-kit and SAELens need {CFG_FILE} + {WEIGHTS_FILE}, "
            f"sparsify needs {CFG_FILE} + {SPARSIFY_WEIGHTS_FILE} (its runs hold one such folder per hook)"
        )
    raw = read_cfg(cfg_file)
    metadata = raw.get("metadata")
    if isinstance(metadata, dict) and "sae_kit_version" in metadata:
        return "sae_kit", raw
    if weights == [SPARSIFY_WEIGHTS_FILE] or (
        not weights and "d_sae" not in raw and ("num_latents" in raw or "expansion_factor" in raw)
    ):
        return "sparsify", raw
    return "saelens", raw


# ---------------------------------------------------------------------------------------------------------- SAELens
def _saelens_v6(raw: dict[str, Any]) -> bool:
    """SAELens's own rule (handle_config_defaulting): a cfg is v6 when sae_lens_version (top level or metadata) >= 6."""
    metadata = raw.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    version = raw.get("sae_lens_version") or metadata.get("sae_lens_version")
    match = re.match(r"\d+", str(version or ""))
    return match is not None and int(match.group()) >= 6


def _saelens_cfg(raw: dict[str, Any], cfg_file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(flat cfg in SAELens 6 terms, metadata) from a v6 or pre-6 cfg.json, following SAELens's handle_pre_6_0_config."""
    if _saelens_v6(raw):
        return raw, dict(raw["metadata"]) if isinstance(raw.get("metadata"), dict) else {}
    cfg = {_PRE6_RENAMES.get(key, key): value for key, value in raw.items()}
    cfg.setdefault("architecture", "standard")
    activation = cfg.get("activation_fn") or "relu"
    k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    if activation == "topk" and k is not None:
        cfg |= {"architecture": "topk", "k": k}
    elif activation != "relu":
        raise SAEFormatError(
            f"{cfg_file}: pre-6 SAELens activation_fn={activation!r} is unsupported; sae-kit reads relu and topk (with activation_fn_kwargs.k)"
        )
    norm = cfg.get("normalize_activations")
    if norm is None or isinstance(norm, bool):
        cfg["normalize_activations"] = "expected_average_only_in" if norm else "none"
    return cfg, {key: cfg[key] for key in _PRE6_METADATA if key in cfg}


def _saelens_fields(
    name: str, cfg: dict[str, Any], metadata: dict[str, Any], cfg_file: Path
) -> tuple[str, dict[str, Any]]:
    """Our architecture and its rule fields for SAELens architecture `name`: training-only settings from
    metadata.training_architecture_details (SAELens's record of how the SAE was trained), inference ones from cfg."""
    arch = _SAELENS_ARCHITECTURES[name]
    details = metadata.get("training_architecture_details")
    details = details if isinstance(details, dict) else {}
    trained_as = str(metadata.get("training_architecture"))
    trained_as = canonical_name(trained_as) if trained_as in ARCHITECTURES else trained_as
    if arch == "jumprelu" and trained_as in _SAELENS_JUMPRELU_TRAINED and _integral(details.get("k")):
        arch = trained_as
    rule = get_sparsifier(arch)
    config_fields = (*(("k",) if rule.uses_k else ()), *rule.Config().to_flat())
    fields = {key: details[key] for key in config_fields if key in details}
    if "threshold_ema" in config_fields and "topk_threshold_lr" in details:
        fields.setdefault("threshold_ema", details["topk_threshold_lr"])  # SAELens batchtopk's name for the EMA rate
    widths = details.get("matryoshka_widths")  # SAELens's absolute prefix widths (the last one may be d_sae)
    if (
        "matryoshka_prefix_fractions" in config_fields
        and isinstance(widths, list)
        and all(_integral(w) for w in widths)
    ):
        fields.setdefault("matryoshka_prefix_fractions", tuple(w / cfg["d_sae"] for w in widths if w < cfg["d_sae"]))
    if name in ("topk", "abstopk", "batchtopk"):
        fields["k"] = cfg.get("k", 100)  # SAELens's default k
    if arch == "mpsae":
        if cfg.get("residual_threshold", 1e-2) != 0:
            raise SAEFormatError(
                f"{cfg_file}: matching_pursuit residual_threshold={cfg.get('residual_threshold', 1e-2)!r} stops on an "
                "absolute residual norm, which sae-kit cannot express (its mp_stop_residual is relative); use 0"
            )
        steps = cfg.get("max_iterations") or cfg["d_in"]  # SAELens's default: d_in
        fields |= {
            "mp_stop_residual": 0.0,
            "mp_signed": False,
            "mp_stop_on_same_support": bool(cfg.get("stop_on_duplicate_support", True)),
        }
        fields.setdefault("k", min(steps, cfg["d_sae"]))
        fields["mp_max_steps"] = None if fields["k"] == steps else steps  # None: k steps
    if _integral(fields.get("k")):
        fields["k"] = int(fields["k"])
    return arch, fields


def read_saelens(path: Path, raw: dict[str, Any], device: str | None = None, dtype: str | None = None) -> SAE:
    """Load a SAELens directory (cfg.json + sae_weights.safetensors [+ sparsity.safetensors]) as an sae-kit SAE, on
    `device` or else the CPU (as SAELens's load_from_disk: its cfg.json often names the GPU it was trained on)."""
    cfg_file, weights_file = path / CFG_FILE, path / WEIGHTS_FILE
    cfg, metadata = _saelens_cfg(raw, cfg_file)
    name = cfg.get("architecture")
    if name in _SAELENS_UNSUPPORTED:
        raise SAEFormatError(
            f"{cfg_file}: SAELens architecture {name!r} is unsupported: sae-kit has no {_SAELENS_UNSUPPORTED[name]}"
        )
    if name not in _SAELENS_ARCHITECTURES:
        raise SAEFormatError(
            f"{cfg_file}: unknown SAELens architecture {name!r}; sae-kit reads {', '.join(_SAELENS_ARCHITECTURES)}"
        )
    missing = [key for key in ("d_in", "d_sae") if key not in cfg]
    if missing:
        raise SAEFormatError(f"{cfg_file} lacks {', '.join(missing)}; a SAELens cfg.json needs d_in and d_sae")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    norm = cfg.get("normalize_activations", "none")
    if norm not in NORMALIZE_ACTIVATIONS:
        raise SAEFormatError(
            f"{cfg_file}: normalize_activations={norm!r} rescales each token inside SAELens, which sae-kit "
            f"cannot do; it supports {', '.join(NORMALIZE_ACTIVATIONS)}"
        )
    if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise SAEFormatError(
            f"{cfg_file}: reshape_activations={cfg['reshape_activations']!r} is unsupported; use none or hook_z"
        )
    if cfg.get("reshape_activations") == "hook_z":
        metadata["reshape_activations"] = "hook_z"

    tensors = {key: value.double() for key, value in read_tensors(weights_file).items()}  # fold in float64, cast once
    for (saelens_arch, ours), theirs in _SAELENS_TENSORS.items():
        if saelens_arch == name and theirs in tensors and ours not in tensors:
            tensors[ours] = tensors.pop(theirs)
    _check_shapes(
        tensors,
        {
            "W_enc": (d_in, d_sae),
            "b_enc": (d_sae,),
            "W_dec": (d_sae, d_in),
            "b_dec": (d_in,),
            "threshold": (d_sae,),
            "log_threshold": (d_sae,),
            "scaling_factor": (d_sae,),
            "topk_threshold": (),
        },
        weights_file,
    )
    if "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if "topk_threshold" in tensors:
        tensors["threshold"] = tensors.pop("topk_threshold").expand(d_sae).clone()
    scale = tensors.pop("scaling_factor", None)
    if scale is not None and not bool((scale == 1).all()):
        if not cfg.get("finetuning_scaling_factor"):
            raise SAEFormatError(
                f"{weights_file} holds a scaling_factor but cfg.json's finetuning_scaling_factor is false; set it to true"
            )
        tensors["W_dec"] = tensors["W_dec"] * scale[:, None]
    if cfg.get("rescale_acts_by_decoder_norm") and name in ("topk", "abstopk", "batchtopk") and "W_dec" in tensors:
        norms = tensors["W_dec"].norm(dim=-1).clamp_min(1e-8)
        tensors |= {
            "W_enc": tensors["W_enc"] * norms,
            "b_enc": tensors["b_enc"] * norms,
            "W_dec": tensors["W_dec"] / norms[:, None],
        }

    arch, fields = _saelens_fields(name, cfg, metadata, cfg_file)
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    if arch == "mpsae" and not apply_b_dec and "b_dec" in tensors:
        tensors["b_dec"] = torch.zeros_like(tensors["b_dec"])  # SAELens then neither subtracts nor adds b_dec
        apply_b_dec = True
    dtype = dtype or str(cfg.get("dtype", "float32")).removeprefix("torch.")
    if arch == "jumprelu" and "threshold" in tensors and dtype in DTYPES:
        tensors["threshold"] = tensors["threshold"].clamp_min(torch.finfo(DTYPES[dtype]).tiny)
    sae = _make_sae(
        cfg_file,
        {
            "architecture": arch,
            "d_in": d_in,
            "d_sae": d_sae,
            "dtype": dtype,
            "device": device or "cpu",
            "apply_b_dec_to_input": apply_b_dec,
            "normalize_activations": norm,
            "metadata": metadata,
            **fields,
        },
        tensors,
        weights_file,
    )
    return load_sparsity(sae, path).eval()


def write_saelens(sae: SAE, path: Path) -> Path:
    """Write `sae` as a SAELens >= 6 directory that `sae_lens.SAE.load_from_disk` loads with identical codes.

    The rule's `saelens_name` says what it loads as (None: refused, e.g. gsae, whose encode needs dLoss/dx):
    relu -> standard, topk/abstopk -> topk/abstopk (rescale_acts_by_decoder_norm false), jumprelu, mutual_choice,
    feature_choice and matryoshka_batchtopk -> jumprelu with their inference thresholds (the same function), gated ->
    gated (b_enc saved as b_gate), mpsae -> matching_pursuit (needs mp_stop_residual = 0 and mp_signed false). Our
    architecture and its settings go to metadata.training_architecture(_details), as SAELens does for its own SAEs.
    """
    cfg = sae.cfg
    arch = canonical_name(cfg.architecture)
    saelens_arch = cfg.rule.saelens_name
    if saelens_arch is None:
        raise SAEFormatError(
            f"SAELens has no architecture that encodes like {arch!r}, so an export would not load there; "
            "save it as sae_kit (the default format)"
        )
    extra: dict[str, Any] = {}
    if saelens_arch in ("topk", "abstopk"):
        extra = {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    elif saelens_arch == "matching_pursuit":
        mp: Any = cfg.rule_config
        if mp.stop_residual or mp.signed:
            raise SAEFormatError(
                "SAELens matching_pursuit has no relative residual stop and no signed pursuit; "
                "set mp_stop_residual=0 and mp_signed=False to save it as saelens"
            )
        extra = {
            "residual_threshold": 0.0,
            "max_iterations": mp.max_steps or cfg.k,
            "stop_on_duplicate_support": mp.stop_on_same_support,
        }
    trained_as = _SAELENS_NAMES.get(arch, arch)
    metadata = {key: value for key, value in cfg.metadata.items() if key != "sae_kit_version"}
    details = (
        metadata.get("training_architecture_details") if metadata.get("training_architecture") == trained_as else None
    )
    details = details if isinstance(details, dict) else {}
    metadata = {
        **dict.fromkeys(("model_name", "hook_name", "hook_head_index", "context_size", "prepend_bos", "dataset_path")),
        **metadata,
        "sae_lens_version": metadata.get("sae_lens_version") if _saelens_v6(metadata) else SAELENS_CFG_VERSION,
        "training_architecture": trained_as,
        "training_architecture_details": {
            **details,
            **({"k": cfg.k} if cfg.rule.uses_k else {}),
            **cfg.settings.to_flat(),
        },
        "sae_kit_export_version": package_version(),
    }
    out = {
        "architecture": saelens_arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": dtype_name(sae.W_dec.dtype),
        "device": str(sae.W_dec.device),
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": metadata.get("reshape_activations", "none"),
        **extra,
        "metadata": metadata,
    }
    weights = {_SAELENS_TENSORS.get((saelens_arch, name), name): t for name, t in sae.weights().items()}
    with atomic_dir(path) as tmp:
        save_tensors(tmp / WEIGHTS_FILE, weights, metadata={"format": "pt"})
        write_json(tmp / CFG_FILE, out)
        if sae.sparsity is not None:
            save_tensors(tmp / SPARSITY_FILE, {"sparsity": sae.sparsity}, metadata={"format": "pt"})
    return path


# --------------------------------------------------------------------------------------------------------- sparsify
def _sparsify_metadata(path: Path) -> dict[str, Any]:
    """The hookpoint (the folder name), its TransformerLens hook when it is a block output, and the run's config.json."""
    name = path.resolve().name
    metadata: dict[str, Any] = {"hookpoint": name}
    layer = re.fullmatch(r"(?:.*\.)?layers\.(\d+)", name)
    if layer:
        metadata |= {"hook_name": f"blocks.{layer.group(1)}.hook_resid_post", "hook_layer": int(layer.group(1))}
    run_cfg = path.resolve().parent / "config.json"
    if run_cfg.is_file():
        try:
            run = read_cfg(run_cfg)
        except SAEFormatError:
            return metadata  # the run's config is provenance only
        metadata |= {
            ours: run[theirs]
            for theirs, ours in (("model", "model_name"), ("dataset", "dataset_path"), ("ctx_len", "context_size"))
            if theirs in run
        }
    return metadata


def read_sparsify(path: Path, raw: dict[str, Any], device: str | None = None, dtype: str | None = None) -> SAE:
    """Load a sparsify SAE folder (cfg.json + sae.safetensors) as an sae-kit topk (abstopk when `signed`) SAE, in
    the weights' dtype, on `device` or else the CPU."""
    cfg_file, weights_file = path / CFG_FILE, path / SPARSIFY_WEIGHTS_FILE
    for key, what in _SPARSIFY_UNSUPPORTED.items():
        if raw.get(key):
            raise SAEFormatError(f"{cfg_file}: sparsify {key}=true makes {what}, which sae-kit does not support")
    if raw.get("activation", "topk") != "topk":
        raise SAEFormatError(
            f"{cfg_file}: sparsify activation={raw['activation']!r} is unsupported; sae-kit reads topk"
        )
    if not isinstance(raw.get("d_in"), int):
        raise SAEFormatError(
            f"{cfg_file} lacks an integer d_in; a sparsify cfg.json records it beside the coder's settings"
        )
    d_in = raw["d_in"]
    d_sae = raw.get("num_latents") or d_in * raw.get("expansion_factor", 32)
    tensors = read_tensors(weights_file)
    names = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    if set(tensors) != names:
        raise SAEFormatError(
            f"{weights_file} holds {sorted(tensors)}; a sparsify SAE holds exactly {sorted(names)}"
            + (" (W_skip: a skip connection, unsupported)" if "W_skip" in tensors else "")
        )
    _check_shapes(
        tensors,
        {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)},
        weights_file,
    )
    fields = {
        "architecture": "abstopk" if raw.get("signed") else "topk",
        "d_in": d_in,
        "d_sae": d_sae,
        "k": raw.get("k", 32),
        "dtype": dtype or str(tensors["encoder.weight"].dtype).removeprefix("torch."),
        "device": device or "cpu",
        "apply_b_dec_to_input": True,
        "metadata": _sparsify_metadata(path),
    }
    ours = {
        "W_enc": tensors["encoder.weight"].t(),
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    return _make_sae(cfg_file, fields, ours, weights_file).eval()


def write_sparsify(sae: SAE, path: Path) -> Path:
    """Write a topk SAE as a sparsify folder (cfg.json + sae.safetensors) that `sparsify.SparseCoder.load_from_disk`
    loads with identical codes; name the folder after the hookpoint (e.g. layers.6) inside a run directory.

    apply_b_dec_to_input=False is folded into encoder.bias (sparsify always encodes x − b_dec); normalize_decoder is
    written true because SAELens's sparsify converter drops the b_dec subtraction when it is false. Metadata is not
    kept (sparsify's cfg.json has no place for it).
    """
    cfg = sae.cfg
    if canonical_name(cfg.architecture) != "topk":
        raise SAEFormatError(
            f"sparsify stores per-token TopK SAEs only; save the {cfg.architecture} SAE as sae_kit or saelens"
        )
    if cfg.normalize_activations != "none":
        raise SAEFormatError(
            f"sparsify has no input normalisation and this SAE expects {cfg.normalize_activations!r} inputs; "
            "fold the scale in first (SAE.fold_activation_scale)"
        )
    w = sae.weights()
    b_enc = w["b_enc"] if cfg.apply_b_dec_to_input else w["b_enc"] + w["b_dec"] @ w["W_enc"]
    out = {
        "activation": "topk",
        "expansion_factor": cfg.d_sae // cfg.d_in,
        "normalize_decoder": True,
        "num_latents": cfg.d_sae,
        "k": cfg.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": cfg.d_in,
    }
    with atomic_dir(path) as tmp:
        save_tensors(
            tmp / SPARSIFY_WEIGHTS_FILE,
            {"encoder.weight": w["W_enc"].t(), "encoder.bias": b_enc, "W_dec": w["W_dec"], "b_dec": w["b_dec"]},
            metadata={"format": "pt"},
        )
        write_json(tmp / CFG_FILE, out)
    return path


READERS: dict[str, Callable[..., SAE]] = {"saelens": read_saelens, "sparsify": read_sparsify}
"""Format name -> reader(path, cfg.json content, device=, dtype=) for the peer formats."""
WRITERS: dict[str, Callable[[SAE, Path], Path]] = {"saelens": write_saelens, "sparsify": write_sparsify}
"""Format name -> writer(sae, path) for the peer formats."""
