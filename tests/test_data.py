"""Corpora and packing: built-in corpora offline, local files, document boundaries, resume, held-out split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sae_kit.data import (
    CorpusError,
    HarvestError,
    PackConfig,
    documents,
    fortune_documents,
    fortune_file,
    is_heldout,
    load_corpus,
    pack,
    pydoc_documents,
)


def test_fortunes_are_split_on_separators_and_exclude_offensive_file():
    docs = fortune_documents()
    assert len(docs) > 5000
    assert fortune_file().name == "fortunes"
    assert not any(line.strip() == "%" for d in docs[:500] for line in d.splitlines())
    raw = fortune_file().read_text(errors="replace")
    assert docs[10] in raw and docs[-1] in raw
    offensive = fortune_file().with_name("fortunes-o").read_text(errors="replace").split("\n%\n")[5].strip()
    assert offensive not in set(docs)


def test_builtin_corpora(tmp_path):
    assert len(load_corpus("pydoc")) == len(pydoc_documents()) > 50
    assert len(load_corpus("default")) == len(fortune_documents()) + len(pydoc_documents())


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_files(tmp_path, kind):
    texts = ["The first document.", "A second one, longer than the first.", "Third."]
    path = tmp_path / f"c.{kind}"
    if kind == "txt":
        path.write_text("\n\n".join(texts) + "\n")
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), path)
    ds = load_corpus(str(path), text_field="body" if kind == "jsonl" else "text")
    assert [t.strip() for t in ds["text"]] == texts


def test_bad_corpora(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(Exception, match="empty|no 'text'"):
        load_corpus(str(tmp_path / "empty.jsonl"))
    (tmp_path / "x.jsonl").write_text('{"body": "hi"}\n')
    with pytest.raises(CorpusError, match="text-field"):
        load_corpus(str(tmp_path / "x.jsonl"))
    (tmp_path / "blank.txt").write_text("  \n\n \t\n\n")
    with pytest.raises(CorpusError, match="empty .its documents are blank"):
        load_corpus(str(tmp_path / "blank.txt"))
    (tmp_path / "blank.jsonl").write_text('{"text": " "}\n{"text": null}\n')
    with pytest.raises(CorpusError, match="blank"):
        load_corpus(str(tmp_path / "blank.jsonl"))


def test_pack_refuses_settings_it_cannot_serve(tokenizer):
    docs = [(0, "Some text that is long enough to fill a few tokens.")]
    with pytest.raises(HarvestError, match="--context-size must be at least 2.*got 1"):
        next(pack(docs, tokenizer, PackConfig(context_size=1)))
    with pytest.raises(HarvestError, match="--lm-batch-size must be at least 1"):
        next(pack(docs, tokenizer, PackConfig(context_size=8), rows_per_batch=0))


def test_heldout_split_is_deterministic_and_disjoint():
    ds = load_corpus("pydoc")
    train = [i for i, _ in documents(ds, "train", 0.2)]
    held = [i for i, _ in documents(ds, "heldout", 0.2)]
    assert not set(train) & set(held) and len(train) + len(held) == len(ds)
    assert held == [i for i, _ in documents(ds, "heldout", 0.2)]
    frac = is_heldout(np.arange(100_000), 0.05).mean()
    assert 0.045 < frac < 0.055


def test_concat_packing_never_joins_documents_without_separator(tokenizer):
    docs = [(i, t) for i, t in enumerate(["alpha beta gamma " * 7, "delta epsilon", "zeta eta theta iota " * 5])]
    rows = list(pack(docs, tokenizer, PackConfig(context_size=16), rows_per_batch=100))[0]
    bos = tokenizer.bos_token_id
    assert (rows.tokens[:, 0] == bos).all() and (rows.doc[:, 0] == -1).all()
    flat_doc, flat_tok = rows.doc[:, 1:].flatten().tolist(), rows.tokens[:, 1:].flatten().tolist()
    for a, b in zip(flat_doc, flat_doc[1:]):
        if a != b and a >= 0 and b >= 0:
            pytest.fail("two documents are adjacent without a separator")
    seps = [t for d, t in zip(flat_doc, flat_tok) if d == -1]
    assert seps and set(seps) == {bos}
    # the tokens of each document are exactly its own tokenisation, in order
    for i, text in docs:
        got = [t for d, t in zip(flat_doc, flat_tok) if d == i]
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert got == want[: len(got)] and len(got) >= len(want) - 15


def test_doc_packing_pads_and_resume_matches(tokenizer):
    docs = [(i, f"document number {i} " * (i + 1)) for i in range(6)]
    cfg = PackConfig(context_size=12, packing="doc")
    full = list(pack(docs, tokenizer, cfg, rows_per_batch=4))
    rows = [r for c in full for r in c.row.tolist()]
    assert rows == list(range(len(rows)))
    for c in full:  # one document per row, padding marked
        for d, p in zip(c.doc, c.pad):
            assert len(set(d[~p][1:].tolist())) == 1
    resumed = list(pack(docs, tokenizer, cfg, rows_per_batch=4, start_row=5))
    tail = [c.tokens for c in full]
    import torch

    assert torch.equal(torch.cat([c.tokens for c in resumed]), torch.cat(tail)[5:])
