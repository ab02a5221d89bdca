"""`sae-kit explain` and `sae-kit score`: explain features of an indexed SAE, then score the explanations.

Both read the run's feature index (`sae-kit index` first) and write into `index/autointerp/` (see `store`). Each
feature's result is saved under `.work/` as soon as it is done, so a killed run resumes with the next feature and
ends with the same files; the response cache means a resumed or repeated run never asks the LLM twice. A finished
stage with the same settings is reused; other settings need --force (the old results are replaced).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tyro
from tqdm.auto import tqdm

from sae_kit import rundir
from sae_kit.atomic import finite, write_json
from sae_kit.autointerp import examples as ex
from sae_kit.autointerp import prompts, scorers, store
from sae_kit.autointerp.scorers import PROMPTS as INTERVENTION_PROMPTS
from sae_kit.autointerp.types import AutoInterpError, ChatClient, Request
from sae_kit.dashboards.store import FeatureIndex

Scorer = Literal["detection", "fuzz", "intervention"]


@dataclass
class ClientConfig:
    """Which LLM answers: the local transformers backend or an OpenAI-compatible HTTP server."""

    backend: Literal["local", "openai"] = "local"
    """local: transformers on this machine (the embedded SmolLM2-135M-Instruct unless --model names a local HF
    directory; plumbing, far too small for good explanations); openai: any OpenAI-compatible chat API (vLLM,
    llama.cpp server, OpenRouter, OpenAI)."""
    base_url: str | None = None
    """openai backend: the API's base URL, e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1."""
    model: str | None = None
    """local: a local HF model directory (None: the embedded SmolLM2-135M-Instruct); openai: the model name."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai backend: the environment variable holding the API key ('' for a server without keys)."""
    concurrency: int = 8
    """openai backend: requests in flight at once."""
    batch_size: int = 8
    """local backend: prompts per batched forward."""
    max_retries: int = 5
    """openai backend: retries (with exponential backoff) after a 429, a 5xx, a timeout or a dropped connection."""
    timeout: float = 60.0
    """openai backend: seconds per request before it is retried."""
    cache: bool = True
    """Keep every response in index/autointerp/responses/ and answer repeated requests from it."""

    def make(self, cache_dir: Path | None, device: str | None = None) -> ChatClient:
        from sae_kit.autointerp.clients import make_client

        return make_client(
            self.backend,
            base_url=self.base_url,
            model=self.model,
            api_key_env=self.api_key_env,
            cache_dir=cache_dir if self.cache else None,
            concurrency=self.concurrency,
            batch_size=self.batch_size,
            max_retries=self.max_retries,
            timeout_s=self.timeout,
            device=device or "cpu",
        )


@dataclass
class ExplainConfig:
    """Explain features of an indexed SAE in words with an LLM (results in <run>/index/autointerp/)."""

    run: tyro.conf.Positional[Path]
    """A run directory, a sweep (every member) or an SAE directory, indexed with `sae-kit index`."""
    features: tuple[int, ...] = ()
    """Feature ids to explain (default: --n of them)."""
    n: int = 32
    """Without --features: how many live features to explain, drawn at random with --seed; 0 explains every live one."""
    min_count: int = 1
    """Without --features: only features that fired at least this often on the indexed tokens."""
    max_tokens: int = 80
    """Most tokens the explainer may write."""
    client: ClientConfig = field(default_factory=ClientConfig)
    examples: ex.ExampleConfig = field(default_factory=ex.ExampleConfig)
    device: str | None = None
    """Torch device of the local backend (None: cpu)."""
    force: bool = False
    """Discard earlier explanations (and their scores) made with other settings, and explain again."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class ScoreConfig:
    """Score the explanations of an indexed SAE: detection, fuzzing and intervention (results in index/autointerp/)."""

    run: tyro.conf.Positional[Path]
    """A run directory, a sweep (every member) or an SAE directory, explained with `sae-kit explain`."""
    scorers: tuple[Scorer, ...] = ("detection", "fuzz", "intervention")
    """Scorers to run."""
    features: tuple[int, ...] = ()
    """Explained features to score (default: every explained feature)."""
    kl_target: float = 0.5
    """Intervention: mean next-token KL(clean ‖ steered), in nats, at the end of the prompts that the steering
    strength is searched for."""
    intervention_prompts: tuple[str, ...] = INTERVENTION_PROMPTS
    """Intervention: prompts continued clean and steered (an even number balances the A/B order)."""
    intervention_tokens: int = 8
    """Intervention: greedy tokens generated per continuation."""
    client: ClientConfig = field(default_factory=ClientConfig)
    examples: ex.ExampleConfig = field(default_factory=ex.ExampleConfig)
    lm_batch_size: int = 16
    """Contexts per LM forward when re-encoding negatives."""
    device: str | None = None
    """Torch device of the SAE's language model (None: cuda if available, else cpu)."""
    force: bool = False
    """Discard earlier scores made with other settings, and score again."""
    progress: bool = True
    """Show a progress bar."""


# ------------------------------------------------------------------------------------------------ shared pieces
def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def _open_index(loc: rundir.Located) -> FeatureIndex:
    from sae_kit.sae_io import sae_digest

    index = FeatureIndex(loc.index_dir)  # one line when missing or unfinished
    if index.meta["sae"].get("sha256") not in (None, sae_digest(loc.sae_dir)):
        raise AutoInterpError(
            f"the SAE in {loc.sae_dir} changed since it was indexed; rebuild the index: sae-kit index {loc.run_dir} --force"
        )
    return index


def _resolve(run: Path) -> list[rundir.Located]:
    try:
        return rundir.resolve((run,))
    except rundir.RunDirError as err:
        raise AutoInterpError(str(err)) from None


def _client_identity(client: ChatClient, cfg: ClientConfig) -> dict[str, Any]:
    return {"backend": cfg.backend, "model": client.model_name, "base_url": cfg.base_url}


WORK_META = "identity.json"
"""What an unfinished run under .work/<stage>/ was started with (the finished results stay untouched until the end)."""


def _begin(
    out: Path, meta_name: str, work: Path, identity: dict[str, Any], force: bool, command: str, run: Path
) -> str:
    """'done' when `out` holds finished results of this identity (and not `force`); 'resume' when `work` holds an
    unfinished run of it; else 'new' (work cleared). Finished results of another identity need `force`; they are
    replaced only when the new run finishes, so a failed run loses nothing."""
    file, ident = out / meta_name, finite(identity)
    if file.is_file() and not force:
        try:
            old = json.loads(file.read_text())
        except ValueError:
            old = {}
        if old.get("identity") == ident and old.get("complete"):
            return "done"
        raise AutoInterpError(
            f"{out} holds {'explanations' if command == 'explain' else 'scores'} made with other settings "
            f"(or another SAE, index or judge); replace them: sae-kit {command} {run} --force"
        )
    try:
        if json.loads((work / WORK_META).read_text()) == ident:
            return "resume"
    except (OSError, ValueError):
        pass
    shutil.rmtree(work, ignore_errors=True)
    write_json(work / WORK_META, ident)
    return "new"


def _digest(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else ""


def _usage(client: ChatClient) -> dict[str, int]:
    return dict(getattr(client, "usage", {}) or {})


def _bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, unit="feat", desc=desc, disable=not enabled)


def _postfix(bar, client: ChatClient) -> None:
    u = _usage(client)
    if u:
        bar.set_postfix(tokens=f"{u.get('prompt_tokens', 0):,}+{u.get('completion_tokens', 0):,}", refresh=False)


# ------------------------------------------------------------------------------------------------ explain
def select_features(index: FeatureIndex, features: Sequence[int], n: int, min_count: int, seed: int) -> list[int]:
    """The features to work on: `features` (checked against the SAE's width), else `n` live ones at random."""
    counts = index.summary["count"].to_numpy()
    if features:
        bad = [f for f in features if not 0 <= f < index.d_sae]
        if bad:
            raise AutoInterpError(f"feature {bad[0]} is out of range; this SAE has features 0..{index.d_sae - 1}")
        return sorted(dict.fromkeys(int(f) for f in features))
    if n < 0:
        raise AutoInterpError(f"--n must be >= 0 (0: every live feature), got {n}")
    live = np.flatnonzero(counts >= max(min_count, 1))
    if not len(live):
        raise AutoInterpError(f"no feature fired {max(min_count, 1)}+ times on the indexed tokens; lower --min-count")
    if n and n < len(live):
        live = np.sort(np.random.default_rng(seed).choice(live, size=n, replace=False))
    return [int(f) for f in live]


def explain_feature(
    feature: int, row: dict[str, Any], vocab: list[str], cfg: ex.ExampleConfig, max_tokens: int
) -> tuple[Request, list[ex.Example]]:
    """The explainer's request for one feature and the examples it shows."""
    shown = ex.explain_set(row, vocab, cfg)
    texts = [prompts.highlight(e.tokens, [a != 0 for a in e.acts]) for e in shown]
    scale = max((abs(a) for e in shown for a in e.acts), default=0.0)
    lines = [prompts.levels(e.tokens, e.acts, scale) for e in shown] if cfg.show_activations else None
    return Request(prompts.explainer_messages(texts, lines), max_tokens=max_tokens), shown


def explain(cfg: ExplainConfig, model=None, client: ChatClient | None = None):  # noqa: ARG001 (model: API symmetry)
    """Explain the features of every SAE `cfg.run` stands for; returns the last SAE's explanations (DataFrame)."""
    cfg.examples.check()
    if cfg.max_tokens < 1:
        raise AutoInterpError(f"--max-tokens must be >= 1, got {cfg.max_tokens}")
    found = _resolve(cfg.run)
    indexes = [(loc, _open_index(loc)) for loc in found]  # every bad input before any model loads
    chosen = {
        loc.name: select_features(index, cfg.features, cfg.n, cfg.min_count, cfg.examples.seed)
        for loc, index in indexes
    }
    result = None
    for loc, index in indexes:
        out = store.folder(loc.index_dir)
        judge = client or cfg.client.make(out / "responses", cfg.device)
        result = _explain_one(cfg, loc, index, chosen[loc.name], judge, out)
    return result


def _explain_one(cfg: ExplainConfig, loc, index: FeatureIndex, features: list[int], client: ChatClient, out: Path):
    counts = index.summary["count"].to_numpy()
    dead = [f for f in features if counts[f] == 0]
    todo = [f for f in features if counts[f] > 0]
    identity = {
        "stage": "explain",
        "features": todo,
        "examples": cfg.examples.settings(),
        "max_tokens": cfg.max_tokens,
        "client": _client_identity(client, cfg.client),
        "prompt_version": prompts.fingerprint(),
        "sae_sha256": index.meta["sae"].get("sha256"),
        "index": index.meta.get("settings"),
    }
    work = out / ".work" / "explain"
    if _begin(out, store.EXPLAIN_META, work, identity, cfg.force, "explain", loc.run_dir) == "done":
        print(f"{loc.name}: {len(todo)} features already explained ({out / 'explanations.parquet'})")
        return store.Results(loc.index_dir).explanations
    meta: dict[str, Any] = {"schema": store.SCHEMA, "version": store.VERSION, "complete": False, "identity": identity}
    start = time.perf_counter()
    bar = _bar(len(todo), f"explain {loc.name}", cfg.progress)
    group = max(1, getattr(client, "batch_size", 0) or 0, getattr(client, "concurrency", 0) or 0)
    pending = [f for f in todo if not (work / f"{f}.json").is_file()]
    bar.update(len(todo) - len(pending))
    errors: dict[int, str] = {}
    for i in range(0, len(pending), group):
        part = pending[i : i + group]
        built = [explain_feature(f, index.feature(f), index.vocab, cfg.examples, cfg.max_tokens) for f in part]
        answers = client.complete([r for r, _ in built])
        for f, (_, shown), a in zip(part, built, answers):
            if a.error is not None:  # no answer (the backend gave up): not saved, so a rerun asks again
                errors[f] = a.error
                continue
            text = prompts.parse_explanation(a.text)
            write_json(
                work / f"{f}.json",
                {
                    "feature": f,
                    "explanation": text,
                    "ok": text is not None,
                    "raw": a.text,
                    "n_examples": len(shown),
                    "rows": [e.row for e in shown],
                    "prompt_tokens": a.prompt_tokens,
                    "completion_tokens": a.completion_tokens,
                },
            )
        bar.update(len(part))
        _postfix(bar, client)
    bar.close()
    if errors:
        f, why = next(iter(errors.items()))
        raise AutoInterpError(
            f"{len(errors)} of {len(todo)} features got no answer (feature {f}: {why}); rerun the same command to "
            "ask for them again (the answered ones are kept)"
        )
    rows = [json.loads((work / f"{f}.json").read_text()) for f in todo]
    for name in (store.SCORE_META, "scores.parquet", "predictions.parquet"):
        (out / name).unlink(missing_ok=True)  # scores of the explanations being replaced
    store.write_table(out / "explanations.parquet", rows, store.EXPLANATIONS)
    failures = sum(not r["ok"] for r in rows)
    meta |= {
        "complete": True,
        "explained": len(rows) - failures,
        "failures": failures,
        "skipped_dead": dead,
    }
    _finish(out / store.EXPLAIN_META, meta, rows, start, client, work)
    print(explain_text(loc.name, meta))
    return store.Results(loc.index_dir).explanations


def explain_text(name: str, meta: dict[str, Any]) -> str:
    n = meta["explained"] + meta["failures"]
    dead = f"; {len(meta['skipped_dead'])} never-firing features skipped" if meta["skipped_dead"] else ""
    per = meta["tokens"]["prompt"] / max(n, 1), meta["tokens"]["completion"] / max(n, 1)
    return (
        f"{name}: explained {meta['explained']} of {n} features ({meta['failures']} answers could not be parsed{dead}) "
        f"with {meta['identity']['client']['model']}; {per[0]:.0f} prompt + {per[1]:.0f} completion tokens per feature"
    )


def _finish(
    meta_file: Path, meta: dict[str, Any], rows: list[dict[str, Any]], start: float, client: ChatClient, work: Path
) -> None:
    """A stage's last step, once its tables are written: its meta (with the token totals of `rows` and the timing)
    marks it finished, then the unfinished-run folder goes."""
    meta["tokens"] = {
        "prompt": sum(r["prompt_tokens"] for r in rows),
        "completion": sum(r["completion_tokens"] for r in rows),
    }
    meta["timing"] = {"seconds": round(time.perf_counter() - start, 2), "usage": _usage(client)}
    write_json(meta_file, finite(meta))
    shutil.rmtree(work, ignore_errors=True)
    _rmdir_if_empty(work.parent)


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------ score
def score(cfg: ScoreConfig, model=None, client: ChatClient | None = None):
    """Score the explanations of every SAE `cfg.run` stands for; returns the last SAE's scores (DataFrame)."""
    cfg.examples.check()
    if not cfg.scorers:
        raise AutoInterpError("--scorers is empty; choose from detection fuzz intervention")
    if "intervention" in cfg.scorers and (
        cfg.kl_target <= 0 or not cfg.intervention_prompts or cfg.intervention_tokens < 1
    ):
        raise AutoInterpError(
            "intervention needs --kl-target > 0, --intervention-tokens >= 1 and at least one --intervention-prompts"
        )
    found = _resolve(cfg.run)
    plans = []
    for loc in found:
        index = _open_index(loc)
        results = store.Results(loc.index_dir)
        if not results.has_explanations or not (results.explain_meta or {}).get("complete"):
            raise AutoInterpError(
                f"no finished explanations in {loc.index_dir}; run first: sae-kit explain {loc.run_dir}"
            )
        table = results.explanations
        ok = table[table["ok"]]
        if cfg.features:
            missing = [f for f in cfg.features if f not in set(ok["feature"])]
            if missing:
                raise AutoInterpError(
                    f"feature {missing[0]} has no explanation in {loc.index_dir}; explain it first: "
                    f"sae-kit explain {loc.run_dir} --features {' '.join(map(str, missing))}"
                )
            ok = ok[ok["feature"].isin(cfg.features)]
        if not len(ok):
            raise AutoInterpError(
                f"none of the explanations in {loc.index_dir} could be parsed, so there is nothing to score; "
                f"explain again with a stronger model: sae-kit explain {loc.run_dir} --force --backend openai ..."
            )
        plans.append((loc, index, ok))
    result = None
    models: dict[str | None, Any] = {}
    for loc, index, ok in plans:
        out = store.folder(loc.index_dir)
        judge = client or cfg.client.make(out / "responses", cfg.device)
        result = _score_one(cfg, loc, index, ok, judge, out, models, model)
    return result


def _score_one(cfg: ScoreConfig, loc, index: FeatureIndex, ok, client: ChatClient, out: Path, models, model):
    identity = {
        "stage": "score",
        "scorers": list(cfg.scorers),
        "features": [int(f) for f in ok["feature"]],
        "examples": cfg.examples.settings(),
        "kl_target": cfg.kl_target if "intervention" in cfg.scorers else None,
        "intervention_prompts": list(cfg.intervention_prompts) if "intervention" in cfg.scorers else None,
        "intervention_tokens": cfg.intervention_tokens if "intervention" in cfg.scorers else None,
        "client": _client_identity(client, cfg.client),
        "prompt_version": prompts.fingerprint(),
        "sae_sha256": index.meta["sae"].get("sha256"),
        "explanations_sha256": _digest(out / "explanations.parquet"),
    }
    work = out / ".work" / "score"
    if _begin(out, store.SCORE_META, work, identity, cfg.force, "score", loc.run_dir) == "done":
        print(f"{loc.name}: scores are up to date ({out / 'scores.parquet'})")
        return store.Results(loc.index_dir).scores
    meta: dict[str, Any] = {"schema": store.SCHEMA, "version": store.VERSION, "complete": False, "identity": identity}
    start = time.perf_counter()
    features = [int(f) for f in ok["feature"]]
    pending = [f for f in features if not (work / f"{f}.json").is_file()]
    bar = _bar(len(features), f"score {loc.name}", cfg.progress)
    bar.update(len(features) - len(pending))
    if pending:
        lab = _Lab(cfg, loc, index, features, models, model)
        explanations = dict(zip(ok["feature"].astype(int), ok["explanation"]))
        rows_of = dict(zip(ok["feature"].astype(int), ok["rows"]))
        for f in pending:
            result = lab.score(f, explanations[f], set(int(r) for r in rows_of[f]), client)
            write_json(work / f"{f}.json", result)
            bar.update(1)
            _postfix(bar, client)
    bar.close()
    done = [json.loads((work / f"{f}.json").read_text()) for f in features]
    score_rows = [{k: _nan(v) if k in _FLOATS else v for k, v in r.items()} for d in done for r in d["scores"]]
    pred_rows = [p | {"prob": _nan(p["prob"])} for d in done for p in d["predictions"]]
    store.write_table(out / "scores.parquet", score_rows, store.SCORES)
    store.write_table(out / "predictions.parquet", pred_rows, store.PREDICTIONS)
    meta |= {
        "complete": True,
        "summary": summarise(score_rows, cfg.scorers),
    }
    _finish(out / store.SCORE_META, meta, score_rows, start, client, work)
    print(summary_text(loc.name, meta))
    return store.Results(loc.index_dir).scores


_FLOATS = ("balanced_accuracy", "accuracy", "precision", "recall", "f1", "auroc", "strength", "kl")


def summarise(rows: list[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Each scorer's distribution over features of every metric (store.distribution), plus its parse failures."""
    out: dict[str, Any] = {}
    for name in names:
        mine = [r for r in rows if r["scorer"] == name]
        out[name] = {m: store.distribution([r[m] for r in mine]) for m in ("balanced_accuracy", "auroc", "f1")}
        out[name]["features"] = len(mine)
        out[name]["failures"] = int(sum(r["failures"] for r in mine))
        out[name]["judged"] = int(sum(r["n"] for r in mine))
    return out


def summary_text(name: str, meta: dict[str, Any]) -> str:
    ident = meta["identity"]
    lines = [f"{name}: scores of {len(ident['features'])} explanations, judged by {ident['client']['model']}:"]
    for scorer, s in meta["summary"].items():
        b, a = s["balanced_accuracy"], s["auroc"]
        fmt = lambda v: "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"  # noqa: E731
        lines.append(
            f"  {scorer:<13} balanced accuracy {fmt(b['mean'])} ± {fmt(b['std'])} (median {fmt(b['median'])}), "
            f"AUROC {fmt(a['mean'])}; {s['failures']} of {s['judged']} answers unparsed"
        )
    n = max(len(ident["features"]), 1)
    lines.append(
        f"  tokens per feature: {meta['tokens']['prompt'] / n:.0f} prompt + {meta['tokens']['completion'] / n:.0f} completion"
    )
    return "\n".join(lines)


class _Lab:
    """What scoring one SAE needs once: its LM and SAE, the held-out rows as the index saw them, the pool of
    re-encoded rows for negatives, and the steerer."""

    def __init__(self, cfg: ScoreConfig, loc, index: FeatureIndex, features: list[int], models, model) -> None:
        from sae_kit.heldout import check_pair, fold_input_scale, harvest_config_for
        from sae_kit.models import load_model
        from sae_kit.sae_io import load_sae

        self.cfg, self.index = cfg, index
        sae = load_sae(loc.sae_dir, device=cfg.device).eval()
        settings = index.meta["settings"]
        self.hcfg = harvest_config_for(
            sae,
            corpus=settings.get("corpus"),
            context_size=settings.get("context_size"),
            lm_batch_size=cfg.lm_batch_size,
        )
        name = sae.cfg.metadata.get("model_name")
        if name not in models:
            models[name] = model or load_model(name, device=cfg.device)
        self.model, self.sae = models[name], sae
        check_pair(self.model, sae, self.hcfg.hook[0])
        fold_input_scale(self.model, sae, self.hcfg)
        self.before = cfg.examples.window_before if cfg.examples.window_before is not None else settings["before"]
        self.after = cfg.examples.window_after if cfg.examples.window_after is not None else settings["after"]
        self.pool = (
            build_pool(self.model, sae, self.hcfg, index, cfg.examples, features) if _needs_negatives(cfg) else None
        )
        self.steerer = (
            scorers.Steerer(self.model, self.hcfg, cfg.intervention_prompts, cfg.intervention_tokens, cfg.kl_target)
            if "intervention" in cfg.scorers
            else None
        )

    def score(self, f: int, explanation: str, explain_rows: set[int], client: ChatClient) -> dict[str, Any]:
        cfg, row = self.cfg.examples, self.index.feature(f)
        activating = ex.activating_test_set(row, self.index.vocab, cfg, explain_rows)
        negs: list[ex.Example] = []
        if self.pool is not None:
            negs = ex.negatives(
                f,
                self.pool,
                self.index.vocab,
                cfg,
                explain_rows | {e.row for e in activating},
                self.before,
                self.after,
                hard_candidates(self.index, row, cfg),
            )
        results: list[tuple[str, scorers.Scored]] = []
        for name in self.cfg.scorers:
            if name == "detection":
                results.append((name, scorers.detection(client, explanation, f, activating, negs)))
            elif name == "fuzz":
                results.append((name, scorers.fuzz(client, explanation, f, activating, negs, cfg)))
            else:
                assert self.steerer is not None
                unit = float(
                    max(abs(self.index.summary["max_act"].iloc[f]), abs(self.index.summary["min_act"].iloc[f]))
                )
                direction = self.sae.W_dec[f].detach().float().cpu()
                results.append((name, scorers.intervention(client, explanation, f, self.steerer, direction, unit)))
        return {
            "feature": f,
            "scores": [
                {"feature": f, "scorer": name}
                | s.metrics
                | {
                    "prompt_tokens": s.prompt_tokens,
                    "completion_tokens": s.completion_tokens,
                    "strength": s.extra.get("strength"),
                    "kl": s.extra.get("kl"),
                }
                for name, s in results
            ],
            "predictions": [p for _, s in results for p in s.predictions],
        }


def _needs_negatives(cfg: ScoreConfig) -> bool:
    return any(s in cfg.scorers for s in ("detection", "fuzz")) and (cfg.examples.n_random or cfg.examples.n_hard) > 0


def hard_candidates(index: FeatureIndex, row: dict[str, Any], cfg: ex.ExampleConfig) -> list[tuple[int, int]]:
    """(row, position) of the top contexts of the feature's decoder neighbours and co-firing features."""
    if not cfg.n_hard:
        return []
    others = list(dict.fromkeys([*row["neighbour_ids"][:5], *row["cofire_ids"][:5]]))
    return [(c["row"], c["pos"]) for j in others for c in index.feature(int(j))["top"][:4]]


def build_pool(model, sae, hcfg, index: FeatureIndex, cfg: ex.ExampleConfig, features: Sequence[int]) -> ex.Pool:
    """Re-encode `pool_rows` random held-out rows of the index (plus the rows of every hard-negative candidate)."""
    import torch

    from sae_kit.heldout import HeldoutContexts, encode_positions, heldout_contexts

    ctxs = heldout_contexts(model, hcfg, index.meta["settings"]["tokens"])
    check_rows(ctxs.tokens, index, features)
    R = len(ctxs.tokens)
    rows = set(np.random.default_rng([cfg.seed, 7]).choice(R, size=min(cfg.pool_rows, R), replace=False).tolist())
    for f in features if cfg.n_hard else ():
        rows |= {r for r, _ in hard_candidates(index, index.feature(f), cfg)}
    sel = torch.tensor(sorted(rows), dtype=torch.long)
    sub = HeldoutContexts(ctxs.tokens[sel], ctxs.keep[sel], ctxs.pad[sel])
    entries = encode_positions(sae, model, hcfg, sub)
    return ex.Pool.from_entries(sel, sub.tokens, ~sub.pad, entries)


def check_rows(tokens, index: FeatureIndex, features: Sequence[int]) -> None:
    """The re-made held-out rows are the index's: each checked feature's top context tokens sit where it says."""
    R, T = tokens.shape
    if R != index.meta["contexts"] or T != index.meta["context_size"]:
        raise AutoInterpError(
            f"the held-out data gives {R}×{T} contexts but the index holds {index.meta['contexts']}×{index.meta['context_size']}; "
            "the corpus changed since indexing: rebuild it with sae-kit index --force"
        )
    for f in list(features)[:8]:
        for c in index.feature(f)["top"][:2]:
            a = c["pos"] - c["peak"]
            if tokens[c["row"], a : a + len(c["tokens"])].tolist() != list(c["tokens"]):
                raise AutoInterpError(
                    "the held-out contexts differ from the indexed ones (the corpus or tokenizer changed); "
                    "rebuild the index with sae-kit index --force"
                )
