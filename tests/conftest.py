"""Shared fixtures: the real SmolLM2 model (loaded once per session), a tiny random Llama for exact checks, a small
indexed sweep for the browser and autointerp (`browse_run`), a realistic TopK SAE for the notebook API
(`analysis_sae`), and the Chromium the browser tests drive."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="session")
def model():
    """The embedded SmolLM2-135M-Instruct as a TransformerBridge."""
    from sae_kit import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="session")
def tokenizer(model):
    return model.tokenizer


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A 2-layer random Llama in float64 sharing SmolLM2's tokenizer: small enough for finite differences."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    hf = LlamaForCausalLM(cfg).to(torch.float64).eval()
    bridge = TransformerBridge.boot_transformers(
        "tiny-llama", hf_model=hf, tokenizer=tokenizer, dtype=torch.float64, device="cpu"
    )
    for p in bridge.parameters():
        p.requires_grad_(False)
    return bridge


@pytest.fixture(scope="session")
def browse_run(model, tmp_path_factory):
    """A real sweep for the browser: TopK and AbsTopK SAEs (1152 latents, k 16) trained briefly on SmolLM2 layer-6
    batches, evaluated together into <sweep>/eval, and indexed on ~3k held-out tokens each."""
    from sae_kit import HarvestConfig
    from sae_kit.build_cache import CacheConfig, build_cache
    from sae_kit.dashboards.indexer import IndexConfig, build_index
    from sae_kit.eval.core import CoreConfig
    from sae_kit.eval.dark_matter import DarkMatterConfig
    from sae_kit.eval.evaluate import EvalConfig, evaluate
    from sae_kit.eval.steering import SteeringConfig
    from sae_kit.training import TrainConfig
    from sae_kit.training.run import TrainRunConfig, train

    root = tmp_path_factory.mktemp("browse")
    cache = build_cache(
        CacheConfig(
            out=root / "cache", harvest=HarvestConfig(context_size=64), tokens=12288, heldout_tokens=512, progress=False
        ),
        model=model,
    )
    sweep = root / "sweep"
    train(
        TrainRunConfig(
            out=sweep,
            cache=cache,
            architecture=("topk", "abstopk"),
            k=(16,),
            expansion_factor=(2,),
            eval_tokens=512,
            progress=False,
            train=TrainConfig(batch_size=512, tokens=512 * 24, lr=2e-3, warmup_steps=4),
        )
    )
    evaluate(
        EvalConfig(
            saes=(sweep,),
            out=sweep / "eval",
            tokens=10000,
            context_size=64,
            core=CoreConfig(ce_tokens=600),
            dark_matter=DarkMatterConfig(ce_tokens=600),
            steering=SteeringConfig(n_features=3, alphas=(1.0, 4.0), contexts=2, generate_tokens=8),
        ),
        model=model,
    )
    build_index(
        IndexConfig(sae=sweep, tokens=3000, context_size=64, shard_size=256, row_group=8, progress=False), model=model
    )
    return sweep


@pytest.fixture(scope="session")
def analysis_sae(model, tmp_path_factory):
    """A realistic TopK SAE for the notebook API and attribution tests: 4608 latents, k 32, on SmolLM2's default hook
    (blocks.6.hook_resid_post), trained from the model on 131k tokens of the embedded corpus. Returns the run directory
    (the SAE is in <run>/sae; load it with sae_kit.load_sae)."""
    from sae_kit import HarvestConfig
    from sae_kit.training import TrainConfig
    from sae_kit.training.run import TrainRunConfig, train

    run = tmp_path_factory.mktemp("analysis") / "run"
    train(
        TrainRunConfig(
            out=run,
            harvest=HarvestConfig(context_size=128),
            architecture=("topk",),
            k=(32,),
            expansion_factor=(8,),
            eval_tokens=2048,
            progress=False,
            train=TrainConfig(batch_size=1024, tokens=131072, lr=2e-3, warmup_steps=8),
        ),
        model=model,
    )
    return run


@pytest.fixture(scope="session")
def reproduce_quick(model, tmp_path_factory):
    """`sae-kit reproduce --quick` run once (about 5 min): (its config, its report). Shared by tests/test_reproduce.py
    and the benchmark's smoke test, which resumes it."""
    from sae_kit.eval.reproduce import ReproduceConfig, reproduce

    cfg = ReproduceConfig(out=tmp_path_factory.mktemp("reproduce") / "run", quick=True, progress=False)
    return cfg, reproduce(cfg, model=model)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Chromium's path. Without it or playwright: skip, or fail where SAE_KIT_REQUIRE_BROWSER=1 (CI)."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    missing = [
        name
        for name, found in (("playwright", importlib.util.find_spec("playwright")), ("chromium", path))
        if not found
    ]
    if missing:
        msg = f"{' and '.join(missing)} not installed: `python3 bootstrap.py test` installs {'them' if len(missing) > 1 else 'it'} (chromium as root)"
        if os.environ.get("SAE_KIT_REQUIRE_BROWSER") == "1":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return path


SERVER = r"""
import json, math, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG = sys.argv[1]
lock = threading.Lock()
seen = set()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, obj, headers=()):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        content = " ".join(m.get("content", "") for m in body.get("messages", []))
        with lock:
            with open(LOG, "a") as f:
                f.write(json.dumps({"path": self.path, "auth": self.headers.get("Authorization"), "body": body}) + "\n")
            first = content not in seen
            seen.add(content)
        if self.path != "/v1/chat/completions":
            return self.reply(404, {"error": {"message": "no such route"}})
        if "FAIL-ONCE" in content and first:
            return self.reply(500, {"error": {"message": "internal error"}})
        if "RATE-ONCE" in content and first:
            return self.reply(429, {"error": {"message": "slow down"}}, [("Retry-After", "0")])
        if "BAD-REQUEST" in content:
            return self.reply(400, {"error": {"message": "this request is bad"}})
        if "NO-LOGPROBS" in content and body.get("logprobs"):
            return self.reply(400, {"error": {"message": "logprobs are not supported by this model"}})
        answer = "[EXPLANATION]: words from a server" if "[EXPLANATION]" in content else "Yes"
        choice = {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
        if body.get("logprobs"):
            top = [{"token": "Yes", "logprob": math.log(0.7)}, {"token": " yes", "logprob": math.log(0.1)},
                   {"token": "No", "logprob": math.log(0.2)}]
            choice["logprobs"] = {"content": [{"token": "Yes", "logprob": math.log(0.7), "top_logprobs": top}]}
        self.reply(200, {"id": "x", "object": "chat.completion", "choices": [choice],
                         "usage": {"prompt_tokens": 11, "completion_tokens": 1, "total_tokens": 12}})


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """An OpenAI-compatible chat-completions server on 127.0.0.1 in a subprocess, stopped by its PID: (base_url, log
    file of every request). It answers "Yes" (log-probs: Yes 0.7, " yes" 0.1, No 0.2; 11 prompt tokens) or, to an
    explainer prompt, "[EXPLANATION]: words from a server"; 500 on the first request containing FAIL-ONCE, 429 on
    the first with RATE-ONCE, 400 for BAD-REQUEST, and 400 to logprobs for NO-LOGPROBS."""
    folder = tmp_path_factory.mktemp("server")
    script, log = folder / "server.py", folder / "requests.jsonl"
    script.write_text(SERVER)
    proc = subprocess.Popen([sys.executable, str(script), str(log)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}/v1", log
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        proc.stdout.close()
