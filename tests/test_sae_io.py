"""SAE directory round trips, the cfg.json schema, clear errors for damaged directories and bad configs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import sae_kit.sae_io as sae_module
from sae_kit.sae import CFG_FILE, SAE, SPARSITY_FILE, WEIGHTS_FILE, SAEConfig, SAEFormatError
from sae_kit.sae_io import load_sae
from sae_kit.sparsifiers import ARCHITECTURES

D_IN, D_SAE, K = 8, 32, 3
METADATA = {
    "model_name": "SmolLM2-135M",
    "hook_name": "blocks.6.hook_resid_post",
    "context_size": 128,
    "prepend_bos": True,
    "dataset_path": "embedded",
    "exclude_special_tokens": True,
}


def trained_sae(architecture: str) -> SAE:
    """An SAE whose every tensor (thresholds included) differs from its initial value."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=K, metadata=dict(METADATA)))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for t in sae.sparsifier.state_tensors().values():
            t.abs_()  # thresholds stay positive
    sae.set_decoder_norm_to_unit_norm()
    sae.train()(torch.randn(64, D_IN))  # batch rules learn a threshold
    return sae.eval()


@pytest.fixture
def saved(tmp_path):
    sae = trained_sae("topk")
    sae.save(tmp_path / "sae", sparsity=torch.linspace(-5, -1, D_SAE))
    return tmp_path / "sae"


@pytest.mark.filterwarnings("ignore:gsae")
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_round_trip_gives_identical_encode_and_decode(architecture, tmp_path):
    sae = trained_sae(architecture)
    sae.save(tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert not loaded.training and loaded.cfg.to_dict() == sae.cfg.to_dict()
    for name, tensor in sae.weights().items():
        assert torch.equal(loaded.weights()[name], tensor), name
    x, g = torch.randn(20, D_IN), torch.randn(20, D_IN)
    f = sae.encode(x, grad=g)
    assert torch.equal(loaded.encode(x, grad=g), f)
    assert torch.equal(loaded.decode(f), sae.decode(f))
    assert torch.equal(loaded(x, grad=g).x_hat, sae(x, grad=g).x_hat)
    keys = set(load_file(str(tmp_path / "sae" / WEIGHTS_FILE)))
    expected = {"W_dec", "b_dec"} | ({"W_enc", "b_enc"} if sae.cfg.rule.uses_encoder else set())
    assert keys == expected | set(sae.sparsifier.state_tensors())  # the rule's own tensors survive a save


def test_cfg_json_has_the_required_keys(saved):
    cfg = json.loads((saved / CFG_FILE).read_text())
    for key in (
        "architecture",
        "d_in",
        "d_sae",
        "dtype",
        "device",
        "apply_b_dec_to_input",
        "normalize_activations",
        "k",
    ):
        assert key in cfg, key
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["dtype"]) == (
        "topk",
        D_IN,
        D_SAE,
        K,
        "float32",
    )
    for key in (*METADATA, "sae_kit_version"):
        assert key in cfg["metadata"], key
    assert {k: cfg["metadata"][k] for k in METADATA} == METADATA
    assert "mp_signed" not in cfg and "gsae_beta" not in cfg  # only the rule's own fields
    weights = load_file(str(saved / WEIGHTS_FILE))
    assert weights["W_enc"].shape == (D_IN, D_SAE) and weights["W_dec"].shape == (D_SAE, D_IN)


def test_metadata_keys_are_present_even_when_unset(tmp_path):
    SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)).save(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / CFG_FILE).read_text())["metadata"]
    assert set(METADATA) <= set(meta) and meta["model_name"] is None and meta["sae_kit_version"]


def test_sparsity_round_trip(saved, tmp_path):
    loaded = load_sae(saved)
    torch.testing.assert_close(loaded.sparsity, torch.linspace(-5, -1, D_SAE))
    assert set(load_file(str(saved / SPARSITY_FILE))) == {"sparsity"}
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    sae.save(tmp_path / "nosparsity")
    assert not (tmp_path / "nosparsity" / SPARSITY_FILE).exists() and load_sae(tmp_path / "nosparsity").sparsity is None
    with pytest.raises(ValueError, match="log10 densities"):
        sae.save(tmp_path / "bad", sparsity=torch.zeros(3))


def test_load_overrides_dtype_and_device(saved):
    loaded = load_sae(saved, dtype="float64", device="cpu")
    assert loaded.W_enc.dtype == torch.float64 and loaded.cfg.dtype == "float64"


def test_save_replaces_atomically(saved, monkeypatch):
    before = (saved / WEIGHTS_FILE).read_bytes()
    sae = trained_sae("relu")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sae_module, "write_json", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        sae.save(saved)
    assert (saved / WEIGHTS_FILE).read_bytes() == before and load_sae(saved).cfg.architecture == "topk"
    assert [p.name for p in saved.parent.iterdir()] == ["sae"]  # no temporary left behind
    monkeypatch.undo()
    sae.save(saved)
    assert load_sae(saved).cfg.architecture == "relu"


def _single_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "damage, error, match",
    [
        (lambda d: (d / CFG_FILE).unlink(), FileNotFoundError, "cfg.json is missing"),
        (lambda d: (d / WEIGHTS_FILE).unlink(), FileNotFoundError, "sae_weights.safetensors is missing"),
        (lambda d: (d / CFG_FILE).write_text("{not json"), SAEFormatError, "not valid JSON"),
        (lambda d: (d / CFG_FILE).write_text("[1, 2]"), SAEFormatError, "not a JSON object"),
        (lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x00garbage" * 10), SAEFormatError, "not a readable safetensors"),
        (
            lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-50]),
            SAEFormatError,
            "not a readable safetensors",
        ),
        (lambda d: (d / SPARSITY_FILE).write_bytes(b"junk"), SAEFormatError, "sparsity.safetensors is not a readable"),
    ],
)
def test_damaged_directories_give_one_clear_error(saved, damage, error, match):
    damage(saved)
    with pytest.raises(error) as err:
        load_sae(saved)
    assert match in _single_line(err)


def _edit_cfg(directory, **changes):
    cfg = json.loads((directory / CFG_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    (directory / CFG_FILE).write_text(json.dumps(cfg))


def _edit_weights(directory, fn):
    tensors = load_file(str(directory / WEIGHTS_FILE))
    fn(tensors)
    save_file(tensors, str(directory / WEIGHTS_FILE))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: _edit_cfg(d, d_in=None), "lacks d_in"),
        (lambda d: _edit_cfg(d, architecture="gatd"), "unknown architecture 'gatd'; use one of: abstopk"),
        (lambda d: _edit_cfg(d, d_in=9), "W_dec has shape (32, 8), but cfg.json implies (32, 9)"),
        (lambda d: _edit_cfg(d, architecture="jumprelu"), "lacks ['threshold']"),
        (lambda d: _edit_weights(d, lambda t: t.pop("b_enc")), "lacks ['b_enc']"),
        (lambda d: _edit_weights(d, lambda t: t.update(threshold=torch.zeros(D_SAE))), "has extra ['threshold']"),
    ],
)
def test_inconsistent_directories_give_one_clear_error(saved, edit, match):
    edit(saved)
    with pytest.raises(SAEFormatError) as err:
        load_sae(saved)
    assert match in _single_line(err)


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="not an SAE directory"):
        load_sae("/nonexistent/sae")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(architecture="gatd"), "unknown architecture 'gatd'; use one of: abstopk, batchtopk, feature_choice"),
        (dict(k=33), "k=33 exceeds d_sae=32; use k <= d_sae"),
        (dict(k=0), "k=0; use an integer k >= 1"),
        (dict(k=2.5), "use an integer k >= 1"),
        (dict(d_in=0), "d_in=0; use a positive integer"),
        (dict(d_sae=-4), "d_sae=-4; use a positive integer"),
        (dict(dtype="float8"), "dtype='float8'; use one of: float32"),
        (dict(device="gpu"), "device='gpu' is not a torch device"),
        (dict(normalize_activations="layer_norm"), "normalize_activations='layer_norm'; use one of: none"),
        (dict(architecture="mpsae", apply_b_dec_to_input=False), "set apply_b_dec_to_input=True"),
        (dict(architecture="gsae", gsae_beta=-1.0), "gsae_beta=-1.0; use a finite value >= 0"),
        (dict(architecture="gsae", gsae_grad_norm="l2"), "use 'rms' or 'none'"),
        (dict(architecture="mpsae", mp_max_steps=0), "mp_max_steps=0"),
        (dict(architecture="mpsae", mp_stop_residual=1.5), "mp_stop_residual=1.5"),
        (dict(architecture="mutual_choice", threshold_ema=0.0), "threshold_ema=0.0; use a rate in (0, 1]"),
        (dict(architecture="feature_choice", fc_zipf_exponent=-1.0), "fc_zipf_exponent=-1.0"),
        (dict(architecture="jumprelu", jumprelu_bandwidth=0.0), "jumprelu_bandwidth=0.0; use a value > 0"),
        (dict(metadata={"path": object()}), "metadata must be JSON-serialisable"),
    ],
)
def test_bad_configs_give_one_line_errors_naming_the_fix(kwargs, match):
    with pytest.raises(ValueError) as err:  # flat cfg.json keys, as a saved directory holds them
        SAEConfig.from_dict({"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, **kwargs})
    assert match in _single_line(err)


def test_config_details():
    assert SAEConfig(architecture="relu", d_in=4, d_sae=8).k == 32  # k is not read by relu, so not validated
    assert SAEConfig(d_in=4, d_sae=8, k=2, dtype="torch.float64").torch_dtype == torch.float64
    with pytest.raises(TypeError):
        SAEConfig(d_in=4)  # d_sae has no default
    cfg = SAEConfig.from_dict({"architecture": "batchtopk", "d_in": 4, "d_sae": 8, "k": 2, "threshold_ema": 0.5})
    again = SAEConfig.from_dict({**cfg.to_dict(), "unknown_key": 1})
    assert again.to_dict() == cfg.to_dict() and again.rule_config.threshold_ema == 0.5
    from sae_kit.sparsifiers.gsae import GSAEConfig

    with pytest.raises(ValueError, match="rule_config is a GSAEConfig, but architecture 'topk' takes a RuleConfig"):
        SAEConfig(d_in=4, d_sae=8, k=2, rule_config=GSAEConfig())
    assert "k" not in SAEConfig(architecture="relu", d_in=4, d_sae=8).to_dict()  # only what the rule reads


@pytest.mark.filterwarnings("ignore:gsae")
@pytest.mark.parametrize(
    "architecture", ["topk", "abstopk", "gsae", "mpsae", "mutual_choice", "feature_choice", "relu", "jumprelu"]
)
def test_directories_saved_before_rule_configs_still_load(architecture, tmp_path):
    """tests/data/legacy_sae holds one SAE per architecture saved by the code before the plug-in redesign (flat
    gsae_*/mp_*/fc_*/jumprelu_*/threshold_ema keys): each loads with its settings and gives the codes it gave then."""
    from pathlib import Path

    from safetensors.torch import load_file as read

    legacy = Path(__file__).parent / "data" / "legacy_sae" / architecture
    sae = load_sae(legacy)
    expected = read(str(legacy / "expected.safetensors"))
    old_cfg = json.loads((legacy / CFG_FILE).read_text())
    torch.testing.assert_close(sae.encode(expected["x"]), expected["f"])
    torch.testing.assert_close(sae(expected["x"]).x_hat, expected["x_hat"])
    new_cfg = sae.cfg.to_dict()
    for key, value in old_cfg.items():
        if key != "metadata":
            assert new_cfg[key] == value, key  # every recorded setting is read back, under the same key
    sae.save(tmp_path / "again")
    torch.testing.assert_close(load_sae(tmp_path / "again").encode(expected["x"]), expected["f"])


def test_non_finite_weights_are_refused_when_loaded(saved):
    weights = load_file(str(saved / WEIGHTS_FILE))
    weights["W_dec"][3, 1] = float("nan")
    weights["b_enc"][0] = float("inf")
    save_file(weights, str(saved / WEIGHTS_FILE))
    with pytest.raises(SAEFormatError) as err:
        load_sae(saved)
    assert "NaN/inf" in _single_line(err) and "re-train the SAE" in str(err.value)


def test_an_sae_saved_on_a_gpu_loads_on_this_machine(saved):
    """cfg.json saying cuda:0 (a GPU-trained SAE) loads on a CPU-only machine; saving never pins a device index."""
    cfg = json.loads((saved / CFG_FILE).read_text())
    (saved / CFG_FILE).write_text(json.dumps({**cfg, "device": "cuda:0"}))
    sae = load_sae(saved)
    want = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert str(sae.W_dec.device) == (want if want == "cpu" else "cuda:0")
    assert json.loads((sae.save(saved.parent / "re") / CFG_FILE).read_text())["device"] in ("cpu", "cuda")
