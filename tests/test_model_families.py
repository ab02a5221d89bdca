"""Model families beyond SmolLM2, on tiny random-weight HF directories built offline (tests/tiny_models.py):
load → harvest → train → eval → index through the public API on each; the final norm's scale (Gemma's 1 + w);
BOS-less tokenizers (Qwen); fp16 harvests; hub errors (gated, 401/403, missing, offline) told apart."""

from __future__ import annotations

import dataclasses
import json
import math

import httpx
import pytest
import torch
from huggingface_hub import errors as hub_errors

from sae_kit.models import ModelError, final_norm_scale, hub_error_message, hub_failure, load_model
from tests.tiny_models import BOS_LESS, FAMILIES, build

HOOK = "blocks.1.hook_resid_post"
FULL_EVAL = ("gemma2", "gpt2")
"""Families evaluated with every eval section (dark matter, steering, attention too); the others run core and dead."""


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build(family, root) for family in FAMILIES}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_load_harvest_train_eval_index(family, tiny_dirs, tmp_path):
    from sae_kit import HarvestConfig, load_sae
    from sae_kit.activations import harvester_for
    from sae_kit.build_cache import CacheConfig, build_cache
    from sae_kit.cache import ActivationCache
    from sae_kit.dashboards.indexer import IndexConfig, build_index
    from sae_kit.data import pack
    from sae_kit.eval.core import CoreConfig
    from sae_kit.eval.dark_matter import DarkMatterConfig
    from sae_kit.eval.evaluate import EvalConfig, evaluate
    from sae_kit.eval.steering import SteeringConfig
    from sae_kit.training import TrainConfig
    from sae_kit.training.run import TrainRunConfig, train

    path = str(tiny_dirs[family])
    model = load_model(path, device="cpu", dtype="float32")
    assert model.sae_kit_name == path and model.cfg.d_model == 64 and model.cfg.n_layers == 2
    tok = model.tokenizer
    # our packing puts first exactly what the bridge's to_tokens does (for Qwen: the EOS stand-in for a BOS)
    text = "The quick brown fox jumps over the lazy dog."
    harvest = HarvestConfig(model=path, hook=(HOOK,), context_size=32)
    row = next(pack([(0, text)], tok, dataclasses.replace(harvest.pack_config(), context_size=8))).tokens[0]
    n = min(len(row), model.to_tokens(text, prepend_bos=True).shape[1])
    assert torch.equal(model.to_tokens(text, prepend_bos=True)[0, :n].cpu(), row[:n])
    if family in BOS_LESS:
        assert row[0] == tok.eos_token_id

    cache = build_cache(
        CacheConfig(out=tmp_path / "cache", harvest=harvest, tokens=2048, heldout_tokens=256, progress=False),
        model=model,
    )
    settings = ActivationCache(cache).settings
    assert settings["bos_token_id"] == int(row[0]) and settings["model_name"] == path
    # the stand-in BOS (and every other special token) is excluded from the harvested rows
    rows = harvester_for(model, harvest).rows(next(iter(_contexts(model, harvest))))
    assert not set(rows.token.tolist()) & (set(tok.all_special_ids) | {int(row[0])})

    summary = train(
        TrainRunConfig(
            out=tmp_path / "run",
            cache=cache,
            k=(4,),
            expansion_factor=(2,),
            eval_tokens=256,
            progress=False,
            train=TrainConfig(batch_size=256, tokens=2048, lr=2e-3, warmup_steps=2),
        )
    )
    member = summary["members"][0]
    assert math.isfinite(member["heldout"]["fvu"]) and member["heldout"]["fvu"] < 1.5
    sae = load_sae(member["sae_dir"])
    assert sae.cfg.d_in == 64 and sae.cfg.metadata["model_name"] == path and sae.cfg.metadata["hook_name"] == HOOK
    assert sae.cfg.metadata["bos_token_id"] == int(row[0]) and sae.cfg.metadata["corpus_split"] == "train"

    # every section on one RMSNorm family with the (1 + w) norm and the LayerNorm one; core and dead on the rest (CI time)
    sections = EvalConfig().sections if family in FULL_EVAL else ("core", "dead")
    report = evaluate(
        EvalConfig(
            saes=(tmp_path / "run",),
            out=tmp_path / "eval",
            tokens=2048,
            png=False,
            sections=sections,
            core=CoreConfig(ce_tokens=256),
            dark_matter=DarkMatterConfig(ce_tokens=256),
            steering=SteeringConfig(n_features=2, alphas=(1.0,), contexts=1, generate_tokens=4),
        ),
        model=model,
    )
    json.dumps(report)  # JSON-serialisable
    core = _find(report, "ce_loss_recovered")
    assert core is not None and all(math.isfinite(v) for v in core)
    assert (tmp_path / "eval" / "report.json").is_file()

    metas = build_index(
        IndexConfig(sae=tmp_path / "run", tokens=1024, shard_size=256, row_group=8, progress=False), model=model
    )
    assert metas and metas[0]["tokens"] > 0 and metas[0]["sae"]["d_sae"] == 128


def _contexts(model, cfg):
    from sae_kit.activations import contexts

    return contexts(model, cfg)


def _find(obj, key: str) -> list[float] | None:
    """Every numeric value stored under `key` anywhere in a nested report."""
    found: list[float] = []

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k == key and isinstance(v, (int, float)):
                    found.append(float(v))
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(obj)
    return found or None


_FINAL_NORM = {
    "llama": lambda hf: hf.model.norm,
    "gemma2": lambda hf: hf.model.norm,
    "gemma3": lambda hf: hf.model.norm,
    "qwen3": lambda hf: hf.model.norm,
    "gpt2": lambda hf: hf.transformer.ln_f,
    "pythia": lambda hf: hf.gpt_neox.final_layer_norm,
}


@pytest.mark.parametrize("family", list(_FINAL_NORM))
def test_final_norm_scale_matches_the_hf_models_own_norm(family, tiny_dirs):
    from transformers import AutoModelForCausalLM

    model = load_model(str(tiny_dirs[family]), device="cpu", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32).eval()
    norm = _FINAL_NORM[family](hf)
    scale = final_norm_scale(model)
    assert scale is not None and scale.shape == (64,) and scale.dtype == torch.float32
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        want = norm(x)
    if isinstance(norm, torch.nn.LayerNorm):  # LayerNorm: centre, divide by the std, scale, add the bias
        xc = x - x.mean(-1, keepdim=True)
        mine = xc / (xc.square().mean(-1, keepdim=True) + norm.eps).sqrt() * scale + norm.bias
    else:  # RMSNorm: divide by the RMS, scale
        eps = getattr(norm, "eps", None) or norm.variance_epsilon
        mine = x / (x.square().mean(-1, keepdim=True) + eps).sqrt() * scale
    torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-5)
    weight = norm.weight.detach()
    if family.startswith("gemma"):  # Gemma's RMSNorm multiplies by (1 + w), not by its stored weight w
        torch.testing.assert_close(scale, 1 + weight)
        assert (scale - weight).abs().min() > 0.99
    else:
        torch.testing.assert_close(scale, weight)


def test_final_norm_scale_is_none_without_a_norm(tiny_dirs):
    model = load_model(str(tiny_dirs["llama"]), device="cpu", dtype="float32")

    class NoNorm:
        cfg = model.cfg
        ln_final = torch.nn.Identity()

    assert final_norm_scale(NoNorm()) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_harvest_takes_the_chunked_path_and_equals_the_full_logits(family, tiny_dirs):
    """∂CE/∂x at a residual and an attention hook: the chunked CE (Gemma 2 with its soft-capped logits too) equals
    autograd through the model's own full logits."""
    from sae_kit.activations import HarvestConfig, Harvester, contexts

    path = str(tiny_dirs[family])
    model = load_model(path, device="cpu", dtype="float32")
    hooks = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    ctx = next(contexts(model, HarvestConfig(model=path, context_size=16, lm_batch_size=2)))
    chunked = Harvester(model, hooks, with_grads=True)
    assert chunked._chunked
    full = Harvester(model, hooks, with_grads=True)
    full._chunked = False
    (a1, g1), (_, g2) = chunked.run(ctx.tokens), full.run(ctx.tokens)
    assert g1 is not None and g2 is not None and a1["blocks.1.attn.hook_z"].shape[-1] == 64  # n_heads · d_head
    for h in hooks:
        torch.testing.assert_close(g1[h], g2[h], rtol=1e-4, atol=1e-5 * float(g2[h].abs().max()))
        assert g2[h].abs().max() > 0


def test_float16_harvest_agrees_with_float32(tiny_dirs):
    from sae_kit.activations import HarvestConfig, Harvester, contexts
    from sae_kit.models import dtype_name

    path = str(tiny_dirs["llama"])
    m32 = load_model(path, device="cpu", dtype="float32")
    m16 = load_model(path, device="cpu", dtype=HarvestConfig(model_dtype="float16").torch_dtype())
    assert dtype_name(m16) == "float16" and dtype_name(m32) == "float32"
    ctx = next(contexts(m32, HarvestConfig(model=path, context_size=32, lm_batch_size=4)))
    a32, _ = Harvester(m32, [HOOK]).run(ctx.tokens)
    a16, _ = Harvester(m16, [HOOK]).run(ctx.tokens)
    assert a16[HOOK].dtype == torch.float32  # handed out as float32 for the SAE
    cos = torch.nn.functional.cosine_similarity(a16[HOOK].flatten(0, 1), a32[HOOK].flatten(0, 1))
    assert cos.min() > 0.999


def test_bos_less_tokenizer_gets_its_eos_as_stand_in():
    from sae_kit.activations import HarvestConfig, bos_settings
    from sae_kit.data import PackConfig, pack
    from tests.tiny_models import tokenizer_for

    raw = tokenizer_for("qwen2")  # a Qwen-like tokenizer as AutoTokenizer loads it: bos_token None
    assert raw.bos_token_id is None and raw.eos_token_id is not None
    batch = next(
        pack(
            [(0, "one document"), (1, "and another one, somewhat longer")],
            raw,
            PackConfig(context_size=8),
            rows_per_batch=1,
        )
    )
    assert batch.tokens[0, 0] == raw.eos_token_id and (batch.doc[batch.tokens == raw.eos_token_id] == -1).all()
    meta = HarvestConfig().settings("qwen", "float32", raw)
    assert meta["bos_token_id"] == raw.eos_token_id and meta["bos_token"] == raw.eos_token
    assert bos_settings(tokenizer_for("llama"))["bos_token_id"] == tokenizer_for("llama").bos_token_id


# ------------------------------------------------------------------------------------------------ hub errors
def _http(cls, status: int, message: str = "refused"):
    response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/x"))
    return cls(message, response=response)


def _wrapped(inner: BaseException, outer: str = "could not load") -> OSError:
    """An OSError raised from `inner`, as transformers raises hub failures."""
    try:
        raise OSError(outer) from inner
    except OSError as err:
        return err


HUB_CASES = [
    (_http(hub_errors.GatedRepoError, 403), "licence", r"is gated on the Hugging Face hub: accept its licence at "),
    (_http(hub_errors.GatedRepoError, 401), "licence", r"log in here \(`hf auth login` or set HF_TOKEN\)"),
    (_http(hub_errors.HfHubHTTPError, 401), "auth", r"refused access .* \(401/403\): log in with `hf auth login`"),
    (_http(hub_errors.RepositoryNotFoundError, 404), "not_found", r"does not exist on the hub \(or is private\)"),
    (
        hub_errors.LocalEntryNotFoundError("no cache"),
        "offline",
        r"the hub is unreachable .* not in the local hub cache",
    ),
    (hub_errors.OfflineModeIsEnabled("HF_HUB_OFFLINE"), "offline", r"the hub is unreachable"),
    (httpx.ConnectError("Name or service not known"), "offline", r"the hub is unreachable"),
]


@pytest.mark.parametrize(("inner", "kind", "message"), HUB_CASES)
def test_hub_model_errors_are_told_apart(monkeypatch, inner, kind, message):
    from transformer_lens.model_bridge import TransformerBridge

    def boot(*args, **kwargs):
        raise _wrapped(inner)

    monkeypatch.setattr(TransformerBridge, "boot_transformers", boot)
    assert hub_failure(_wrapped(inner)) == kind
    with pytest.raises(ModelError, match=message) as err:
        load_model("google/gemma-2-2b", device="cpu")
    assert "\n" not in str(err.value) and "'google/gemma-2-2b'" in str(err.value)
    if kind == "licence":
        assert "https://huggingface.co/google/gemma-2-2b" in str(err.value) and "unreachable" not in str(err.value)


def test_hub_dataset_errors_are_told_apart(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    from sae_kit.data import CorpusError, load_corpus

    for inner, kind, message in HUB_CASES:

        def fail(*args, inner=inner, **kwargs):
            try:
                raise inner
            except Exception as err:
                raise DatasetNotFoundError("Dataset 'org/data' is a gated dataset on the Hub.") from err

        monkeypatch.setattr(datasets, "load_dataset", fail)
        with pytest.raises(CorpusError, match=message) as err:
            load_corpus("org/data")
        assert "\n" not in str(err.value) and "dataset 'org/data'" in str(err.value)
        if kind == "licence":
            assert "https://huggingface.co/datasets/org/data" in str(err.value)
    assert "other" == hub_failure(ValueError("unrelated"))
    assert "pass a local HF directory" in hub_error_message(ValueError("boom"), "model", "x/y")
