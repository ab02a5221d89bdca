"""The architecture plug-in: a rule defined here plus one registry line goes through the whole toolkit unchanged,
and no module outside the plug-ins (and the peer-format mappings) compares architecture names."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from sae_kit import sparsifiers
from sae_kit.sparsifiers import ALIASES, REGISTRY, RuleConfig, StepContext
from sae_kit.sparsifiers.topk import TopK

ROOT = Path(__file__).resolve().parent.parent
HOOK = "blocks.6.hook_resid_post"
PEER_FORMAT_MAPPINGS = ("sae_kit/formats.py", "sae_kit/saebench.py", "eval/reproduce.py")
"""Where architecture names may appear besides sae_kit/sparsifiers/: the translations to SAELens and SAEBench names,
and the plan of `sae-kit reproduce`, which names the architectures the founding papers compare (as a sweep file
would) in one place that its report imports; neither branches on a name."""


@dataclass
class GainConfig(RuleConfig):
    """Settings of the test's toy rule (cfg.json keys gain_<field>)."""

    flat_prefix = "gain_"

    penalty: float = 0.05
    """Coefficient of the penalty λ·mean_i (g_i − 1)² that keeps the gains near 1."""

    def check(self) -> None:
        if not self.penalty >= 0:
            self.fail("penalty", self.penalty, "use a coefficient >= 0")


class GainTopK(TopK):
    """TopK whose kept values are scaled by a learned per-latent gain g [d_sae] (a tensor the rule owns)."""

    Config = GainConfig
    saelens_name = None

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.gain = nn.Parameter(torch.ones(cfg.d_sae, dtype=cfg.torch_dtype, device=cfg.device))

    def forward(self, sae, xc: Tensor, grad: Tensor | None = None):
        codes = super().forward(sae, xc, grad)
        codes.values = codes.values * self.gain[codes.indices]
        return codes

    def state_tensors(self) -> dict[str, Tensor]:
        return {"gain": self.gain}

    def penalties(self, sae, ctx: StepContext) -> dict[str, Tensor]:
        return {"gain_penalty": self.config.penalty * (self.gain - 1).square().mean()}


@pytest.fixture
def gain_rule(monkeypatch):
    import sae_kit.training.run  # noqa: F401  # its flag sections are generated from the built-in registry, first

    monkeypatch.setitem(REGISTRY, "gain_topk", GainTopK)  # the one registry line
    return "gain_topk"


@pytest.mark.slow
def test_a_new_architecture_is_one_class_and_one_registry_line(gain_rule, model, tmp_path):
    """Train from a cache, save, load, evaluate, index and (refuse to) export a rule no sae-kit file knows."""
    from safetensors.torch import load_file

    from sae_kit import HarvestConfig, load_sae
    from sae_kit.build_cache import CacheConfig, build_cache
    from sae_kit.dashboards.indexer import IndexConfig, build_index
    from sae_kit.eval.core import CoreConfig
    from sae_kit.eval.evaluate import EvalConfig, evaluate
    from sae_kit.sae import SAEFormatError
    from sae_kit.training import TrainConfig
    from sae_kit.training.run import TrainRunConfig, train

    cache = build_cache(
        CacheConfig(
            out=tmp_path / "cache",
            harvest=HarvestConfig(context_size=64),
            tokens=16384,
            heldout_tokens=2048,
            progress=False,
        ),
        model=model,
    )
    run = tmp_path / "run"
    summary = train(
        TrainRunConfig(
            out=run,
            cache=cache,
            architecture=(gain_rule,),
            k=(16,),
            expansion_factor=(2,),
            eval_tokens=2048,
            progress=False,
            train=TrainConfig(batch_size=512, tokens=512 * 32, lr=2e-3, warmup_steps=4),
        )
    )
    held = summary["members"][0]["heldout"]
    assert held["fvu"] < 0.6 and held["l0"] == pytest.approx(16, abs=0.01)
    metrics = (run / "metrics.jsonl").read_text()
    assert '"gain_penalty"' in metrics  # the rule's penalty was added and logged under its name

    sae = load_sae(run / "sae")
    assert type(sae.sparsifier) is GainTopK and sae.cfg.rule_config == GainConfig()
    saved = load_file(str(run / "sae" / "sae_weights.safetensors"))
    assert set(saved) == {"W_enc", "b_enc", "W_dec", "b_dec", "gain"}
    assert not torch.equal(saved["gain"], torch.ones_like(saved["gain"]))  # trained, and it survived the save
    torch.testing.assert_close(sae.sparsifier.gain.detach(), saved["gain"])

    report = evaluate(
        EvalConfig(
            saes=(run,),
            out=tmp_path / "eval",
            tokens=3000,
            context_size=64,
            sections=("core", "dead"),
            core=CoreConfig(ce_tokens=300),
        ),
        model=model,
    )
    core = report["saes"][0]["sections"]["core"]
    assert core["architecture"] == gain_rule and 0 < core["fvu"] < 1

    meta = build_index(
        IndexConfig(sae=run, tokens=2000, context_size=64, shard_size=64, row_group=8, progress=False), model=model
    )[0]
    assert meta["sae"]["architecture"] == gain_rule and (run / "index" / "features.parquet").is_file()

    for fmt in ("saelens", "sparsify"):
        with pytest.raises(SAEFormatError) as err:
            sae.save(tmp_path / fmt, format=fmt)
        assert "\n" not in str(err.value) and not (tmp_path / fmt).exists()


def test_a_new_rule_is_reachable_from_cfg_json_and_validated(gain_rule, tmp_path):
    from sae_kit.errors import SaeKitError
    from sae_kit.sae import SAE, SAEConfig
    from sae_kit.sae_io import load_sae

    cfg = SAEConfig.from_dict({"architecture": gain_rule, "d_in": 8, "d_sae": 16, "k": 2, "gain_penalty": 0.5})
    assert cfg.rule_config.penalty == 0.5 and cfg.to_dict()["gain_penalty"] == 0.5
    sae = SAE(cfg)
    with torch.no_grad():
        sae.sparsifier.gain.mul_(torch.linspace(0.5, 2, 16))
    sae.save(tmp_path / "s")
    x = torch.randn(4, 8)
    torch.testing.assert_close(load_sae(tmp_path / "s").encode(x), sae.encode(x))
    with pytest.raises(SaeKitError, match=r"gain_penalty=-1\.0; use a coefficient >= 0"):
        SAEConfig.from_dict({"architecture": gain_rule, "d_in": 8, "d_sae": 16, "k": 2, "gain_penalty": -1.0})


def test_every_rule_setting_is_a_train_flag_and_a_yaml_key(tmp_path):
    """One section per registered rule with settings, generated from the registry: `--<rule>.<field>` flags and
    `rules: {<rule>: {...}}` in config files, both reaching the SAE's rule_config."""
    from dataclasses import fields

    import tyro

    from sae_kit.config_files import load_config
    from sae_kit.training.run import RuleSettings, TrainRunConfig, rule_config_of

    sections = {f.name for f in fields(RuleSettings)}
    assert sections == {name for name, rule in REGISTRY.items() if fields(rule.Config)}
    assert {"jumprelu", "mpsae", "feature_choice", "gsae", "gated", "matryoshka_batchtopk"} <= sections
    args = tyro.cli(
        TrainRunConfig,
        args=[
            "--jumprelu.bandwidth",
            "0.002",
            "--mpsae.signed",
            "--feature-choice.zipf-exponent",
            "0.7",
            "--gsae.beta",
            "2.0",
            "--lr",
            "1e-3",
            "--hook",
            HOOK,
        ],
    )
    assert rule_config_of(args.rules, "jumprelu").bandwidth == 0.002
    assert rule_config_of(args.rules, "mpsae").signed is True
    assert rule_config_of(args.rules, "feature_choice").zipf_exponent == 0.7
    assert rule_config_of(args.rules, "gsae").beta == 2.0 and args.train.lr == 1e-3
    (tmp_path / "sweep.yaml").write_text(
        "architecture: [jumprelu, relu]\nrules:\n  jumprelu: {target_l0: 16.0}\n  relu: {l1_coef: 0.01}\n"
    )
    cfg = load_config(TrainRunConfig, tmp_path / "sweep.yaml")
    assert rule_config_of(cfg.rules, "jumprelu").target_l0 == 16.0 and rule_config_of(cfg.rules, "relu").l1_coef == 0.01
    (tmp_path / "bad.yaml").write_text("rules:\n  jumprelu: {bandwith: 0.1}\n")
    with pytest.raises(
        Exception, match=r"unknown key 'rules\.jumprelu\.bandwith'; did you mean 'rules\.jumprelu\.bandwidth'"
    ):
        load_config(TrainRunConfig, tmp_path / "bad.yaml")


def test_bad_rule_settings_are_one_line_naming_the_flag(capsys):
    from sae_kit.cli import main

    assert main(["train", "--architecture", "jumprelu", "--jumprelu.bandwidth", "-1", "--tokens", "4096"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sae-kit train: error: --jumprelu.bandwidth: jumprelu_bandwidth=-1.0; use a value > 0"


def _name_literals(path: Path, names: set[str]) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
    ]


def test_no_architecture_name_outside_the_plug_ins():
    """Other modules ask the rule (uses_k, signed, saelens_name, hooks) instead of comparing names."""
    names = {*REGISTRY, *ALIASES}
    files = [p for d in ("sae_kit", "training", "eval", "dashboards") for p in (ROOT / d).rglob("*.py")]
    plugins = Path(sparsifiers.__file__).parent
    found = [
        hit
        for p in files
        if plugins not in p.parents and str(p.relative_to(ROOT)) not in PEER_FORMAT_MAPPINGS
        for hit in _name_literals(p, names)
    ]
    assert not found, "architecture names outside sae_kit/sparsifiers/:\n" + "\n".join(found)
    assert _name_literals(ROOT / "sae_kit" / "formats.py", names)  # the scan does see names where they belong
