"""The autointerp LLM clients: the OpenAI-compatible client against a real HTTP server in a subprocess (API key,
retries, log-probabilities, usage, response cache, failures), and the local transformers backend on SmolLM2."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch

from sae_kit.autointerp.clients import LocalClient, OpenAIClient, ResponseCache, make_client
from sae_kit.autointerp.types import AutoInterpError, ChatClient, Completion, Request


@pytest.fixture(scope="module")
def server(chat_server):
    """conftest's chat-completions server: (base_url, log file)."""
    return chat_server


def logged(log, marker):
    """The logged requests whose messages contain `marker`."""
    if not log.exists():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [r for r in rows if any(marker in m["content"] for m in r["body"]["messages"])]


def ask(marker, answers=("Yes", "No")):
    return Request(
        messages=(("system", "You judge."), ("user", f"{marker}: does it fire?")), max_tokens=3, answer_tokens=answers
    )


def client(base_url, **kw):
    kw.setdefault("api_key_env", None)
    kw.setdefault("backoff_s", 0.01)
    return OpenAIClient(base_url, "test-model", **kw)


def test_api_key_logprobs_usage(server, monkeypatch):
    base_url, log = server
    monkeypatch.setenv("MY_KEY", "sekret")
    c = client(base_url, api_key_env="MY_KEY")
    assert isinstance(c, ChatClient) and c.model_name == "test-model"
    plain = Request(messages=(("user", "KEY-PLAIN hello"),), max_tokens=5, temperature=0.5)
    out = c.complete([ask("KEY-1"), plain])
    assert [o.text for o in out] == ["Yes", "Yes"] and all(o.error is None and not o.cached for o in out)
    assert out[0].answer_probs == pytest.approx({"Yes": 0.8, "No": 0.2})
    assert out[1].answer_probs is None
    assert (out[0].prompt_tokens, out[0].completion_tokens) == (11, 1)
    assert c.usage == {"prompt_tokens": 22, "completion_tokens": 2, "requests": 2, "cached": 0}

    (sent,) = logged(log, "KEY-1")
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer sekret"
    body = sent["body"]
    assert body["model"] == "test-model" and body["max_tokens"] == 3 and body["temperature"] == 0.0
    assert body["messages"] == [
        {"role": "system", "content": "You judge."},
        {"role": "user", "content": "KEY-1: does it fire?"},
    ]
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    (sent,) = logged(log, "KEY-PLAIN")
    assert "logprobs" not in sent["body"] and sent["body"]["temperature"] == 0.5  # no answers asked: no logprobs


def test_no_key_header_and_order_under_concurrency(server):
    base_url, log = server
    c = client(base_url, concurrency=4)
    out = c.complete([ask(f"ORDER-{i}", answers=("No",)) for i in range(10)])
    assert [o.answer_probs for o in out] == [pytest.approx({"No": 0.2})] * 10
    assert all(r["auth"] is None for i in range(10) for r in logged(log, f"ORDER-{i}"))
    assert c.usage["requests"] == 10


def test_retries_500_and_429(server):
    base_url, log = server
    c = client(base_url, max_retries=2)
    failing, limited = c.complete([ask("FAIL-ONCE-1"), ask("RATE-ONCE-1")])
    assert (
        failing.error is None
        and failing.text == "Yes"
        and failing.answer_probs == pytest.approx({"Yes": 0.8, "No": 0.2})
    )
    assert limited.error is None and limited.text == "Yes"
    assert len(logged(log, "FAIL-ONCE-1")) == 2 and len(logged(log, "RATE-ONCE-1")) == 2
    assert c.usage == {
        "prompt_tokens": 22,
        "completion_tokens": 2,
        "requests": 2,
        "cached": 0,
    }  # a retry is one request


def test_exhausted_retries_give_an_error(server):
    base_url, log = server
    (out,) = client(base_url, max_retries=0).complete([ask("FAIL-ONCE-2")])
    assert out.text == "" and out.error == "HTTP 500: internal error"
    assert len(logged(log, "FAIL-ONCE-2")) == 1


def test_response_cache(server, tmp_path):
    base_url, log = server
    cache = ResponseCache(tmp_path / "responses")
    first = client(base_url, cache=cache).complete([ask("CACHE-1")])[0]
    assert not first.cached and len(logged(log, "CACHE-1")) == 1
    files = list((tmp_path / "responses").glob("*/*.json"))
    assert len(files) == 1 and files[0].parent.name == files[0].stem[:2] and len(files[0].stem) == 64
    assert json.loads(files[0].read_text())["completion"]["text"] == "Yes"  # plain JSON

    again = client(base_url, cache=ResponseCache(tmp_path / "responses"))
    (second,) = again.complete([ask("CACHE-1")])
    assert second.cached and second.text == "Yes" and second.answer_probs == pytest.approx(first.answer_probs)
    assert len(logged(log, "CACHE-1")) == 1  # no second request
    assert again.usage == {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "cached": 1}

    # any field of the request, and the model, is part of the key
    other = Request(messages=ask("CACHE-1").messages, max_tokens=4, answer_tokens=("Yes", "No"))
    assert not again.complete([other])[0].cached
    assert not OpenAIClient(base_url, "other-model", api_key_env=None, cache=cache).complete([ask("CACHE-1")])[0].cached
    assert len(logged(log, "CACHE-1")) == 3


def test_failed_completions_are_not_cached(server, tmp_path):
    base_url, log = server
    cache = ResponseCache(tmp_path / "responses")
    (out,) = client(base_url, cache=cache).complete([ask("BAD-REQUEST-1")])
    assert out.error == "HTTP 400: this request is bad" and out.text == "" and not out.cached  # not raised
    assert len(logged(log, "BAD-REQUEST-1")) == 1  # a 400 is not retried
    assert not (tmp_path / "responses").exists() or not list((tmp_path / "responses").rglob("*.json"))
    cache.put({"k": 1}, Completion("", error="boom"))
    assert cache.get({"k": 1}) is None
    cache.put({"k": 2}, Completion("hi", answer_probs={"Yes": 0.5}, prompt_tokens=3, completion_tokens=1))
    hit = cache.get({"k": 2})
    assert hit == Completion("hi", answer_probs={"Yes": 0.5}, prompt_tokens=3, completion_tokens=1, cached=True)


def test_logprobs_rejected_are_dropped(server):
    base_url, log = server
    c = client(base_url)
    (out,) = c.complete([ask("NO-LOGPROBS-1")])
    assert out.error is None and out.text == "Yes" and out.answer_probs is None
    first, second = logged(log, "NO-LOGPROBS-1")
    assert first["body"]["logprobs"] is True and "logprobs" not in second["body"]
    c.complete([ask("NO-LOGPROBS-2")])  # remembered: asked without logprobs straight away
    (only,) = logged(log, "NO-LOGPROBS-2")
    assert "logprobs" not in only["body"]


def test_missing_api_key(monkeypatch):
    monkeypatch.delenv("SAE_KIT_NO_SUCH_KEY", raising=False)
    with pytest.raises(AutoInterpError) as err:
        OpenAIClient("http://127.0.0.1:1/v1", "m", api_key_env="SAE_KIT_NO_SUCH_KEY")
    message = str(err.value)
    assert "\n" not in message and "SAE_KIT_NO_SUCH_KEY" in message and "--api-key-env" in message
    monkeypatch.setenv("SAE_KIT_NO_SUCH_KEY", "")
    with pytest.raises(AutoInterpError, match="SAE_KIT_NO_SUCH_KEY is not set"):
        OpenAIClient("http://127.0.0.1:1/v1", "m", api_key_env="SAE_KIT_NO_SUCH_KEY")


def test_unreachable_endpoint():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    base_url = f"http://127.0.0.1:{port}/v1"
    start = time.monotonic()
    with pytest.raises(AutoInterpError) as err:
        client(base_url, max_retries=1, backoff_s=0.01, concurrency=2).complete([ask("UNREACHABLE")] * 3)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "\n" not in message and base_url in message and "ConnectError" in message


def test_make_client(tmp_path):
    with pytest.raises(AutoInterpError, match="local, openai"):
        make_client("anthropic")
    with pytest.raises(AutoInterpError, match="--model"):
        make_client("openai", base_url="http://127.0.0.1:1/v1", api_key_env=None)
    with pytest.raises(AutoInterpError, match="--base-url"):
        make_client("openai", model="m", api_key_env=None)
    c = make_client("openai", base_url="http://127.0.0.1:1/v1/", model="m", api_key_env="", cache_dir=tmp_path)
    assert isinstance(c, OpenAIClient) and c.base_url == "http://127.0.0.1:1/v1" and c.cache.folder == tmp_path
    with pytest.raises(AutoInterpError, match="no config.json"):
        make_client("local", model=str(tmp_path))
    with pytest.raises(AutoInterpError, match="does not exist"):
        make_client("local", model=str(tmp_path / "missing"))


@pytest.mark.slow
def test_local_backend_batched(tmp_path):
    c = LocalClient(batch_size=8, cache=ResponseCache(tmp_path / "responses"))
    assert isinstance(c, ChatClient) and c.model_name == "SmolLM2-135M-Instruct"
    yes_no = Request(
        messages=(("user", "Answer Yes or No: is Paris in France?"),), max_tokens=4, answer_tokens=("Yes", "No")
    )
    free = Request(
        messages=(("user", "Write one sentence about the sea, describing its colour, its smell and its sound."),),
        max_tokens=12,
    )
    out = c.complete([yes_no, free])
    assert all(o.error is None and o.text.strip() and not o.cached for o in out)
    assert out[1].answer_probs is None and 1 <= out[1].completion_tokens <= 12 and out[0].completion_tokens <= 4
    probs = out[0].answer_probs
    assert set(probs) == {"Yes", "No"} and all(0 <= p <= 1 for p in probs.values())
    assert probs["Yes"] + probs["No"] <= 1 + 1e-6

    # the padded batch gives what one unbatched forward of the templated prompt gives
    tok = c.tokenizer
    prompts = []
    for request in (yes_no, free):
        text = tok.apply_chat_template(
            [{"role": r, "content": m} for r, m in request.messages], tokenize=False, add_generation_prompt=True
        )
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    lengths = [len(ids) for ids in prompts]
    assert lengths[0] < lengths[1]  # the yes/no prompt is the left-padded one
    assert [o.prompt_tokens for o in out] == lengths
    with torch.no_grad():
        p = c.model(torch.tensor([prompts[0]])).logits[0, -1].float().softmax(-1)
    for answer in ("Yes", "No"):
        variants = {answer, answer.lower(), answer.capitalize()}
        first = {tok(s, add_special_tokens=False)["input_ids"][0] for v in variants for s in (v, " " + v)}
        assert probs[answer] == pytest.approx(float(p[sorted(first)].sum()), abs=1e-4)
    assert c.usage == {
        "prompt_tokens": sum(lengths),
        "completion_tokens": sum(o.completion_tokens for o in out),
        "requests": 2,
        "cached": 0,
    }

    again = c.complete([free, yes_no])  # the cache answers, in the new order
    assert all(o.cached for o in again) and [o.text for o in again] == [out[1].text, out[0].text]
    assert c.usage["requests"] == 2 and c.usage["cached"] == 2
