"""The client boundary: one chat-completion request, its answer, and the interface every backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from sae_kit.errors import SaeKitError


class AutoInterpError(SaeKitError):
    """Autointerp cannot run as asked (no index, no explanations, an unreachable endpoint, a missing API key)."""


@dataclass(frozen=True)
class Request:
    """One chat completion to ask for."""

    messages: tuple[tuple[str, str], ...]
    """(role, content) pairs: "system", "user", "assistant"."""
    max_tokens: int = 128
    """Most completion tokens."""
    answer_tokens: tuple[str, ...] = ()
    """Answers whose probability as the first completion token is wanted (e.g. ("Yes", "No")); () for none."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy)."""


@dataclass
class Completion:
    """What a backend answered."""

    text: str
    """The completion text."""
    answer_probs: dict[str, float] | None = None
    """Probability of each of the request's answer_tokens as the first completion token (variants such as " yes"
    summed in), None when the backend gave no log-probabilities."""
    prompt_tokens: int = 0
    """Prompt tokens the backend counted (0 when unknown)."""
    completion_tokens: int = 0
    """Completion tokens the backend counted (0 when unknown)."""
    cached: bool = False
    """Read from the on-disk response cache (no request was made)."""
    error: str | None = None
    """Why no answer came back after every retry (text is then ""), None on success."""
    extra: dict = field(default_factory=dict)


@runtime_checkable
class ChatClient(Protocol):
    """A chat-completion backend. `complete` answers every request, in order (bounded concurrency or batching inside)."""

    model_name: str
    """The model's identity as recorded in the outputs (e.g. "SmolLM2-135M-Instruct", "gpt-4o-mini")."""

    def complete(self, requests: Sequence[Request]) -> list[Completion]:
        """One Completion per request, in order; a request that failed after retries has `error` set."""
        ...
