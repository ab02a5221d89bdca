"""The `sae-kit` command: thin subcommands over the library, with flags generated from the config dataclasses."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from sae_kit.errors import SaeKitError


@dataclass
class HooksArgs:
    """List the hook names of a model."""

    model: str | None = None
    """Model: None for the embedded SmolLM2-135M-Instruct, a local HF directory, or a hub id."""
    filter: str = ""
    """Only names containing this substring, e.g. resid_post."""


def _hooks(args: HooksArgs) -> None:
    from sae_kit.models import hook_names, load_model

    model = load_model(args.model, device="cpu")
    names = hook_names(model)
    shown = [name for name in names if args.filter in name]
    if not shown:
        raise SaeKitError(
            f"no hook name of {model.sae_kit_name} contains {args.filter!r}; try e.g. resid_post, hook_z or mlp_out, "
            f"or drop --filter to list all {len(names)}"
        )
    print("\n".join(shown))


def _cache(args) -> None:
    from sae_kit.build_cache import build_cache
    from sae_kit.cache import ActivationCache

    out = build_cache(args)
    print(f"cache ready: {out}\n{ActivationCache(out)!r}")


def _train(args) -> None:
    from sae_kit.training.run import _NOT_SETTINGS, TrainRunConfig, train

    if args.resume is not None:
        changed = [
            f.name
            for f in fields(args)
            if (
                f.name == "out" or f.name not in _NOT_SETTINGS
            )  # what may differ: progress, prefetch, --dist-timeout, ...
            and getattr(args, f.name) != getattr(TrainRunConfig(), f.name)
        ]
        if changed:
            raise SaeKitError(
                f"--resume continues a run with its saved config.json; drop {', '.join('--' + c.replace('_', '-') for c in changed)}"
            )
    s = train(args)
    if not s:  # a rank other than 0 of a torchrun job: rank 0 reports
        return
    if len(s["members"]) == 1:
        m = s["members"][0]
        h = m["heldout"]
        print(f"SAE saved to {m['sae_dir']} ({s['steps']} steps, {s['tokens']:,} tokens)")
        print(
            f"held-out ({h['tokens']:,} tokens): FVU {h['fvu']:.4f}  L0 {h['l0']:.1f}  dead {100 * h['dead_frac']:.1f}%"
            + (f"  (training L0 {m['training']['l0']:.1f})" if abs(m["training"]["l0"] - h["l0"]) > 0.05 else "")
        )
    else:
        print(
            f"{len(s['members'])} SAEs trained on the same {s['tokens']:,} tokens ({s['steps']} steps); held-out results:"
        )
        print(s["table"])
        print(f"SAEs saved to {Path(s['members'][0]['sae_dir']).parent.parent}/<member>/sae")
    if any("failed" in m for m in s["members"]):
        raise SaeKitError("some members failed (see the table above); lower --lr for them or check the data")


def _eval(args) -> None:
    from sae_kit.eval.evaluate import evaluate, summary_text

    print(summary_text(evaluate(args)))


def _index(args) -> None:
    from sae_kit.dashboards.indexer import build_index
    from sae_kit.rundir import run_dir_of

    for meta in build_index(args):
        short = " (the held-out split holds no more)" if meta["short"] else ""
        print(
            f"index of {meta['sae']['d_sae']:,} features on {meta['tokens']:,} held-out tokens{short}: "
            f"pass {meta['seconds']['pass']:.1f} s ({meta['throughput']['tokens_per_s']:,} tok/s), "
            f"features {meta['seconds']['features']:.1f} s ({meta['throughput']['features_per_s']:,} features/s)"
        )
        print(f"browse it: sae-kit browse {run_dir_of(Path(meta['sae']['dir']))}")


def _explain(args) -> None:
    from sae_kit.autointerp.run import explain

    explain(args)
    print(f"score them: sae-kit score {args.run}   (then browse: sae-kit browse {args.run})")


def _score(args) -> None:
    from sae_kit.autointerp.run import score

    score(args)
    print(f"browse them: sae-kit browse {args.run}")


def _reproduce(args) -> None:
    from sae_kit.eval.claims import summary_text
    from sae_kit.eval.reproduce import reproduce

    print(summary_text(reproduce(args)))


def _browse(args) -> None:
    from sae_kit.dashboards.browse import browse

    browse(args)


def _commands() -> dict[str, tuple[type, Callable, str]]:
    from sae_kit.autointerp.run import ExplainConfig, ScoreConfig
    from sae_kit.build_cache import CacheConfig
    from sae_kit.dashboards.browse import BrowseConfig
    from sae_kit.dashboards.indexer import IndexConfig
    from sae_kit.eval.evaluate import EvalConfig
    from sae_kit.eval.reproduce import ReproduceConfig
    from sae_kit.training.run import TrainRunConfig

    return {
        "train": (
            TrainRunConfig,
            _train,
            "train an SAE from the model or an activation cache (no flags: TopK on the default)",
        ),
        "eval": (
            EvalConfig,
            _eval,
            "evaluate SAEs on held-out tokens: core, dead features, dark matter, steering -> report.json",
        ),
        "index": (
            IndexConfig,
            _index,
            "precompute every feature's contexts, histogram, logits, neighbours for the browser (resumable)",
        ),
        "explain": (
            ExplainConfig,
            _explain,
            "explain features in words with an LLM from their indexed contexts (local SmolLM2 or an OpenAI-compatible API)",
        ),
        "score": (
            ScoreConfig,
            _score,
            "score the explanations: detection, fuzzing and intervention, judged by an LLM (resumable)",
        ),
        "reproduce": (
            ReproduceConfig,
            _reproduce,
            "check each founding paper's claim on the embedded model: train, evaluate, report.md (--quick: minutes)",
        ),
        "browse": (BrowseConfig, _browse, "open the Streamlit feature browser on a run (127.0.0.1:8501 by default)"),
        "cache": (CacheConfig, _cache, "harvest activations into an on-disk ActivationCache (resumable)"),
        "hooks": (HooksArgs, _hooks, "list a model's hook names"),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sae-kit` console script."""
    import tyro

    argv = sys.argv[1:] if argv is None else argv
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sae-kit COMMAND [--help] [options]\n\ncommands:")
        for name, (_, _, text) in commands.items():
            print(f"  {name:<8} {text}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"sae-kit: unknown command {name!r}; choose one of {', '.join(commands)}", file=sys.stderr)
        return 2
    config_cls, run, _ = commands[name]
    try:
        rest, default = _config_file(config_cls, rest)
        # eval's nested sections share field names (core.ce_tokens, dark_matter.ce_tokens), and train's rule sections
        # (--jumprelu.bandwidth): keep their prefixes there (train flattens its harvest and train sections itself).
        flat = () if name in ("eval", "train", "reproduce") else (tyro.conf.OmitArgPrefixes,)
        args = tyro.cli(config_cls, args=rest, default=default, prog=f"sae-kit {name}", config=flat)
        run(args)
    except SaeKitError as err:
        if not getattr(err, "quiet", False):  # under torchrun one rank speaks for a failure (sae_kit.distributed)
            print(f"sae-kit {name}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _config_file(config_cls: type, argv: list[str]):
    """Take `--config FILE` out of argv; (the other args, the settings read from FILE or None)."""
    from sae_kit.config_files import load_config

    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            path = arg.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            if not path:
                raise SaeKitError("--config needs a file: --config sweep.yaml")
            rest = argv[:i] + argv[i + (1 if "=" in arg else 2) :]
            return rest, load_config(config_cls, path)
    return argv, None


if __name__ == "__main__":
    sys.exit(main())
