"""`sae-kit reproduce`: one command that checks each founding paper's headline claim on a real model.

It harvests once (the default model's layer-6 residual stream and attention hook_z in one pass; a second, smaller
harvest with ∂CE/∂x for g-SAE), trains every comparison as a sweep on the same batches (one cache, one data seed, one
batch size: every run reads identical batches in identical order), evaluates the SAEs of each comparison on the same
held-out tokens, explains and scores a few features of each rule with an LLM, and writes `report.json`, `report.md`
and plotly figures with one section per paper (sae_kit.eval.claims).

    <out>/reproduce.json          the settings (a rerun with other settings is refused; the same settings resume)
    <out>/cache, cache-grads/     the two ActivationCaches (resumable)
    <out>/runs/<study>/           one training run (a sweep) per comparison (resumable with its checkpoints)
    <out>/eval/<group>/           one `sae-kit eval` report per group of SAEs that share held-out tokens
    <out>/runs/<study>/<member>/index/   the feature index and the auto-interp explanations and scores
    <out>/report.json, report.md, figures/

Every stage is resumable: a finished stage is skipped, an unfinished one continues (the cache and the training runs
from their own checkpoints, the index and auto-interp from their work folders), so a killed `reproduce` rerun with
the same settings ends with the same files. Every number in the report names the file and key it was read from.

Two sizes: the full run (4,608 latents, k 32, the whole default corpus for two epochs, two seeds of the seed
architectures: about an hour on 2 CPU cores) and `--quick` (1,152 latents, 32k tokens, one seed: a few minutes, the
CI smoke test). Any preset value can be overridden.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_kit import rundir
from sae_kit.activations import HarvestConfig
from sae_kit.atomic import write_json
from sae_kit.autointerp.examples import ExampleConfig
from sae_kit.autointerp.run import ClientConfig, ExplainConfig, ScoreConfig, explain, score
from sae_kit.build_cache import CacheConfig, build_cache
from sae_kit.cache import ActivationCache
from sae_kit.config_files import to_jsonable
from sae_kit.dashboards.indexer import IndexConfig, build_index
from sae_kit.errors import SaeKitError
from sae_kit.eval.core import CoreConfig
from sae_kit.eval.dark_matter import DarkMatterConfig
from sae_kit.eval.evaluate import EvalConfig, SectionName, evaluate
from sae_kit.eval.steering import SteeringConfig
from sae_kit.models import DEFAULT_HOOK
from sae_kit.training.run import RuleSettings, TrainRunConfig, train
from sae_kit.training.sweep import expand
from sae_kit.training.trainer import TrainConfig

log = logging.getLogger(__name__)

RESID = DEFAULT_HOOK
"""The residual hook every comparison but the attention one reads (layer 6 of SmolLM2's 30)."""
ATTN = "blocks.6.attn.hook_z"
"""The attention hook of the attention-SAE section (the per-head mixed values of the same layer)."""
SETTINGS = "reproduce.json"
TOPK, ABSTOPK, MC, FC, GSAE, MPSAE, JUMPRELU, RELU = (
    "topk", "abstopk", "mutual_choice", "feature_choice", "gsae", "mpsae", "jumprelu", "relu"
)  # fmt: skip
"""The architectures the founding papers compare: this plan (and its report) is the one place outside the plug-ins
that names them, as a sweep file would; nothing here branches on a name."""
SEED_ARCHITECTURES = (TOPK, ABSTOPK, MC, FC)
"""Trained at k with every seed in the main sweep (g-SAE has its own, from the gradient cache)."""


@dataclass(frozen=True)
class Scale:
    """How big each part of the run is (`FULL` or `QUICK`, with the config's overrides)."""

    d_sae: int
    """Latents of every SAE but the cross-width pair (d_sae/2 and 2·d_sae)."""
    k: int
    """The shared sparsity (k, the batch rules' budget, MP-SAE's steps, a JumpReLU target)."""
    seeds: int
    """Initialisation seeds of the seed architectures, Mutual Choice with aux_zipf, and g-SAE with its TopK."""
    tokens: int
    """Training tokens harvested into the main cache (the run stops early, with a warning, if the corpus runs out)."""
    epochs: int
    """Passes over the main cache."""
    batch_size: int
    """Tokens per optimiser step (and the batch the batch rules allocate over)."""
    grad_tokens: int
    """Training tokens harvested with ∂CE/∂x for the g-SAE comparison (a full forward and a backward per token)."""
    grad_epochs: int
    """Passes over the gradient cache."""
    heldout_tokens: int
    """The main cache's held-out split (each run's end-of-training FVU/L0/dead in summary.json)."""
    eval_tokens: int
    """Held-out token positions of every evaluation group but g-SAE's."""
    grad_eval_tokens: int
    """Held-out token positions of the g-SAE group (gradients needed), all of them in the CE passes."""
    ce_tokens: int
    """Positions of the downstream CE/KL passes (and dark matter's) of the other groups."""
    dark_matter_min_tokens: int | None
    """Fewest tokens the dark-matter regressions fit on (None: ten per regressor, eval's default)."""
    topk_ks: tuple[int, ...]
    """The TopK reference curve's other k (beside `k`)."""
    jumprelu_l0s: tuple[float, ...]
    """JumpReLU's target L0s (one run each)."""
    steer_features: int
    """Features the steering section samples per SAE."""
    steer_contexts: int
    """Held-out contexts each steering vector is applied to."""
    index_tokens: int
    """Held-out tokens the feature index reads (the auto-interp examples)."""
    autointerp_features: int
    """Features explained and scored per seed architecture (0: skip auto-interp)."""
    examples: ExampleConfig
    """Auto-interp example sampling."""


FULL = Scale(
    d_sae=4608,
    k=32,
    seeds=2,
    tokens=1_000_000,  # more than the default corpus holds (~620k training tokens): all of it
    epochs=2,
    batch_size=4096,
    grad_tokens=36_864,
    grad_epochs=8,
    heldout_tokens=16_384,
    eval_tokens=30_000,  # the default corpus's held-out documents hold ~31k kept tokens
    grad_eval_tokens=8192,
    ce_tokens=4096,
    dark_matter_min_tokens=None,
    topk_ks=(8, 16, 64, 128),
    jumprelu_l0s=(16.0, 32.0),
    steer_features=12,
    steer_contexts=4,
    index_tokens=30_000,
    autointerp_features=2,
    examples=ExampleConfig(),
)
QUICK = Scale(
    d_sae=1152,
    k=32,
    seeds=1,
    tokens=32_768,
    epochs=1,
    batch_size=1024,
    grad_tokens=2048,
    grad_epochs=4,
    heldout_tokens=4096,
    eval_tokens=4096,
    grad_eval_tokens=1024,
    ce_tokens=512,
    dark_matter_min_tokens=1200,
    topk_ks=(16, 64),
    jumprelu_l0s=(32.0,),
    steer_features=2,
    steer_contexts=1,
    index_tokens=4096,
    autointerp_features=1,
    examples=ExampleConfig(explain_top=4, test_per_band=1, n_random=2, pool_rows=16),
)


@dataclass
class ReproduceConfig:
    """Check each founding paper's headline claim on the embedded model: one harvest, a sweep per comparison on the
    same batches, one evaluation on the same held-out tokens; writes report.md, report.json and figures.

    A killed run continues where it stopped when rerun with the same settings.
    """

    out: Path = Path("runs/reproduce")
    """Directory for the caches, runs, evaluations and the report (rerun with the same settings to resume)."""
    quick: bool = False
    """The smoke-test size (1,152 latents, 32k tokens, one seed; a few minutes on 2 CPU cores) instead of the full run
    (4,608 latents, the whole default corpus for two epochs, two seeds; about an hour)."""
    model: str | None = None
    """The LM (None: the embedded SmolLM2-135M-Instruct)."""
    d_sae: int | None = None
    """Latents of every SAE but the cross-width ones (None: the preset's, 4608 or 1152 with --quick)."""
    k: int | None = None
    """The shared sparsity: k of the fixed-k rules, the batch rules' budget, MP-SAE's steps (None: 32)."""
    seeds: int | None = None
    """Seeds per seed architecture (None: 2, or 1 with --quick)."""
    tokens: int | None = None
    """Training tokens to harvest (None: the whole default corpus, or 32,768 with --quick)."""
    epochs: int | None = None
    """Passes over the harvested tokens (None: 2, or 1 with --quick)."""
    autointerp_features: int | None = None
    """Features explained and scored per rule (None: 2, or 1 with --quick; 0 skips auto-interp)."""
    client: ClientConfig = field(default_factory=ClientConfig)
    """The explainer and judge (default: the local SmolLM2, which is plumbing only; --client.backend openai
    --client.base-url URL --client.model NAME for a real one)."""
    device: str | None = None
    """Torch device (None: cuda if available, else cpu)."""
    progress: bool = True
    """Show progress bars."""

    def scale(self) -> Scale:
        base = QUICK if self.quick else FULL
        over = {
            name: getattr(self, name)
            for name in ("d_sae", "k", "seeds", "tokens", "epochs", "autointerp_features")
            if getattr(self, name) is not None
        }
        return check_scale(dataclasses.replace(base, **over))

    def settings(self) -> dict[str, Any]:
        """What the run computes (reproduce.json; `out`, `progress` and the judge may differ on a resume)."""
        return {"model": self.model, "scale": to_jsonable(dataclasses.asdict(self.scale()))}

    def judge(self) -> dict[str, Any]:
        """The auto-interp client's settings: another judge reruns only the auto-interp stages."""
        return to_jsonable(dataclasses.asdict(self.client))


def check_scale(scale: Scale) -> Scale:
    """One-line errors for sizes the plan cannot use."""
    for name in ("d_sae", "k", "seeds", "tokens", "epochs"):
        if getattr(scale, name) < 1:
            raise SaeKitError(f"--{name.replace('_', '-')} must be positive, got {getattr(scale, name)}")
    widest = max(scale.k, *scale.topk_ks)
    if 2 * widest > scale.d_sae:
        raise SaeKitError(
            f"--d-sae {scale.d_sae} is too narrow for the TopK curve up to k={widest} and the half-width SAE; "
            f"use --d-sae {2 * widest} or more"
        )
    if scale.autointerp_features < 0:
        raise SaeKitError(f"--autointerp-features must be 0 (skip) or more, got {scale.autointerp_features}")
    return scale


# ------------------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Study:
    """One training run: a sweep on one cache."""

    name: str
    cache: str
    """"main" or "grads"."""
    hook: str
    architectures: tuple[str, ...]
    ks: tuple[int, ...]
    d_saes: tuple[int, ...]
    seeds: tuple[int, ...]
    aux: str = "auto"
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per rule, settings that differ from its defaults."""


def studies(s: Scale) -> list[Study]:
    """Every training run, in the order they run."""
    seeds = tuple(range(s.seeds))
    one = (0,)
    out = [
        Study("main", "main", RESID, SEED_ARCHITECTURES, (s.k,), (s.d_sae,), seeds),
        Study("topk_curve", "main", RESID, ("topk",), s.topk_ks, (s.d_sae,), one),
        Study("mc_zipf", "main", RESID, ("mutual_choice",), (s.k,), (s.d_sae,), seeds, aux="zipf"),
        Study(
            "fc_uniform",
            "main",
            RESID,
            ("feature_choice",),
            (s.k,),
            (s.d_sae,),
            one,
            rules={"feature_choice": {"zipf_exponent": 0.0}},
        ),
        Study("mpsae", "main", RESID, ("mpsae",), (s.k,), (s.d_sae,), one),
        *[
            Study(
                f"jumprelu_l0_{int(t)}",
                "main",
                RESID,
                ("jumprelu",),
                (s.k,),
                (s.d_sae,),
                one,
                rules={"jumprelu": {"target_l0": t}},
            )
            for t in s.jumprelu_l0s
        ],
        Study("relu", "main", RESID, ("relu",), (s.k,), (s.d_sae,), one),
        Study("widths", "main", RESID, ("topk",), (s.k,), (s.d_sae // 2, s.d_sae * 2), one),
        Study("attention", "main", ATTN, ("topk",), (s.k,), (s.d_sae,), one),
        Study("gsae", "grads", RESID, ("gsae", "topk"), (s.k,), (s.d_sae,), seeds),
    ]
    return out


@dataclass(frozen=True)
class EvalGroup:
    """SAEs evaluated together, on the same held-out tokens."""

    name: str
    saes: tuple[str, ...]
    """Run directories or <run>/<member> paths, relative to <out>/runs."""
    sections: tuple[SectionName, ...]
    tokens: int
    """Held-out token positions (the same first positions of the same held-out documents in every group)."""
    ce_tokens: int


def sae_path(study: str, arch: str, k: int, d_sae: int, seed: int, scale: Scale) -> str:
    """Where (relative to <out>/runs) the SAE of that study and grid point is: the run itself when the study trains
    one SAE, else its sweep member <study>/<member> (training.sweep.expand's grid and names)."""
    plan = next(st for st in studies(scale) if st.name == study)
    team = expand(plan.architectures, plan.ks, plan.d_saes, plan.seeds)
    name = next((m.name for m in team if (m.architecture, m.d_sae, m.seed) == (arch, d_sae, seed) and m.k == k), None)
    if name is None:
        raise SaeKitError(f"study {study} trains no {arch} k={k} d_sae={d_sae} seed={seed}")
    return study if len(team) == 1 else f"{study}/{name}"


class Roles:
    """The SAEs each claim compares, as paths relative to <out>/runs (shared by the plan and the report)."""

    def __init__(self, s: Scale) -> None:
        seeds = range(s.seeds)

        def at(study: str, arch: str, k: int = s.k, d_sae: int = s.d_sae, seed: int = 0) -> str:
            return sae_path(study, arch, k, d_sae, seed, s)

        self.seeds = {a: [at("main", a, seed=i) for i in seeds] for a in SEED_ARCHITECTURES}
        self.curve = {k: at("topk_curve", "topk", k) for k in s.topk_ks} | {s.k: self.seeds["topk"][0]}
        self.mc_zipf = [at("mc_zipf", "mutual_choice", seed=i) for i in seeds]
        self.fc_uniform = at("fc_uniform", "feature_choice")
        self.mpsae = at("mpsae", "mpsae")
        self.jumprelu = [at(f"jumprelu_l0_{int(t)}", "jumprelu") for t in s.jumprelu_l0s]
        self.relu = at("relu", "relu")
        self.widths = [
            at("widths", "topk", d_sae=s.d_sae // 2),
            self.seeds["topk"][0],
            at("widths", "topk", d_sae=s.d_sae * 2),
        ]
        self.gsae = {a: [at("gsae", a, seed=i) for i in seeds] for a in ("gsae", "topk")}
        self.attention = at("attention", "topk")


def eval_groups(s: Scale) -> list[EvalGroup]:
    """Which SAEs are evaluated together, with which sections (the costly ones only where a claim needs them)."""
    r = Roles(s)
    resid = [p for a in SEED_ARCHITECTURES for p in r.seeds[a]]
    resid += [r.curve[k] for k in s.topk_ks] + r.mc_zipf + [r.fc_uniform, r.mpsae, *r.jumprelu, r.relu]
    steer = [r.seeds["topk"][0], *r.seeds["abstopk"]]
    gsae = r.gsae["gsae"] + r.gsae["topk"]
    return [
        EvalGroup("architectures", tuple(resid), ("core", "dead", "signs"), s.eval_tokens, s.ce_tokens),
        EvalGroup("widths", tuple(r.widths), ("core", "dark_matter"), s.eval_tokens, s.ce_tokens),
        EvalGroup("steering", tuple(steer), ("steering", "signs"), s.eval_tokens, s.ce_tokens),
        # gradients cost a full forward and a backward per token: fewer tokens, and CE on all of them
        EvalGroup("gsae", tuple(gsae), ("core", "dead", "steering"), s.grad_eval_tokens, s.grad_eval_tokens),
        EvalGroup("attention", (r.attention,), ("core", "dead", "attention"), s.eval_tokens, s.ce_tokens),
    ]


def autointerp_targets(s: Scale) -> list[str]:
    """The SAEs whose features are explained and scored (seed 0 of each seed architecture)."""
    return [Roles(s).seeds[a][0] for a in SEED_ARCHITECTURES]


# ------------------------------------------------------------------------------------------------------ the stages
def reproduce(cfg: ReproduceConfig, model=None, scale: Scale | None = None) -> dict[str, Any]:
    """Run (or resume) every stage and write the report; returns report.json's content (with "out").

    `scale` replaces the config's preset and overrides (benchmarks and tests size every part themselves)."""
    from sae_kit.models import load_model

    s = check_scale(scale) if scale is not None else cfg.scale()
    out = Path(cfg.out)
    _claim_dir(out, cfg.settings() | {"scale": to_jsonable(dataclasses.asdict(s))})
    stages: dict[str, Any] = _read(out / "stages.json") or {}
    model = model or load_model(cfg.model, device=cfg.device)

    def stage(name: str, fn) -> Any:
        if name in stages:
            return stages[name]["result"]
        start = time.perf_counter()
        result = fn()
        stages[name] = {"seconds": round(time.perf_counter() - start, 1), "commit": _commit(), "result": result}
        write_json(out / "stages.json", stages)
        return result

    caches = {
        "main": stage(
            "cache", lambda: _cache(out / "cache", (RESID, ATTN), s.tokens, s.heldout_tokens, False, cfg, model)
        ),
        "grads": stage(
            "cache-grads", lambda: _cache(out / "cache-grads", (RESID,), s.grad_tokens, 2048, True, cfg, model)
        ),
    }
    for study in studies(s):
        stage(f"train/{study.name}", lambda study=study: _train(out, study, caches[study.cache], s, cfg))
    for group in eval_groups(s):
        stage(f"eval/{group.name}", lambda group=group: _evaluate(out, group, s, cfg, model))
    if s.autointerp_features:
        for target in autointerp_targets(s):
            name, force = f"autointerp/{target}", False
            if name in stages and stages[name]["result"].get("client") != cfg.judge():  # another judge: redo
                del stages[name]
                force = True
            stage(name, lambda target=target, force=force: _autointerp(out, target, s, cfg, model, force))
    from sae_kit.eval import claims  # the report reads the plan (this module) back

    return claims.build(out, s, stages)


def _claim_dir(out: Path, settings: dict[str, Any]) -> None:
    """Create `out` for these settings, or check that it holds a run of the same settings (a resume)."""
    file = out / SETTINGS
    if file.is_file():
        old = _read(file)
        if old != json.loads(json.dumps(settings)):
            changed = sorted(
                k for k in settings["scale"] if (old or {}).get("scale", {}).get(k) != settings["scale"][k]
            )
            raise SaeKitError(
                f"{out} holds a reproduce run with other settings ({', '.join(changed) or 'model or client'}); "
                f"rerun with the same flags to resume it, or pass a new --out"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise SaeKitError(f"{out} is not empty and holds no reproduce run; pass a new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(file, settings)


def _read(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def _commit() -> str | None:
    """The git commit of the code that ran a stage (None outside a git checkout)."""
    try:
        root = Path(__file__).resolve().parent.parent
        return (
            subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def _cache(
    path: Path,
    hooks: tuple[str, ...],
    tokens: int,
    heldout: int,
    grads: bool,
    cfg: ReproduceConfig,
    model,
) -> dict[str, Any]:
    harvest = HarvestConfig(model=cfg.model, hook=hooks, device=cfg.device)
    build_cache(
        CacheConfig(
            out=path, harvest=harvest, tokens=tokens, heldout_tokens=heldout, grads=grads, progress=cfg.progress
        ),
        model=model,
    )
    cache = ActivationCache(path)
    return {"path": str(path.relative_to(path.parent)), "rows": int(cache.n_rows("train")), "hooks": list(hooks)}


def _train(out: Path, study: Study, cache: dict[str, Any], s: Scale, cfg: ReproduceConfig) -> dict[str, Any]:
    run = out / "runs" / study.name
    rules = RuleSettings()
    for rule, values in study.rules.items():
        for key, value in values.items():
            setattr(getattr(rules, rule), key, value)
    epochs = s.grad_epochs if study.cache == "grads" else s.epochs
    run_cfg = TrainRunConfig(
        out=run,
        cache=out / cache["path"],
        harvest=HarvestConfig(model=cfg.model, hook=(study.hook,), device=cfg.device),
        architecture=study.architectures,
        k=study.ks,
        d_sae=study.d_saes,
        seed=study.seeds,
        rules=rules,
        train=TrainConfig(tokens=cache["rows"] * epochs, batch_size=s.batch_size, aux=study.aux),  # type: ignore[arg-type]
        eval_tokens=s.heldout_tokens,
        progress=cfg.progress,
    )
    if (run / rundir.SUMMARY).is_file():
        summary = _read(run / rundir.SUMMARY)
    else:
        if rundir.holds_run(run):
            run_cfg = TrainRunConfig(resume=run, progress=cfg.progress)
        summary = train(run_cfg)
    return {"run": str(run.relative_to(out)), "steps": summary["steps"], "tokens": summary["tokens"]}


def _evaluate(out: Path, group: EvalGroup, s: Scale, cfg: ReproduceConfig, model) -> dict[str, Any]:
    target = out / "eval" / group.name
    dark = DarkMatterConfig(ce_tokens=group.ce_tokens, min_tokens=s.dark_matter_min_tokens)
    ecfg = EvalConfig(
        saes=tuple(out / "runs" / p for p in group.saes),
        out=target,
        tokens=group.tokens,
        sections=group.sections,
        core=CoreConfig(ce_tokens=group.ce_tokens),
        dark_matter=dark,
        steering=SteeringConfig(n_features=s.steer_features, contexts=s.steer_contexts),
        png=False,
        device=cfg.device,
    )
    report = evaluate(ecfg, model=model)
    return {"report": str(Path(report["out"]).relative_to(out) / rundir.REPORT), "tokens": report["settings"]["tokens"]}


def _autointerp(out: Path, target: str, s: Scale, cfg: ReproduceConfig, model, force: bool) -> dict[str, Any]:
    run = out / "runs" / target
    build_index(IndexConfig(sae=run, tokens=s.index_tokens, progress=cfg.progress, device=cfg.device), model=model)
    explain(
        ExplainConfig(
            run=run,
            n=s.autointerp_features,
            min_count=10,
            client=cfg.client,
            examples=s.examples,
            device=cfg.device,
            progress=cfg.progress,
            force=force,
        ),
        model=model,
    )
    score(
        ScoreConfig(
            run=run,
            scorers=("detection", "fuzz"),
            client=cfg.client,
            examples=s.examples,
            device=cfg.device,
            progress=cfg.progress,
            force=force,
        ),
        model=model,
    )
    located = rundir.resolve((run,))[0]
    return {"index": str(located.index_dir.relative_to(out)), "client": cfg.judge()}
