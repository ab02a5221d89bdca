"""The prompts of the explainer and the judges, and how their answers are parsed. Bump PROMPT_VERSION whenever a
prompt's wording changes: it is recorded with every explanation and score, and a cached response is keyed by the
prompt's full text, so a new wording never reuses an old answer.

The shapes follow the paper's pipeline (Paulo et al. 2024, EleutherAI delphi): activating tokens are delimited by
<< >>, optionally followed by their activation on a 0–9 scale (floor(10·a/max), capped at 9); the explanation is
read from a fixed "[EXPLANATION]:" line; detection and fuzzing judges see one excerpt at a time and answer Yes or No
(one excerpt per request, so the probability of the first answer token scores that excerpt alone).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PROMPT_VERSION = "sae-kit-autointerp-1"
OPEN, CLOSE = "<<", ">>"

EXPLAINER_SYSTEM = (
    "You are a meticulous AI researcher studying one feature of a language model. You will see text excerpts where "
    "the feature fires. The tokens where it fires are marked <<like this>>. Work out what the marked tokens have in "
    "common, and what in their context makes the feature fire. Be concise: a short phrase, not a sentence about the "
    "examples. Reply with a single line of the form\n[EXPLANATION]: <your explanation>"
)
DEMOS = (
    (
        "Example 1: I'll see you on <<Monday>> morning\n"
        "Example 2: the shop is closed every <<Sunday>> and\n"
        "Example 3: we met last <<Friday>> at the station\n",
        "[EXPLANATION]: names of days of the week",
    ),
    (
        "Example 1: the price went up by <<5>> percent\nExample 2: about <<20>> people came to\n",
        "[EXPLANATION]: numbers counting an amount",
    ),
)
"""Worked demonstrations shown before the feature's examples (two, so a small model sees that answers differ)."""
REMINDER = "Reply with one line that starts with [EXPLANATION]:"
_SPECIAL = re.compile(r"<\|[^|<>]*\|>|</?s>")
"""Special tokens (document separators such as <|im_start|>): shown as line breaks, never inside a chat prompt."""

DETECTION_SYSTEM = (
    "You check explanations of a language-model feature. Given the explanation of what the feature responds to and a "
    "text excerpt, say whether the feature fires anywhere in the excerpt. Answer Yes or No, nothing else."
)
FUZZ_SYSTEM = (
    "You check explanations of a language-model feature. In the excerpt, some tokens are marked <<like this>>. Say "
    "whether the marked tokens are exactly where a feature with this explanation would fire. Answer Yes or No, "
    "nothing else."
)
INTERVENTION_SYSTEM = (
    "You check explanations of a language-model feature. The same prompt was continued twice by the model: once as "
    "normal, and once with the feature amplified inside the model. Given the explanation, say which continuation was "
    "written with the feature amplified. Answer A or B, nothing else."
)
YES_NO = ("Yes", "No")
A_B = ("A", "B")

_EXPLANATION = re.compile(r"\[?\s*explanation\s*\]?\s*[:：]\s*(.+)", re.IGNORECASE)


def fingerprint() -> str:
    """PROMPT_VERSION plus a hash of every prompt text, so an edited wording is a new identity even unversioned."""
    import hashlib

    texts = [EXPLAINER_SYSTEM, REMINDER, DETECTION_SYSTEM, FUZZ_SYSTEM, INTERVENTION_SYSTEM, repr(DEMOS)]
    texts += [repr(f("E", "T")) for f in (detection_messages, fuzz_messages)]
    texts.append(repr(intervention_messages("E", "P", "A", "B")))
    return f"{PROMPT_VERSION}:{hashlib.sha256(chr(0).join(texts).encode()).hexdigest()[:12]}"


def highlight(tokens: Sequence[str], marked: Sequence[bool]) -> str:
    """The excerpt with each run of consecutive marked tokens wrapped in << >>."""
    out, inside = [], False
    for tok, m in zip((_SPECIAL.sub("\n", t) for t in tokens), marked):
        if m and not inside:
            out.append(OPEN)
        if not m and inside:
            out.append(CLOSE)
        inside = bool(m)
        out.append(tok)
    if inside:
        out.append(CLOSE)
    return "".join(out).replace("\n", "\\n")


def levels(tokens: Sequence[str], acts: Sequence[float], scale: float) -> str:
    """The marked tokens with their activation on the 0–9 scale: "<<tok>> 7, <<tok>> 3"."""
    return ", ".join(
        f"{OPEN}{_SPECIAL.sub('', t).strip() or repr(t)}{CLOSE} {min(9, int(10 * abs(a) / scale))}"
        for t, a in zip(tokens, acts)
        if a != 0 and scale > 0
    )


def explainer_messages(examples: Sequence[str], activation_lines: Sequence[str] | None) -> tuple[tuple[str, str], ...]:
    """The explainer's chat: the instructions, the worked demonstrations, then the feature's examples."""
    body = []
    for i, text in enumerate(examples):
        body.append(f"Example {i + 1}: {text}")
        if activation_lines is not None and activation_lines[i]:
            body.append(f"Activations: {activation_lines[i]}")
    demos = tuple(turn for user, answer in DEMOS for turn in (("user", user), ("assistant", answer)))
    return (("system", EXPLAINER_SYSTEM), *demos, ("user", "\n".join(body) + "\n" + REMINDER))


def parse_explanation(answer: str) -> str | None:
    """The explanation from the last "[EXPLANATION]: ..." line of an answer, or None when there is none (or it is
    empty)."""
    found = [m.group(1).strip().strip('"').strip() for m in _EXPLANATION.finditer(answer)]
    found = [f for f in found if f]
    return found[-1].splitlines()[0].strip() if found else None


def detection_messages(explanation: str, text: str) -> tuple[tuple[str, str], ...]:
    return (
        ("system", DETECTION_SYSTEM),
        ("user", f"Explanation: {explanation}\nText: {text}\nDoes the feature fire in this text? Answer Yes or No."),
    )


def fuzz_messages(explanation: str, text: str) -> tuple[tuple[str, str], ...]:
    return (
        ("system", FUZZ_SYSTEM),
        (
            "user",
            f"Explanation: {explanation}\nText: {text}\nAre the marked tokens where this feature fires? Answer Yes or No.",
        ),
    )


def intervention_messages(explanation: str, prompt: str, first: str, second: str) -> tuple[tuple[str, str], ...]:
    return (
        ("system", INTERVENTION_SYSTEM),
        (
            "user",
            f"Explanation: {explanation}\nPrompt: {prompt}\nContinuation A: {first}\nContinuation B: {second}\n"
            "Which continuation was written with the feature amplified? Answer A or B.",
        ),
    )


def parse_choice(answer: str, choices: tuple[str, str]) -> int:
    """1 when the answer starts with choices[0] (Yes / A), 0 for choices[1], -1 when it is neither."""
    word = re.match(r"\W*(\w+)", answer)
    if word is None:
        return -1
    w = word.group(1).lower()
    return 1 if w == choices[0].lower() else 0 if w == choices[1].lower() else -1


def positive_prob(probs: dict[str, float] | None, choices: tuple[str, str]) -> float:
    """P(choices[0]) / (P(choices[0]) + P(choices[1])) from a backend's answer probabilities; NaN without them."""
    if not probs:
        return float("nan")
    a, b = probs.get(choices[0], 0.0), probs.get(choices[1], 0.0)
    return a / (a + b) if a + b > 0 else float("nan")
