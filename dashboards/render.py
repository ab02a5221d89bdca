"""HTML for token sequences highlighted by activation: readable text with whitespace and newlines made visible."""

from __future__ import annotations

import html

POSITIVE = (255, 128, 0)
"""Highlight colour of positive activations (orange)."""
NEGATIVE = (40, 110, 255)
"""Highlight colour of negative activations (blue; signed rules only)."""

STYLE = (
    "<style>"
    ".sk-ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:0.85rem;line-height:1.9;white-space:pre-wrap;"
    "word-break:break-word;padding:4px 8px;margin:2px 0;border-left:3px solid #ddd}"
    ".sk-tok{border-radius:3px;padding:1px 0}"
    ".sk-peak{outline:2px solid #222;font-weight:600}"
    ".sk-ws{color:rgba(0,0,0,0.4)}"  # readable on white and on the strongest highlight
    ".sk-act{color:#888;font-size:0.75rem;margin-right:8px}"
    "</style>"
)
_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def visible(text: str) -> str:
    """Escaped HTML of a token's text, with spaces, tabs and newlines shown (a newline also breaks the line)."""
    out = []
    for ch in text:
        if ch == " ":
            out.append('<span class="sk-ws">·</span>')
        elif ch in _VISIBLE:
            out.append(f'<span class="sk-ws">{_VISIBLE[ch]}</span>' + ("\n" if ch == "\n" else ""))
        else:
            out.append(html.escape(ch))
    return "".join(out) or '<span class="sk-ws">∅</span>'


def plain(text: str) -> str:
    """A token's text for tables: spaces, tabs and newlines shown as ·, ⇥ and ↵."""
    return "".join("·" if ch == " " else _VISIBLE.get(ch, ch) for ch in text) or "∅"


def colour(act: float, scale: float) -> str:
    """Background of a token with activation `act`, on a scale where `scale` is full strength."""
    if act == 0 or scale <= 0:
        return "transparent"
    r, g, b = POSITIVE if act > 0 else NEGATIVE
    return f"rgba({r},{g},{b},{min(1.0, abs(act) / scale) * 0.85 + 0.05:.3f})"


def tokens_html(
    tokens: list[str], acts: list[float], scale: float, peak: int | None = None, label: str | None = None
) -> str:
    """One context: each token highlighted by its activation (tooltip: the value), the peak token outlined."""
    spans = []
    for i, (tok, act) in enumerate(zip(tokens, acts)):
        cls = "sk-tok sk-peak" if i == peak else "sk-tok"
        spans.append(
            f'<span class="{cls}" style="background:{colour(act, scale)}" title="{act:.3f}">{visible(tok)}</span>'
        )
    head = f'<span class="sk-act">{html.escape(label)}</span>' if label else ""
    return f'<div class="sk-ctx">{head}{"".join(spans)}</div>'


def contexts_html(contexts: list[dict], vocab: list[str], scale: float) -> str:
    """A list of index contexts (CONTEXT structs) as highlighted blocks, each labelled with its peak activation."""
    blocks = [
        tokens_html([vocab[t] for t in c["tokens"]], c["acts"], scale, c["peak"], f"{c['act']:+.2f}") for c in contexts
    ]
    return STYLE + "".join(blocks)
