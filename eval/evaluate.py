"""`evaluate`: the whole job behind `sae-kit eval A B C ...` — every measurement on held-out tokens, one report.

Each SAE (an SAE directory, a run directory, or a sweep run directory, which stands for all its members) is
evaluated on held-out documents of its training corpus, tokenised as in training. SAEs on the same hook share the
same tokens and clean activations, so their numbers compare directly; several widths on one hook also get the
dark-matter cross-width analysis, and several SAEs get the comparison table and Pareto plots.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tyro

from sae_kit import rundir
from sae_kit.config_files import to_jsonable
from sae_kit.eval import attention, compare, core, dark_matter, dead, signs, steering
from sae_kit.eval.inputs import EvalError, EvalInputs, Section, prepare, with_sae
from sae_kit.eval.report import build_report, save_report, write_figures, write_plotly_js
from sae_kit.heldout import harvest_config_for
from sae_kit.sae import SAE
from sae_kit.sae_io import load_sae

DEFAULT_TOKENS = 32768
"""Held-out tokens `sae-kit eval` reads by default (more where dark matter needs them: `eval_tokens`)."""
SectionName = Literal["core", "dead", "dark_matter", "steering", "attention", "signs"]


@dataclass
class EvalConfig:
    """Evaluate SAEs on held-out tokens: core metrics, dead features, dark matter, steering; report.json + figures.

    `sae-kit eval --config eval.yaml` reads these settings from a YAML/JSON file (flags override it).
    """

    saes: tyro.conf.Positional[tuple[Path, ...]] = ()
    """SAE directories, run directories (their sae/) or sweep run directories (all members)."""
    out: Path | None = None
    """Where report.json and figures/ go (None: <run dir>/eval for one SAE directory, else runs/eval-<date-time>)."""
    model: str | None = None
    """The LM (None: the model the SAEs were trained on, from their metadata)."""
    hook: str | None = None
    """The hook the SAEs read (None: each SAE's metadata.hook_name; needed for SAEs that do not record it)."""
    tokens: int | None = None
    """Held-out token positions to evaluate on (the reconstruction, dead-feature and dark-matter statistics). None:
    32768, or what dark matter needs for the widest SAE's d_in where that is more (~38k at d_in 2304, ~68k at 4096;
    see DarkMatterConfig.tokens_needed)."""
    corpus: str | None = None
    """Corpus (None: the SAEs' training corpus; its held-out documents are used)."""
    context_size: int | None = None
    """Context length (None: the SAEs' training context length)."""
    lm_batch_size: int = 16
    """Contexts per LM forward pass."""
    sections: tuple[SectionName, ...] = ("core", "dead", "dark_matter", "steering", "attention", "signs")
    """Measurements to run (attention only applies to SAEs on attn.hook_z, signs only to signed rules such as abstopk)."""
    core: core.CoreConfig = field(default_factory=core.CoreConfig)
    """Core metrics (CE/KL passes)."""
    dark_matter: dark_matter.DarkMatterConfig = field(default_factory=dark_matter.DarkMatterConfig)
    """Dark-matter regressions."""
    steering: steering.SteeringConfig = field(default_factory=steering.SteeringConfig)
    """Steering protocol."""
    seed: int = 0
    """Seed of every random choice (regression split, feature samples)."""
    png: bool = True
    """Also write PNG figures when a static renderer (kaleido + Chrome) is available."""
    device: str | None = None
    """Torch device for the LM and SAEs (None: cuda if available, else cpu)."""


def evaluate(cfg: EvalConfig, model=None, saes: dict[str, SAE] | None = None) -> dict[str, Any]:
    """Run the evaluation, write report.json and the figures, print nothing; returns the report (with "out" set).

    `saes` adds SAEs already in memory (by name) to those in cfg.saes.
    """
    from sae_kit.models import load_model

    if not cfg.saes and not saes:
        raise EvalError("name at least one SAE: sae-kit eval RUN_OR_SAE_DIR [...]")
    if cfg.tokens is not None and cfg.tokens < 1:
        raise EvalError(f"--tokens must be positive, got {cfg.tokens}")
    found = rundir.resolve(cfg.saes)
    entries: list[tuple[str, Path | None, SAE]] = [
        (f.name, f.sae_dir, load_sae(f.sae_dir, device=cfg.device)) for f in found
    ]
    # An SAE of the caller's that gets its input scale folded in is copied first, so the caller's object is unchanged.
    entries += [
        (name, None, copy.deepcopy(sae) if sae.cfg.normalize_activations != "none" else sae)
        for name, sae in (saes or {}).items()
    ]
    cfg = dataclasses.replace(cfg, tokens=eval_tokens(cfg, [sae for _, _, sae in entries]))
    model_name = cfg.model or entries[0][2].cfg.metadata.get("model_name")
    model = model or load_model(model_name, device=cfg.device)
    out = Path(
        cfg.out
        or (found[0].run_dir / rundir.EVAL_DIR if len(entries) == len(found) == 1 else rundir.default_eval_dir())
    )
    shared: dict[tuple, EvalInputs] = {}
    evaluated, prepare_seconds = [], []
    for _, _, sae in entries:  # the cheap part first, so bad settings fail before minutes of measuring
        start = time.perf_counter()
        evaluated.append(_inputs(shared, cfg, model, sae))
        prepare_seconds.append(round(time.perf_counter() - start, 2))
        if "dark_matter" in cfg.sections:
            dark_matter.check(evaluated[-1], cfg.dark_matter)
    measured = [_measure(cfg, inputs) for inputs in evaluated]
    out.mkdir(parents=True, exist_ok=True)  # nothing is written until every measurement has succeeded
    write_plotly_js(out)
    reports: list[dict[str, Any]] = []
    png = cfg.png
    for (name, path, sae), inputs, (sections, seconds), prep in zip(entries, evaluated, measured, prepare_seconds):
        figures: dict[str, str] = {}
        for section_name, section in sections.items():
            paths, png = write_figures(
                out, _slug(name), {f"{section_name}-{k}": f for k, f in section.figures.items()}, png
            )
            figures |= paths
        reports.append(
            {
                "name": name,
                "path": None if path is None else str(path),
                "architecture": sae.cfg.architecture,
                "d_sae": sae.cfg.d_sae,
                "k": sae.cfg.k if sae.cfg.rule.uses_k else None,
                "hook": inputs.hook,
                "tokens": len(inputs.x),
                "data": _data_settings(inputs),
                "input_scale": inputs.input_scale,
                "sections": {k: s.metrics for k, s in sections.items()},
                "figures": figures,
                "seconds": {"prepare": prep, **seconds},
                "summary": [line for s in sections.values() for line in s.lines],
            }
        )
    comparison = _comparison(cfg, out, reports, evaluated, png)
    first = evaluated[0]
    settings = {
        "model": getattr(model, "sae_kit_name", model_name),
        "hooks": sorted({r["hook"] for r in reports}),
        "tokens": len(first.x),
        "requested_tokens": cfg.tokens,
        "contexts": int(first.contexts.tokens.shape[0]),
        "context_size": int(first.contexts.tokens.shape[1]),
        "corpus": cfg.corpus or entries[0][2].cfg.metadata.get("dataset_path"),
        "split": "heldout",
        "seed": cfg.seed,
        "sections": list(cfg.sections),
        "config": to_jsonable(dataclasses.asdict(cfg)),
    }
    report = build_report(settings, reports, comparison)
    save_report(out, report)
    return report | {"out": str(out)}


def eval_tokens(cfg: EvalConfig, saes: list[SAE]) -> int:
    """cfg.tokens, or its default: DEFAULT_TOKENS, raised to what dark matter needs for the widest SAE's d_in when
    that section runs (its regressions need ten tokens per input dimension)."""
    if cfg.tokens is not None:
        return cfg.tokens
    if "dark_matter" not in cfg.sections:
        return DEFAULT_TOKENS
    needs = [
        cfg.dark_matter.tokens_needed(
            sae.cfg.d_in,
            harvest_config_for(sae, hook=cfg.hook, context_size=cfg.context_size).context_size,
            cfg.lm_batch_size,
        )
        for sae in saes
    ]
    return max([DEFAULT_TOKENS, *needs])


def summary_text(report: dict[str, Any]) -> str:
    """The plain-text summary `sae-kit eval` prints."""
    s = report["settings"]
    short = (
        f" (asked for {s['requested_tokens']:,}: the held-out split holds no more)"
        if s["tokens"] < s["requested_tokens"]
        else ""
    )
    lines = [
        f"evaluated on {s['tokens']:,} held-out tokens{short} ({s['contexts']} contexts of {s['context_size']}) of {s['corpus']}, "
        f"model {s['model']}, seed {s['seed']}"
    ]
    for sae in report["saes"]:
        k = "" if sae["k"] is None else f", k {sae['k']}"
        lines += ["", f"{sae['name']} ({sae['architecture']}, d_sae {sae['d_sae']}{k}) at {sae['hook']}"]
        lines += [f"  {line}" for line in sae["summary"]]
    if report.get("comparison"):
        lines += ["", *report["comparison"]["summary"]]
    lines += ["", f"report: {Path(report['out']) / 'report.json'}"]
    return "\n".join(lines)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _inputs(shared: dict[tuple, EvalInputs], cfg: EvalConfig, model, sae: SAE) -> EvalInputs:
    """Held-out inputs for `sae`, shared with earlier SAEs of the same hook and data settings (corpus, split,
    tokenisation and position rules: every field of the SAE's harvest config) that read gradients alike."""
    if not (cfg.hook or sae.cfg.metadata.get("hook_name")):
        raise EvalError(
            "the SAE does not record its hook (cfg.json metadata.hook_name); pass --hook, e.g. --hook blocks.6.hook_resid_post"
        )
    data = harvest_config_for(
        sae, hook=cfg.hook, corpus=cfg.corpus, context_size=cfg.context_size, lm_batch_size=cfg.lm_batch_size
    )
    key = (tuple(sorted(dataclasses.asdict(data).items())), sae.sparsifier.uses_grad)
    if key not in shared:
        shared[key] = prepare(
            model,
            sae,
            eval_tokens(cfg, [sae]),
            hook=cfg.hook,
            corpus=cfg.corpus,
            context_size=cfg.context_size,
            lm_batch_size=cfg.lm_batch_size,
            seed=cfg.seed,
        )
        return shared[key]
    return with_sae(shared[key], sae)


def _data_settings(inputs: EvalInputs) -> dict[str, Any]:
    """The data settings an SAE was evaluated with (its own: corpus, held-out split, tokenisation, position rules)."""
    keys = (
        "corpus",
        "holdout_fraction",
        "context_size",
        "prepend_bos",
        "packing",
        "separator",
        "exclude_special_tokens",
        "exclude_first_position",
    )
    return {k: getattr(inputs.data, k) for k in keys} | {"contexts": int(inputs.contexts.tokens.shape[0])}


def _measure(cfg: EvalConfig, inputs: EvalInputs) -> tuple[dict[str, Section], dict[str, float]]:
    """Every requested measurement that applies to this SAE, and the seconds each took."""
    runs = {
        "core": lambda: core.measure(inputs, cfg.core),
        "dead": lambda: dead.measure(inputs),
        "dark_matter": lambda: dark_matter.measure(inputs, cfg.dark_matter),
        "steering": lambda: steering.measure(inputs, cfg.steering),
        "attention": lambda: attention.measure(inputs),
        "signs": lambda: signs.measure(inputs),
    }
    applies = {
        "steering": inputs.hook.endswith(("hook_resid_post", "hook_resid_pre", "hook_resid_mid")),
        "attention": attention.is_attention_hook(inputs.hook),
        "signs": signs.applies(inputs),
    }
    out: dict[str, Section] = {}
    seconds: dict[str, float] = {}
    for name in cfg.sections:
        if applies.get(name, True):
            start = time.perf_counter()
            out[name] = runs[name]()
            seconds[name] = round(time.perf_counter() - start, 2)
    inputs._encoded = None  # the sections share one encoding; drop it (x̂ is as large as x) before the next SAE
    return out, seconds


def _comparison(cfg: EvalConfig, out: Path, reports: list[dict], evaluated: list[EvalInputs], png: bool) -> dict | None:
    """The comparison across SAEs (several SAEs), with dark matter across widths (several widths on one hook)."""
    if len(reports) < 2:
        return None
    section = compare.compare(reports)
    figures, png = write_figures(out, "comparison", section.figures, png)
    result: dict[str, Any] = {"table": section.metrics["table"], "figures": figures, "summary": section.lines}
    same_tokens: dict[tuple[str, int], list[EvalInputs]] = {}  # SAEs sharing one hook and one set of held-out tokens
    for inputs in evaluated:
        same_tokens.setdefault((inputs.hook, id(inputs.x)), []).append(inputs)
    for (hook, _), group in same_tokens.items():
        if "dark_matter" in cfg.sections and len({i.sae.cfg.d_sae for i in group}) > 1:
            cross = dark_matter.cross_width(group, cfg.dark_matter)
            key = (
                hook if hook not in result.get("cross_width", {}) else f"{hook}#{len(result['cross_width'])}"
            )  # other data settings
            paths, png = write_figures(
                out, "comparison", {f"cross_width-{key}-{k}": f for k, f in cross.figures.items()}, png
            )
            result.setdefault("cross_width", {})[key] = cross.metrics | {"figures": paths}
            result["summary"] = result["summary"] + cross.lines
    return result
