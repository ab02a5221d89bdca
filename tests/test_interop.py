"""Interop with SAELens and sparsify directories, and the SAEBench surface.

Peer directories are written by hand here, with the peer's own file names, tensor names, orientations and cfg.json
keys (SAELens 6.54 / pre-6, sparsify 1.3), and their codes are computed from the raw tensors with the peer's own
equations (written out below), never with sae-kit.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_kit import SAE, SAEConfig, load_sae
from sae_kit.errors import SaeKitError
from sae_kit.formats import SPARSIFY_WEIGHTS_FILE, detect_format
from sae_kit.sae import CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE, SAEFormatError

D_IN, D_SAE, K = 6, 24, 3
META_V6 = {
    "sae_lens_version": "6.54.12",
    "sae_lens_training_version": "6.54.12",
    "model_name": "gpt2",
    "hook_name": "blocks.3.hook_resid_post",
    "hook_head_index": None,
    "context_size": 128,
    "prepend_bos": True,
    "dataset_path": "monology/pile-uncopyrighted",
}
CLOSE = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return 2 * torch.randn(50, D_IN)


def raw_tensors(*names: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """SAELens-named random tensors: W_enc [d_in, d_sae], W_dec [d_sae, d_in] with atoms of norm != 1, biases."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "W_enc": (D_IN, D_SAE),
        "b_enc": (D_SAE,),
        "W_dec": (D_SAE, D_IN),
        "b_dec": (D_IN,),
        "threshold": (D_SAE,),
    }
    out = {name: 0.5 * torch.randn(shapes[name], generator=g) for name in names}
    if "W_dec" in out:
        out["W_dec"] *= 0.5 + torch.rand(D_SAE, 1, generator=g)
    if "threshold" in out:
        out["threshold"] = out["threshold"].abs()
    return out


def write_dir(path, cfg: dict, tensors: dict[str, torch.Tensor], weights_file: str = WEIGHTS_FILE):
    path.mkdir(parents=True, exist_ok=True)
    (path / CFG_FILE).write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / weights_file))
    return path


def one_line_error(fn, error=SAEFormatError) -> str:
    with pytest.raises(error) as err:
        fn()
    assert "\n" not in str(err.value)
    return str(err.value)


# --------------------------------------------------------------------------------- the peers' equations, verbatim
def saelens_encode(cfg: dict, t: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens 6: process_sae_in, then the architecture's encode (standard, topk, abstopk, jumprelu)."""
    hidden = (x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)) @ t["W_enc"] + t["b_enc"]
    arch = cfg["architecture"]
    if arch == "standard":
        return hidden.relu()
    if arch == "jumprelu":
        return hidden.relu() * (hidden > t["threshold"]).to(hidden.dtype)
    if cfg.get("rescale_acts_by_decoder_norm"):
        hidden = hidden * t["W_dec"].norm(dim=-1)
    if arch == "abstopk":
        idx = hidden.abs().topk(cfg["k"], dim=-1, sorted=False).indices
        return torch.zeros_like(hidden).scatter(-1, idx, hidden.gather(-1, idx))
    values, idx = hidden.topk(cfg["k"], dim=-1, sorted=False)
    return torch.zeros_like(hidden).scatter(-1, idx, values.relu())


def saelens_decode(cfg: dict, t: dict, f: torch.Tensor) -> torch.Tensor:
    """SAELens: (pre-6 finetuning scaling) and (topk rescaling) of the codes, then f·W_dec + b_dec."""
    if cfg.get("rescale_acts_by_decoder_norm"):
        f = f * (1 / t["W_dec"].norm(dim=-1))
    if cfg.get("finetuning_scaling_factor"):
        f = f * t["scaling_factor"]
    return f @ t["W_dec"] + t["b_dec"]


def saelens_matching_pursuit(cfg: dict, t: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens 6 _encode_matching_pursuit (apply_b_dec_to_input, no residual threshold)."""
    residual = x - t["b_dec"]
    acts = torch.zeros(x.shape[0], t["W_dec"].shape[0])
    prev = torch.zeros_like(acts, dtype=torch.bool)
    done = torch.zeros(x.shape[0], dtype=torch.bool)
    for _ in range(cfg["max_iterations"]):
        idx = (residual @ t["W_dec"].T).relu().max(dim=1, keepdim=True).indices
        atoms = t["W_dec"][idx.squeeze(1)]
        values = (residual * atoms).sum(-1, keepdim=True).relu() * (~done).unsqueeze(1)
        acts.scatter_add_(1, idx, values)
        residual = residual - values * atoms
        support = acts != 0
        if cfg["stop_on_duplicate_support"]:
            done |= (support == prev).all(dim=1)
            prev = support
        if done.all():
            break
    return acts


def sparsify_encode(cfg: dict, t: dict, x: torch.Tensor) -> torch.Tensor:
    """sparsify 1.3 SparseCoder.encode (x − b_dec unless transcode; fused_encoder: ReLU, then top-k), made dense;
    early sparsify's `signed`: top-k of |z| with signed values."""
    if not cfg.get("transcode"):
        x = x - t["b_dec"]
    pre = x @ t["encoder.weight"].T + t["encoder.bias"]
    if cfg.get("signed"):
        idx = pre.abs().topk(cfg["k"], dim=-1, sorted=False).indices
        values = pre.gather(-1, idx)
    else:
        values, idx = pre.relu().topk(cfg["k"], dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, idx, values)


def sparsify_decode(t: dict, f: torch.Tensor) -> torch.Tensor:
    """decoder_impl(top_indices, top_acts, W_dec.mT) + b_dec, in dense form."""
    return f @ t["W_dec"] + t["b_dec"]


def assert_same_sae(sae: SAE, x: torch.Tensor, codes: torch.Tensor, x_hat: torch.Tensor) -> None:
    torch.testing.assert_close(sae.encode(x), codes, **CLOSE)
    torch.testing.assert_close(sae.decode(codes), x_hat, **CLOSE)
    torch.testing.assert_close(sae(x).x_hat, x_hat, **CLOSE)


# ------------------------------------------------------------------------------------------------ SAELens v6 in
def v6_cfg(architecture: str, **extra) -> dict:
    return {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": dict(META_V6),
        "architecture": architecture,
        **extra,
    }


V6_CASES = {
    "standard": (v6_cfg("standard"), "relu"),
    "standard-no-b_dec-sub": (v6_cfg("standard", apply_b_dec_to_input=False), "relu"),
    "topk": (v6_cfg("topk", k=K, rescale_acts_by_decoder_norm=False), "topk"),
    "topk-rescaled": (v6_cfg("topk", k=K, rescale_acts_by_decoder_norm=True), "topk"),
    "abstopk-rescaled": (v6_cfg("abstopk", k=K, rescale_acts_by_decoder_norm=True), "abstopk"),
    "jumprelu": (v6_cfg("jumprelu"), "jumprelu"),
}


@pytest.mark.parametrize("case", V6_CASES)
def test_saelens_v6_directories_encode_as_saelens_does(case, tmp_path, x):
    cfg, ours = V6_CASES[case]
    t = raw_tensors("W_enc", "b_enc", "W_dec", "b_dec", *(["threshold"] if ours == "jumprelu" else []))
    if ours == "jumprelu":
        t["threshold"][:4] = torch.tensor([0.0, -0.3, 0.0, -1.0])  # SAELens: θ <= 0 acts as θ = 0 (ReLU first)
    sae = load_sae(write_dir(tmp_path / case, cfg, t))
    codes = saelens_encode(cfg, t, x)
    assert (codes != 0).any() and (codes == 0).any()
    assert sae.cfg.architecture == ours and not sae.training
    assert sae.cfg.metadata["hook_name"] == "blocks.3.hook_resid_post" and sae.cfg.metadata["model_name"] == "gpt2"
    assert sae.cfg.apply_b_dec_to_input == cfg["apply_b_dec_to_input"]
    assert_same_sae(sae, x, codes, saelens_decode(cfg, t, codes))
    if "k" in cfg:
        assert sae.cfg.k == K


def test_a_topk_with_non_unit_atoms_and_no_rescaling_is_loaded_unchanged(tmp_path, x):
    cfg = v6_cfg("topk", k=K, rescale_acts_by_decoder_norm=False)
    t = raw_tensors("W_enc", "b_enc", "W_dec", "b_dec")
    sae = load_sae(write_dir(tmp_path / "s", cfg, t))
    assert torch.equal(sae.W_dec, t["W_dec"]) and torch.equal(sae.W_enc, t["W_enc"])
    rescaled = saelens_encode({**cfg, "rescale_acts_by_decoder_norm": True}, t, x)
    assert not torch.allclose(sae.encode(x), rescaled)  # the data tells the two conventions apart


def test_saelens_hook_z_and_gpu_cfgs_load_on_the_cpu_and_round_trip(tmp_path, x):
    cfg = v6_cfg("standard", device="cuda:0", reshape_activations="hook_z")  # SAELens records the training device
    cfg["metadata"]["hook_name"] = "blocks.1.attn.hook_z"
    sae = load_sae(write_dir(tmp_path / "z", cfg, raw_tensors("W_enc", "b_enc", "W_dec", "b_dec")))
    assert sae.W_dec.device == torch.device("cpu") and sae.cfg.metadata["reshape_activations"] == "hook_z"
    sae.save(tmp_path / "again", format="saelens")
    assert json.loads((tmp_path / "again" / CFG_FILE).read_text())["reshape_activations"] == "hook_z"


def test_saelens_batchtopk_saved_as_jumprelu_comes_back_as_mutual_choice(tmp_path, x):
    t = raw_tensors("W_enc", "b_enc", "W_dec", "b_dec")
    t["threshold"] = torch.full((D_SAE,), 0.4)  # BatchTopKTrainingSAE.process_state_dict_for_saving_inference
    meta = {
        **META_V6,
        "training_architecture": "batchtopk",
        "training_architecture_details": {"k": 3.0, "topk_threshold_lr": 0.02, "aux_loss_coefficient": 1.0},
    }
    cfg = {**v6_cfg("jumprelu"), "metadata": meta}
    sae = load_sae(write_dir(tmp_path / "btk", cfg, t))
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.rule_config.threshold_ema) == ("mutual_choice", 3, 0.02)
    codes = saelens_encode(cfg, t, x)
    assert_same_sae(sae, x, codes, saelens_decode(cfg, t, codes))
    meta["training_architecture_details"]["k"] = 2.5  # SAELens allows a float k; Mutual Choice needs an integer
    sae = load_sae(write_dir(tmp_path / "btk-float-k", cfg, t))
    assert sae.cfg.architecture == "jumprelu"
    assert_same_sae(sae, x, codes, saelens_decode(cfg, t, codes))


def test_saelens_batchtopk_training_checkpoint(tmp_path, x):
    """TrainingSAE.save_model of a batchtopk SAE: architecture batchtopk, a scalar topk_threshold, unfolded norms."""
    t = raw_tensors("W_enc", "b_enc", "W_dec", "b_dec")
    t["topk_threshold"] = torch.tensor(0.3, dtype=torch.float64)
    cfg = v6_cfg(
        "batchtopk", k=3.0, topk_threshold_lr=0.01, rescale_acts_by_decoder_norm=True, aux_loss_coefficient=1.0
    )
    sae = load_sae(write_dir(tmp_path / "ckpt", cfg, t))
    assert (sae.cfg.architecture, sae.cfg.k) == ("mutual_choice", 3)
    # What SAELens's saved inference model computes: JumpReLU of hidden·||W_dec|| at the scalar threshold.
    norms = t["W_dec"].norm(dim=-1)
    hidden = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norms
    codes = hidden.relu() * (hidden > 0.3)
    assert_same_sae(sae, x, codes, (codes / norms) @ t["W_dec"] + t["b_dec"])


# ---------------------------------------------------------------------------------------------- SAELens pre-6 in
def pre6_cfg(**extra) -> dict:
    return {
        "model_name": "gpt2-small",
        "hook_point": "blocks.2.hook_resid_pre",
        "hook_point_layer": 2,
        "hook_point_head_index": None,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "torch.float32",
        "device": "cpu",
        "context_size": 128,
        "dataset_path": "Skylion007/openwebtext",
        "sae_lens_training_version": "3.13.0",
        **extra,
    }


PRE6_CASES = {
    "relu, bool normalize, no apply_b_dec key": (
        pre6_cfg(activation_fn_str="relu", normalize_activations=False),
        "relu",
        "none",
    ),
    "relu, apply_b_dec false": (
        pre6_cfg(activation_fn_str="relu", apply_b_dec_to_input=False, normalize_activations="none"),
        "relu",
        "none",
    ),
    "topk via activation_fn_kwargs": (
        pre6_cfg(
            architecture="standard",
            activation_fn_str="topk",
            activation_fn_kwargs={"k": K},
            normalize_activations="expected_average_only_in",
        ),
        "topk",
        "expected_average_only_in",
    ),
    "normalize true": (
        pre6_cfg(activation_fn_str="relu", normalize_activations=True),
        "relu",
        "expected_average_only_in",
    ),
    "finetuning scaling factor": (pre6_cfg(activation_fn_str="relu", finetuning_scaling_factor=True), "relu", "none"),
    "jumprelu": (pre6_cfg(architecture="jumprelu", activation_fn_str="relu"), "jumprelu", "none"),
}


@pytest.mark.parametrize("case", PRE6_CASES)
def test_saelens_pre6_directories(case, tmp_path, x):
    cfg, ours, norm = PRE6_CASES[case]
    t = raw_tensors("W_enc", "b_enc", "W_dec", "b_dec", *(["threshold"] if ours == "jumprelu" else []))
    if case == "finetuning scaling factor":
        t["scaling_factor"] = 0.5 + torch.rand(D_SAE)
    elif ours == "relu":
        t["scaling_factor"] = torch.ones(D_SAE)  # written by some pre-6 versions; all ones means none
    sae = load_sae(write_dir(tmp_path / "pre6", cfg, t))
    assert (sae.cfg.architecture, sae.cfg.normalize_activations) == (ours, norm)
    assert sae.cfg.apply_b_dec_to_input == cfg.get("apply_b_dec_to_input", True)
    assert sae.cfg.metadata["hook_name"] == "blocks.2.hook_resid_pre" and sae.cfg.metadata["hook_layer"] == 2
    ref_cfg = {
        "architecture": {"relu": "standard"}.get(ours, ours),
        "k": K,
        "apply_b_dec_to_input": cfg.get("apply_b_dec_to_input", True),
        "finetuning_scaling_factor": cfg.get("finetuning_scaling_factor", False),
    }
    codes = saelens_encode(ref_cfg, t, x)
    assert_same_sae(sae, x, codes, saelens_decode(ref_cfg, t, codes))


def test_old_checkpoints_log_threshold(tmp_path, x):
    t = raw_tensors("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    stored = {**{k: v for k, v in t.items() if k != "threshold"}, "log_threshold": t["threshold"].log()}
    sae = load_sae(write_dir(tmp_path / "old", v6_cfg("jumprelu"), stored))
    codes = saelens_encode(v6_cfg("jumprelu"), t, x)
    assert_same_sae(sae, x, codes, saelens_decode({}, t, codes))


@pytest.mark.parametrize(
    "cfg, edit, match",
    [
        (v6_cfg("temporal"), None, "SAELens architecture 'temporal' is unsupported: sae-kit has no temporal SAEs"),
        (v6_cfg("transcoder"), None, "sae-kit has no transcoders"),
        (v6_cfg("jumprelu_skip_transcoder"), None, "transcoders"),
        (v6_cfg("bilinear"), None, "unknown SAELens architecture 'bilinear'; sae-kit reads standard, topk"),
        (
            v6_cfg("standard", normalize_activations="constant_norm_rescale"),
            None,
            "normalize_activations='constant_norm_rescale' rescales each token",
        ),
        (v6_cfg("standard", normalize_activations="layer_norm"), None, "normalize_activations='layer_norm'"),
        (v6_cfg("standard", reshape_activations="hook_q"), None, "reshape_activations='hook_q' is unsupported"),
        (pre6_cfg(activation_fn_str="tanh-relu"), None, "pre-6 SAELens activation_fn='tanh-relu' is unsupported"),
        (
            v6_cfg("matching_pursuit"),
            lambda t: [t.pop("W_enc"), t.pop("b_enc")],
            "residual_threshold=0.01 stops on an absolute residual norm",
        ),
        (
            pre6_cfg(activation_fn_str="relu"),
            lambda t: t.update(scaling_factor=torch.full((D_SAE,), 2.0)),
            "finetuning_scaling_factor is false",
        ),
        (
            v6_cfg("standard"),
            lambda t: t.update(W_dec=t["W_dec"].T),
            "W_dec has shape (6, 24), but this format stores it as (24, 6)",
        ),
        (v6_cfg("standard"), lambda t: t.update(W_enc=t["W_enc"].T), "check the tensor's orientation"),
        ({k: v for k, v in v6_cfg("standard").items() if k != "d_sae"}, None, "lacks d_sae"),
        (v6_cfg("standard"), lambda t: t.pop("b_enc"), "lacks ['b_enc']"),
        (v6_cfg("topk", k=99), None, "k=99 exceeds d_sae=24"),
    ],
)
def test_unsupported_or_broken_saelens_directories_give_one_clear_error(cfg, edit, match, tmp_path):
    t = raw_tensors("W_enc", "b_enc", "W_dec", "b_dec")
    if edit:
        edit(t)
    write_dir(tmp_path / "s", cfg, t)
    assert match in one_line_error(lambda: load_sae(tmp_path / "s"))


# ------------------------------------------------------------------------------------------------- sparsify in
def sparsify_cfg(**extra) -> dict:
    return {
        "activation": "topk",
        "expansion_factor": 4,
        "normalize_decoder": True,
        "num_latents": D_SAE,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D_IN,
        **extra,
    }


def sparsify_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    t = raw_tensors("W_enc", "b_enc", "W_dec", "b_dec", seed=seed)
    return {
        "encoder.weight": t["W_enc"].T.contiguous(),
        "encoder.bias": t["b_enc"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
    }


@pytest.mark.parametrize(
    "cfg",
    [
        sparsify_cfg(),
        sparsify_cfg(normalize_decoder=False),
        sparsify_cfg(num_latents=0),
        sparsify_cfg(multi_topk=True),
        sparsify_cfg(signed=True),
    ],
    ids=["default", "normalize_decoder-false", "expansion_factor", "multi_topk", "signed"],
)
def test_sparsify_directories_encode_as_sparsify_does(cfg, tmp_path, x):
    t = sparsify_tensors()
    sae = load_sae(write_dir(tmp_path / "run" / "layers.6", cfg, t, SPARSIFY_WEIGHTS_FILE))
    codes = sparsify_encode(cfg, t, x)
    assert sae.cfg.architecture == ("abstopk" if cfg.get("signed") else "topk") and (sae.cfg.k, sae.cfg.d_sae) == (
        K,
        D_SAE,
    )
    assert_same_sae(sae, x, codes, sparsify_decode(t, codes))
    # b_dec is subtracted whatever normalize_decoder says (SAELens's converter drops it when it is false)
    assert not torch.allclose(codes, sparsify_encode({**cfg, "transcode": True}, t, x))
    assert sae.cfg.metadata["hookpoint"] == "layers.6" and sae.cfg.metadata["hook_name"] == "blocks.6.hook_resid_post"


def test_sparsify_run_config_and_hookpoints(tmp_path):
    run = tmp_path / "run"
    for hook in ("layers.4", "layers.6.mlp"):
        write_dir(run / hook, sparsify_cfg(), sparsify_tensors(), SPARSIFY_WEIGHTS_FILE)
    (run / "config.json").write_text(
        json.dumps(
            {
                "model": "EleutherAI/pythia-70m",
                "dataset": "EleutherAI/rpj-v2-sample",
                "ctx_len": 2048,
                "sae": sparsify_cfg(),
            }
        )
    )
    meta = load_sae(run / "layers.4").cfg.metadata
    assert (meta["model_name"], meta["context_size"], meta["hook_name"], meta["hook_layer"]) == (
        "EleutherAI/pythia-70m",
        2048,
        "blocks.4.hook_resid_post",
        4,
    )
    meta = load_sae(run / "layers.6.mlp").cfg.metadata
    assert meta["hookpoint"] == "layers.6.mlp" and "hook_name" not in meta  # an MLP output is not the residual stream
    msg = one_line_error(lambda: load_sae(run))
    assert "holds 2 SAE(s), one per hook" in msg and f"pass one of: {run / 'layers.4'}, {run / 'layers.6.mlp'}" in msg


@pytest.mark.parametrize(
    "cfg, edit, match",
    [
        (sparsify_cfg(transcode=True), None, "sparsify transcode=true makes a transcoder"),
        (
            sparsify_cfg(skip_connection=True),
            lambda t: t.update(W_skip=torch.zeros(D_IN, D_IN)),
            "skip_connection=true",
        ),
        (sparsify_cfg(), lambda t: t.update(W_skip=torch.zeros(D_IN, D_IN)), "W_skip: a skip connection, unsupported"),
        (sparsify_cfg(activation="groupmax"), None, "activation='groupmax' is unsupported"),
        ({k: v for k, v in sparsify_cfg().items() if k != "d_in"}, None, "lacks an integer d_in"),
        (
            sparsify_cfg(),
            lambda t: t.update({"encoder.weight": t["encoder.weight"].T}),
            "encoder.weight has shape (6, 24)",
        ),
        (sparsify_cfg(), lambda t: t.pop("encoder.bias"), "a sparsify SAE holds exactly"),
        (sparsify_cfg(k=30), None, "k=30 exceeds d_sae=24"),
    ],
)
def test_unsupported_or_broken_sparsify_directories_give_one_clear_error(cfg, edit, match, tmp_path):
    t = sparsify_tensors()
    if edit:
        edit(t)
    write_dir(tmp_path / "layers.1", cfg, t, SPARSIFY_WEIGHTS_FILE)
    assert match in one_line_error(lambda: load_sae(tmp_path / "layers.1"))


# ---------------------------------------------------------------------------------------------------- detection
def test_format_detection(tmp_path):
    write_dir(tmp_path / "lens", v6_cfg("standard"), raw_tensors("W_enc", "b_enc", "W_dec", "b_dec"))
    write_dir(tmp_path / "spars", sparsify_cfg(), sparsify_tensors(), SPARSIFY_WEIGHTS_FILE)
    SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)).save(tmp_path / "ours")
    assert [detect_format(tmp_path / name)[0] for name in ("ours", "lens", "spars")] == [
        "sae_kit",
        "saelens",
        "sparsify",
    ]
    (tmp_path / "empty").mkdir()
    msg = one_line_error(lambda: load_sae(tmp_path / "empty"))
    assert (
        "sae-kit and SAELens need cfg.json + sae_weights.safetensors, sparsify needs cfg.json + sae.safetensors" in msg
    )
    assert "is a file; pass the SAE directory" in one_line_error(lambda: load_sae(tmp_path / "lens" / CFG_FILE))
    (tmp_path / "spars" / SPARSIFY_WEIGHTS_FILE).unlink()
    assert "sae.safetensors is missing" in one_line_error(lambda: load_sae(tmp_path / "spars"), FileNotFoundError)
    (tmp_path / "lens" / CFG_FILE).unlink()
    assert "cfg.json is missing" in one_line_error(lambda: load_sae(tmp_path / "lens"), FileNotFoundError)


# ---------------------------------------------------------------------------------------------------- exports
def trained(architecture: str, **kw) -> SAE:
    torch.manual_seed(0)
    sae = SAE(
        SAEConfig.from_dict(
            {
                "architecture": architecture,
                "d_in": D_IN,
                "d_sae": D_SAE,
                "k": K,
                **kw,
                "metadata": {"model_name": "tiny", "hook_name": "blocks.6.hook_resid_post", "context_size": 64},
            }
        )
    )
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if "threshold" in sae.sparsifier.state_tensors():
            sae.sparsifier.threshold.copy_(0.2 + 0.3 * torch.rand(D_SAE))
    sae.train()(2 * torch.randn(64, D_IN))
    return sae.eval()


SAELENS_KEYS = {
    "architecture",
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "metadata",
}
EXPORTS = {
    "relu": ("standard", set()),
    "topk": ("topk", {"k", "rescale_acts_by_decoder_norm"}),
    "abstopk": ("abstopk", {"k", "rescale_acts_by_decoder_norm"}),
    "jumprelu": ("jumprelu", set()),
    "mutual_choice": ("jumprelu", set()),
    "batchtopk": ("jumprelu", set()),
    "feature_choice": ("jumprelu", set()),
    "mpsae": ("matching_pursuit", {"residual_threshold", "max_iterations", "stop_on_duplicate_support"}),
}


@pytest.mark.parametrize("architecture", EXPORTS)
def test_saelens_export_is_what_saelens_reads_and_round_trips(architecture, tmp_path, x):
    sae = trained(architecture)
    sae.save(tmp_path / "s", sparsity=torch.linspace(-4, -1, D_SAE), format="saelens")
    cfg = json.loads((tmp_path / "s" / CFG_FILE).read_text())
    t = load_file(str(tmp_path / "s" / WEIGHTS_FILE))
    name, extra = EXPORTS[architecture]
    assert set(cfg) == SAELENS_KEYS | extra and cfg["architecture"] == name and cfg["dtype"] == "float32"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.") and "sae_kit_version" not in cfg["metadata"]
    assert cfg["metadata"]["hook_name"] == "blocks.6.hook_resid_post"
    shapes = {
        "W_enc": (D_IN, D_SAE),
        "b_enc": (D_SAE,),
        "W_dec": (D_SAE, D_IN),
        "b_dec": (D_IN,),
        "threshold": (D_SAE,),
    }
    assert {k: tuple(v.shape) for k, v in t.items()} == {k: shapes[k] for k in sae.weights()}
    # SAELens's equations on the written files give our codes
    ours = sae.encode(x)
    theirs = saelens_matching_pursuit(cfg, t, x) if name == "matching_pursuit" else saelens_encode(cfg, t, x)
    torch.testing.assert_close(theirs, ours, **CLOSE)
    torch.testing.assert_close(saelens_decode(cfg, t, ours), sae.decode(ours), **CLOSE)
    back = load_sae(tmp_path / "s")
    same_rule = {"metadata": None, "architecture": {"batchtopk": "mutual_choice"}.get(architecture, architecture)}
    assert back.cfg.to_dict() | {"metadata": None} == sae.cfg.to_dict() | same_rule  # same rule and settings
    assert torch.equal(back.encode(x), ours) and torch.equal(back.sparsity, sae.sparsity)
    assert back.cfg.metadata["hook_name"] == "blocks.6.hook_resid_post"
    back.save(tmp_path / "native")
    assert detect_format(tmp_path / "native")[0] == "sae_kit" and torch.equal(
        load_sae(tmp_path / "native").encode(x), ours
    )


def test_saelens_export_keeps_dtype_and_b_dec_convention(tmp_path, x):
    sae = trained("topk", apply_b_dec_to_input=False, dtype="float64")
    sae.save(tmp_path / "s", format="saelens")
    cfg = json.loads((tmp_path / "s" / CFG_FILE).read_text())
    assert (cfg["dtype"], cfg["apply_b_dec_to_input"]) == ("float64", False)
    back = load_sae(tmp_path / "s")
    assert back.W_enc.dtype == torch.float64 and torch.equal(back.encode(x), sae.encode(x))
    assert not (tmp_path / "s" / SPARSITY_FILE).exists()


@pytest.mark.filterwarnings("ignore:gsae")
@pytest.mark.parametrize(
    "architecture, kw, match",
    [
        ("gsae", {}, "SAELens has no architecture that encodes like 'gsae'"),
        ("mpsae", {"mp_stop_residual": 0.1}, "set mp_stop_residual=0 and mp_signed=False"),
        ("mpsae", {"mp_signed": True}, "no signed pursuit"),
    ],
)
def test_what_saelens_cannot_hold_is_refused(architecture, kw, match, tmp_path):
    assert match in one_line_error(lambda: trained(architecture, **kw).save(tmp_path / "s", format="saelens"))
    assert not (tmp_path / "s").exists()


def test_sparsify_export(tmp_path, x):
    for apply_b_dec in (True, False):
        sae = trained("topk", apply_b_dec_to_input=apply_b_dec)
        sae.save(tmp_path / str(apply_b_dec) / "layers.6", format="sparsify")
        folder = tmp_path / str(apply_b_dec) / "layers.6"
        cfg = json.loads((folder / CFG_FILE).read_text())
        t = load_file(str(folder / SPARSIFY_WEIGHTS_FILE))
        assert cfg == sparsify_cfg() and sorted(t) == ["W_dec", "b_dec", "encoder.bias", "encoder.weight"]
        assert tuple(t["encoder.weight"].shape) == (D_SAE, D_IN) and tuple(t["W_dec"].shape) == (D_SAE, D_IN)
        ours = sae.encode(x)
        torch.testing.assert_close(sparsify_encode(cfg, t, x), ours, **CLOSE)
        torch.testing.assert_close(sparsify_decode(t, ours), sae.decode(ours), **CLOSE)
        back = load_sae(folder)
        assert back.cfg.architecture == "topk" and back.cfg.apply_b_dec_to_input
        torch.testing.assert_close(back.encode(x), ours, **CLOSE)


@pytest.mark.parametrize(
    "architecture, kw, match",
    [
        ("abstopk", {}, "sparsify stores per-token TopK SAEs only"),
        ("mutual_choice", {}, "sparsify stores per-token TopK SAEs only"),
        ("topk", {"normalize_activations": "expected_average_only_in"}, "fold the scale in first"),
    ],
)
def test_what_sparsify_cannot_hold_is_refused(architecture, kw, match, tmp_path):
    assert match in one_line_error(lambda: trained(architecture, **kw).save(tmp_path / "s", format="sparsify"))


def test_unknown_format(tmp_path):
    assert "format='pickle'; use one of: sae_kit, saelens, sparsify" in one_line_error(
        lambda: trained("topk").save(tmp_path / "s", format="pickle")
    )


# --------------------------------------------------------------------------------------------------- SAEBench
@pytest.mark.parametrize("architecture", ["topk", "jumprelu", "mpsae"])
def test_saebench_surface(architecture, x):
    sae = trained(architecture)
    bench = sae.to_saebench()
    assert tuple(bench.W_enc.shape) == (D_IN, D_SAE) and tuple(bench.W_dec.shape) == (D_SAE, D_IN)
    assert tuple(bench.b_enc.shape) == (D_SAE,) and tuple(bench.b_dec.shape) == (D_IN,)
    assert bench.W_dec is sae.W_dec and bench.dtype == torch.float32 and bench.device == torch.device("cpu")
    if architecture == "mpsae":
        assert torch.equal(bench.W_enc, sae.W_dec.T) and not bench.b_enc.any()
    else:
        assert bench.W_enc is sae.W_enc and bench.b_enc is sae.b_enc
    f = bench.encode(x.reshape(5, 10, D_IN))  # SAEBench passes [B, L, d_in] too
    assert f.shape == (5, 10, D_SAE) and torch.equal(f.reshape(50, D_SAE), sae.encode(x))
    torch.testing.assert_close(bench.decode(f), sae.decode(f))
    torch.testing.assert_close(bench(x), bench.decode(bench.encode(x)), **CLOSE)
    c = bench.cfg
    assert (c.model_name, c.hook_name, c.hook_layer, c.context_size, c.d_in, c.d_sae) == (
        "tiny",
        "blocks.6.hook_resid_post",
        6,
        64,
        D_IN,
        D_SAE,
    )
    assert c.architecture == architecture and c.dtype == "float32" and c.device == "cpu" and c.hook_head_index is None
    assert (c.metadata.hook_name, c.metadata.hook_layer, c.metadata.model_name) == (c.hook_name, 6, "tiny")
    bench.to(dtype=torch.float64)
    assert bench.dtype == torch.float64 and c.dtype == "float64" and sae.W_dec.dtype == torch.float64
    assert bench.encode(x).dtype == torch.float64
    bench.float()
    assert bench.dtype == torch.float32 and c.dtype == "float32"


def test_saebench_decoder_norms_and_overrides():
    sae = trained("topk")
    sae.set_decoder_norm_to_unit_norm()
    assert sae.to_saebench().check_decoder_norms()
    with torch.no_grad():
        sae.W_dec[0] *= 1.1
    assert not sae.to_saebench().check_decoder_norms()
    bench = sae.to_saebench(model_name="gpt2", hook_name="blocks.2.hook_mlp_out", context_size=1024)
    assert (bench.cfg.model_name, bench.cfg.hook_layer, bench.cfg.context_size) == ("gpt2", 2, 1024)
    bare = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    assert "hook_name is unknown" in one_line_error(bare.to_saebench, SaeKitError)
    assert "hook_layer is unknown" in one_line_error(
        lambda: bare.to_saebench(hook_name="embed", model_name="m"), SaeKitError
    )
    assert bare.to_saebench(hook_name="hook_embed", hook_layer=0, model_name="m").cfg.hook_layer == 0
    assert bare.to_saebench(hook_name="blocks.0.hook_resid_pre", model_name="m").cfg.hook_layer == 0
