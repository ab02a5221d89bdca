"""The LLM clients of autointerp: an OpenAI-compatible HTTP backend and a local transformers backend.

Both implement `types.ChatClient` (`model_name`, `complete(requests) -> completions in order`), read and fill an
on-disk `ResponseCache` first (a rerun or resumed run never asks twice), and keep running token totals in `usage`.

- `OpenAIClient` speaks `POST {base_url}/chat/completions` to OpenAI or to any compatible server (vLLM, llama.cpp's
  server, SGLang, ...), `concurrency` requests at a time. 429s, 5xx, timeouts and connection errors are retried with
  exponential backoff and jitter (a Retry-After header is honoured, capped); an endpoint that cannot be reached at all
  raises `AutoInterpError`, while any other failure comes back as a `Completion` with `error` set. Answer
  probabilities (e.g. P("Yes")) are read from the first completion token's `top_logprobs`; a server that refuses
  log-probabilities is asked again without them (answer_probs is then None).
- `LocalClient` runs a Hugging Face causal LM from a local directory with transformers, batching prompts of similar
  length with left padding and decoding greedily (temperature is ignored: the local backend is always greedy). Answer
  probabilities come from the softmax over the vocabulary at the first generated position. By default it loads the
  embedded SmolLM2-135M-Instruct, so that the whole pipeline runs offline and in CI. That model is far too small to
  write good explanations or to judge them well: it is the plumbing default, not a claim about quality; use a real
  explainer model (a large local model, or an OpenAI-compatible endpoint) for results worth reading.

`make_client` builds either one from the CLI's flags.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import torch

from sae_kit.atomic import write_json
from sae_kit.autointerp.types import AutoInterpError, Completion, Request

log = logging.getLogger(__name__)

BACKENDS = ("local", "openai")
RETRY_AFTER_CAP_S = 60.0
"""The longest wait a server's Retry-After header (or the exponential backoff) can impose before a retry."""
CACHE_SCHEMA = "sae-kit/autointerp-response"


# --------------------------------------------------------------------------------------------------------------------
# Response cache


def request_key(identity: Any, request: Request, **more: Any) -> dict[str, Any]:
    """The cache key object of `request` sent to the model `identity` (plus backend settings that change the answer)."""
    return {
        "model": identity,
        "messages": [[role, content] for role, content in request.messages],
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "answer_tokens": list(request.answer_tokens),
        **more,
    }


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class ResponseCache:
    """Completions on disk, one JSON file per response at `folder/<2 hex>/<sha256>.json`, keyed by the SHA-256 of the
    canonical JSON of a key object (see `request_key`). Files are written atomically; failed completions are never
    stored; only JSON is ever read (no pickle). Safe to share between threads and processes."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    @staticmethod
    def digest(key_obj: Any) -> str:
        """The SHA-256 (hex) that names the entry of `key_obj`."""
        return hashlib.sha256(_canonical(key_obj).encode()).hexdigest()

    def path(self, key_obj: Any) -> Path:
        h = self.digest(key_obj)
        return self.folder / h[:2] / f"{h}.json"

    def get(self, key_obj: Any) -> Completion | None:
        """The stored completion of `key_obj` (with cached=True), or None (also for an unreadable or foreign file)."""
        path = self.path(key_obj)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable response cache entry %s (%s)", path, err.__class__.__name__)
            return None
        if not isinstance(entry, dict) or entry.get("key") != json.loads(_canonical(key_obj)):
            return None
        c = entry.get("completion")
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            return None
        probs = c.get("answer_probs")
        return Completion(
            text=c["text"],
            answer_probs={str(k): float(v) for k, v in probs.items()} if isinstance(probs, dict) else None,
            prompt_tokens=int(c.get("prompt_tokens") or 0),
            completion_tokens=int(c.get("completion_tokens") or 0),
            cached=True,
            error=None,
            extra=dict(c.get("extra") or {}),
        )

    def put(self, key_obj: Any, completion: Completion) -> None:
        """Store `completion` under `key_obj`; a failed completion (error set) is not stored."""
        if completion.error is not None:
            return
        c = asdict(completion)
        c.pop("cached", None)
        c.pop("error", None)
        write_json(self.path(key_obj), {"schema": CACHE_SCHEMA, "key": key_obj, "completion": c})


class _Usage:
    """Running totals shared by the worker threads of a client."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.totals = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "cached": 0}

    def hit(self) -> None:
        with self.lock:
            self.totals["cached"] += 1

    def sent(self, completion: Completion) -> None:
        with self.lock:
            self.totals["requests"] += 1
            self.totals["prompt_tokens"] += completion.prompt_tokens
            self.totals["completion_tokens"] += completion.completion_tokens


def _from_cache(
    cache: ResponseCache | None, key, usage: _Usage, requests: Sequence[Request]
) -> tuple[list[Completion | None], list[int]]:
    """(the cached completion of each request, else None; the indices of the requests not in the cache)."""
    results: list[Completion | None] = [None] * len(requests)
    misses = []
    for i, request in enumerate(requests):
        hit = cache.get(key(request)) if cache is not None else None
        if hit is not None:
            usage.hit()
            results[i] = hit
        else:
            misses.append(i)
    return results, misses


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP backend


class OpenAIClient:
    """A chat-completions client for OpenAI and compatible servers (see the module docstring).

    `usage` holds running totals: prompt_tokens and completion_tokens (as the server counted them), requests (cache
    misses asked, once each whatever the retries or the outcome) and cached (answers read from the cache, no tokens).
    `max_retries` is the number of retries after the first attempt.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        cache: ResponseCache | None = None,
        concurrency: int = 8,
        max_retries: int = 5,
        timeout_s: float = 60.0,
        backoff_s: float = 1.0,
        logprobs: bool = True,
        top_logprobs: int = 20,
    ):
        import httpx

        if not base_url or not base_url.startswith(("http://", "https://")):
            raise AutoInterpError(
                f"--base-url {base_url!r} is not an http(s) URL: pass one like http://127.0.0.1:8000/v1"
            )
        if not model:
            raise AutoInterpError("the openai backend needs --model (the model name the server serves)")
        self.base_url = base_url.rstrip("/")
        self.model_name = model
        self.cache = cache
        self.concurrency = max(1, int(concurrency))
        self.max_retries = max(0, int(max_retries))
        self.backoff_s = float(backoff_s)
        self.logprobs = bool(logprobs)
        self.top_logprobs = int(top_logprobs)
        self._logprobs_ok = True  # False once the server rejected logprobs
        self._usage = _Usage()
        self.headers = {"Content-Type": "application/json"}
        self.api_key_env = api_key_env
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise AutoInterpError(
                    f"environment variable {api_key_env} is not set; export it, or pass --api-key-env '' for a server without keys"
                )
            self.headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s), limits=limits)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def usage(self) -> dict[str, int]:
        with self._usage.lock:
            return dict(self._usage.totals)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._http.close()

    def __enter__(self) -> OpenAIClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _wants_logprobs(self, request: Request) -> bool:
        return bool(request.answer_tokens) and self.logprobs and self.top_logprobs > 0

    def key(self, request: Request) -> dict[str, Any]:
        """The cache key of `request` on this client."""
        return request_key(
            self.model_name,
            request,
            backend="openai",
            base_url=self.base_url,
            top_logprobs=self.top_logprobs if self._wants_logprobs(request) else 0,
        )

    def complete(self, requests: Sequence[Request]) -> list[Completion]:
        results, misses = _from_cache(self.cache, self.key, self._usage, requests)
        if misses:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="autointerp-openai")
            abort = threading.Event()
            futures = {i: self._pool.submit(self._answer, requests[i], abort) for i in misses}
            try:
                # the first failure (an unreachable endpoint) stops the others at once
                wait(futures.values(), return_when=FIRST_EXCEPTION)
                for i, future in futures.items():
                    results[i] = future.result()
            except BaseException:
                abort.set()
                for future in futures.values():
                    future.cancel()
                raise
        return [r for r in results if r is not None]

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                seconds = float(retry_after)
            except ValueError:
                try:  # an HTTP date
                    seconds = email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()
                except (TypeError, ValueError, IndexError):
                    seconds = math.nan
            if math.isfinite(seconds):
                return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)
        base = min(self.backoff_s * 2**attempt, RETRY_AFTER_CAP_S)
        return base * (1.0 + 0.25 * random.random())

    def _answer(self, request: Request, abort: threading.Event) -> Completion:
        completion = self._ask(request, abort)
        if not abort.is_set():
            self._usage.sent(completion)
            if self.cache is not None and completion.error is None:
                self.cache.put(self.key(request), completion)
        return completion

    def _ask(self, request: Request, abort: threading.Event) -> Completion:
        """Send one request with retries; raises AutoInterpError only when the endpoint cannot be reached."""
        import httpx

        url = f"{self.base_url}/chat/completions"
        use_logprobs = self._wants_logprobs(request) and self._logprobs_ok
        attempt = 0
        while True:
            if abort.is_set():
                return Completion("", error="aborted")
            body: dict[str, Any] = {
                "model": self.model_name,
                "messages": [{"role": role, "content": content} for role, content in request.messages],
                "max_tokens": request.max_tokens,
                "temperature": request.temperature,
            }
            if use_logprobs:
                body["logprobs"] = True
                body["top_logprobs"] = self.top_logprobs
            retry_after = None
            try:
                response = self._http.post(url, json=body, headers=self.headers)
            except httpx.UnsupportedProtocol as err:
                raise AutoInterpError(
                    f"cannot reach {self.base_url} ({err.__class__.__name__}); fix --base-url"
                ) from err
            except httpx.TransportError as err:  # timeouts, refused connections, DNS failures, dropped connections
                if attempt >= self.max_retries:
                    if isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout)):
                        raise AutoInterpError(
                            f"cannot reach {self.base_url} ({err.__class__.__name__}); start the server or fix --base-url"
                        ) from err
                    return Completion("", error=f"{err.__class__.__name__} after {attempt + 1} attempts")
                failure = err.__class__.__name__
            else:
                status = response.status_code
                if status == 429 or status >= 500:
                    if attempt >= self.max_retries:
                        return Completion("", error=f"HTTP {status}: {_error_text(response)}")
                    failure, retry_after = f"HTTP {status}", response.headers.get("retry-after")
                elif status >= 400:
                    text = _error_text(response)
                    if status == 400 and use_logprobs and "logprob" in response.text.lower():
                        log.warning("%s rejected logprobs (%s); asking without them from now on", self.base_url, text)
                        self._logprobs_ok = use_logprobs = False
                        continue
                    if status in (401, 403):  # every request would fail the same way: stop with one line
                        raise AutoInterpError(
                            f"{self.base_url} refused the API key (HTTP {status}: {text}); "
                            + (f"check ${self.api_key_env}" if self.api_key_env else "pass --api-key-env VAR")
                        )
                    if status == 404:
                        raise AutoInterpError(
                            f"{url} answered HTTP 404 ({text}); check --base-url (usually ends in /v1) and --model"
                        )
                    return Completion("", error=f"HTTP {status}: {text}")
                elif status != 200:
                    return Completion("", error=f"HTTP {status}: {_error_text(response)}")
                else:
                    return self._parse(request, response)
            delay = self._delay(attempt, retry_after)
            log.info("%s: %s, retry %d/%d in %.1f s", url, failure, attempt + 1, self.max_retries, delay)
            if abort.wait(delay):
                return Completion("", error="aborted")
            attempt += 1

    def _parse(self, request: Request, response: Any) -> Completion:
        try:
            data = response.json()
            choice = data["choices"][0]
            text = (choice.get("message") or {}).get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return Completion("", error=f"malformed response: {_one_line(response.text)}")
        usage = data.get("usage") or {}
        completion = Completion(
            text=text,
            answer_probs=_answer_probs(choice.get("logprobs"), request.answer_tokens)
            if request.answer_tokens
            else None,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )
        if choice.get("finish_reason"):
            completion.extra["finish_reason"] = choice["finish_reason"]
        return completion


def _error_text(response: Any) -> str:
    """A short one-line reason from an error response (the JSON error message when there is one)."""
    try:
        data = response.json()
        err = data.get("error", data) if isinstance(data, dict) else data
        message = err.get("message") if isinstance(err, dict) else err
        if isinstance(message, str) and message:
            return _one_line(message)
    except ValueError:
        pass
    return _one_line(response.text) or response.reason_phrase


def _answer_probs(logprobs: Any, answers: Sequence[str]) -> dict[str, float] | None:
    """P(answer) from the first token's top_logprobs (every listed token equal to the answer after strip/lower summed)."""
    try:
        first = logprobs["content"][0]
        candidates = list(first.get("top_logprobs") or [])
        if "token" in first and "logprob" in first:
            candidates.append({"token": first["token"], "logprob": first["logprob"]})
        probs: dict[str, float] = {}
        for c in candidates:
            probs.setdefault(str(c["token"]), math.exp(float(c["logprob"])))
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        return None
    if not probs:
        return None
    out = {}
    for answer in answers:
        want = answer.strip().lower()
        out[answer] = min(1.0, sum(p for token, p in probs.items() if token.strip().lower() == want))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Local transformers backend


class LocalClient:
    """A local Hugging Face causal LM served with transformers (see the module docstring). Greedy decoding only.

    `model_dir` None loads the embedded SmolLM2-135M-Instruct (`sae_kit.models.default_model_dir`); otherwise any local
    HF directory with a chat template. `usage` counts as `OpenAIClient.usage` does (completion tokens include the end
    token). A prompt longer than `max_context` tokens is refused with a Completion error, not truncated.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        device: str = "cpu",
        batch_size: int = 8,
        max_context: int = 2048,
        cache: ResponseCache | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from sae_kit.models import DEFAULT_MODEL, check_device, default_model_dir

        if model_dir is None:
            path, self.model_name = default_model_dir(), DEFAULT_MODEL
        else:
            path = Path(model_dir).expanduser()
            if not path.is_dir():
                raise AutoInterpError(
                    f"model directory {path} does not exist: pass a local Hugging Face model directory"
                )
            if not (path / "config.json").is_file():
                raise AutoInterpError(f"{path} is not a Hugging Face model directory (no config.json)")
            self.model_name = path.resolve().name
        self.model_dir = Path(path)
        config_hash = hashlib.sha256((self.model_dir / "config.json").read_bytes()).hexdigest()[:12]
        self.identity = f"{self.model_name}@{config_hash}"
        self.device = check_device(device)
        self.batch_size = max(1, int(batch_size))
        self.max_context = int(max_context)
        self.cache = cache
        self._usage = _Usage()
        self._lock = threading.Lock()

        transformers.utils.logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as err:
            raise AutoInterpError(
                f"cannot load {self.model_dir} as a causal LM ({err.__class__.__name__}: {_one_line(str(err), 120)})"
            ) from err
        if not getattr(self.tokenizer, "chat_template", None):
            raise AutoInterpError(f"{self.model_dir} has no chat template: use an instruction-tuned (chat) model")
        self.model.to(self.device)  # type: ignore[arg-type]
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

        eos = set()
        for value in (self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id):
            eos.update(value if isinstance(value, list) else [value] if value is not None else [])
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            eos.add(im_end)
        if not eos:
            raise AutoInterpError(f"{self.model_dir} defines no end-of-sequence token")
        self.eos_ids = sorted(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        # A bare generation config: the model's own defaults (sampling, repetition penalty...) never apply, so decoding
        # is plain greedy and the first step's scores are the model's logits.
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.eos_ids, pad_token_id=self.pad_id
        )
        self._variant_ids: dict[str, list[int]] = {}

    @property
    def usage(self) -> dict[str, int]:
        with self._usage.lock:
            return dict(self._usage.totals)

    def key(self, request: Request) -> dict[str, Any]:
        """The cache key of `request` on this client."""
        return request_key(self.identity, request, backend="local")

    def encode(self, request: Request) -> list[int]:
        """The prompt token ids of `request`: the chat template with the assistant turn opened."""
        messages = [{"role": role, "content": content} for role, content in request.messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def answer_ids(self, answer: str) -> list[int]:
        """The distinct first token ids of the spellings of `answer` whose probabilities are summed."""
        if answer not in self._variant_ids:
            ids = set()
            for form in (answer, answer.lower(), answer.capitalize()):
                for variant in (form, " " + form):
                    tokens = self.tokenizer(variant, add_special_tokens=False)["input_ids"]
                    if tokens:
                        ids.add(int(tokens[0]))
            self._variant_ids[answer] = sorted(ids)
        return self._variant_ids[answer]

    def complete(self, requests: Sequence[Request]) -> list[Completion]:
        with self._lock:
            results, misses = _from_cache(self.cache, self.key, self._usage, requests)
            todo = []
            for i in misses:
                request = requests[i]
                try:
                    ids = self.encode(request)
                except Exception as err:  # a template that refuses the messages (e.g. no system role)
                    results[i] = Completion("", error=f"chat template: {_one_line(str(err), 160)}")
                    continue
                if len(ids) > self.max_context:
                    results[i] = Completion(
                        "", error=f"prompt of {len(ids)} tokens exceeds max_context {self.max_context}"
                    )
                    continue
                todo.append((i, ids))
            todo.sort(key=lambda t: len(t[1]))
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                for (i, _), completion in zip(
                    chunk, self._generate([requests[i] for i, _ in chunk], [ids for _, ids in chunk])
                ):
                    self._usage.sent(completion)
                    if self.cache is not None:
                        self.cache.put(self.key(requests[i]), completion)
                    results[i] = completion
            return [r for r in results if r is not None]

    @torch.no_grad()
    def _generate(self, requests: list[Request], prompts: list[list[int]]) -> list[Completion]:
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention[row, width - len(prompt) :] = 1
        limits = [max(0, r.max_tokens) for r in requests]
        limit_t = torch.tensor([max(1, n) for n in limits], device=self.device)
        first: list[torch.Tensor] = []

        class FirstScores(LogitsProcessor):
            def __call__(self, ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
                if not first:
                    first.append(scores.detach().float().softmax(-1).cpu())
                return scores

        class RowLimit(StoppingCriteria):  # each row stops at its own max_tokens
            def __call__(self, ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
                return cast(torch.BoolTensor, (ids.shape[1] - width) >= limit_t)

        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            max_new_tokens=max(limit_t.tolist()),
            do_sample=False,
            num_beams=1,
            logits_processor=LogitsProcessorList([FirstScores()]),
            stopping_criteria=StoppingCriteriaList([RowLimit()]),
            return_dict_in_generate=True,
        )
        generated = out.sequences[:, width:].cpu().tolist()
        eos = set(self.eos_ids)
        completions = []
        for row, (request, prompt) in enumerate(zip(requests, prompts)):
            tokens = generated[row][: limits[row]]
            end = next((j for j, t in enumerate(tokens) if t in eos), None)
            kept = tokens if end is None else tokens[:end]
            probs = None
            if request.answer_tokens:
                p = first[0][row]
                probs = {a: float(p[self.answer_ids(a)].sum()) for a in request.answer_tokens}
            completions.append(
                Completion(
                    text=str(self.tokenizer.decode(kept, skip_special_tokens=True)),
                    answer_probs=probs,
                    prompt_tokens=len(prompt),
                    completion_tokens=len(tokens) if end is None else end + 1,
                    extra={"finish_reason": "length" if end is None else "stop"},
                )
            )
        return completions


# --------------------------------------------------------------------------------------------------------------------
# Factory


def make_client(
    backend: str,
    base_url: str | None = None,
    model: str | None = None,
    api_key_env: str | None = "OPENAI_API_KEY",
    cache_dir: str | os.PathLike | None = None,
    concurrency: int = 8,
    max_retries: int = 5,
    timeout_s: float = 60.0,
    logprobs: bool = True,
    device: str = "cpu",
    batch_size: int = 8,
    max_context: int = 2048,
) -> OpenAIClient | LocalClient:
    """A client for `backend` ("local": `model` is a local HF directory or None for the embedded SmolLM2;
    "openai": `base_url` and `model` are required), answering from `cache_dir`'s response cache first when given."""
    cache = ResponseCache(Path(cache_dir)) if cache_dir is not None else None
    if backend == "local":
        from sae_kit.models import is_default

        return LocalClient(
            None if is_default(model) else model,
            device=device,
            batch_size=batch_size,
            max_context=max_context,
            cache=cache,
        )
    if backend == "openai":
        if not base_url:
            raise AutoInterpError("the openai backend needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        if not model:
            raise AutoInterpError(
                "the openai backend needs --model (the model name the server serves, e.g. gpt-4o-mini)"
            )
        return OpenAIClient(
            base_url,
            model,
            api_key_env=api_key_env,
            cache=cache,
            concurrency=concurrency,
            max_retries=max_retries,
            timeout_s=timeout_s,
            logprobs=logprobs,
        )
    raise AutoInterpError(f"unknown autointerp backend {backend!r}: choose one of {', '.join(BACKENDS)}")
