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


# ------------------------------------------------------------------------------------------------ hub corpora, streamed
def _hub_like_dir(tmp_path):
    """A local dataset repo laid out as on the hub: two configurations (its README's `configs:`), train/test splits
    (3000 documents in large/test, 50 elsewhere)."""
    root = tmp_path / "org-data"
    for config in ("small", "large"):
        (root / config).mkdir(parents=True)
        for split in ("train", "test"):
            n = 3000 if (config, split) == ("large", "test") else 50
            rows = [{"content": f"{config} {split} document {i} " + "word " * 20} for i in range(n)]
            (root / config / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        + "".join(
            f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
            f"  - split: test\n    path: {c}/test.jsonl\n"
            for c in ("small", "large")
        )
        + "---\n"
    )
    return root


def test_local_files_stream(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(5)))
    ds = load_corpus(str(path), text_field="body", streaming=True)
    assert not hasattr(ds, "__len__") and [r["text"] for r in ds] == [f"document {i}" for i in range(5)]
    with pytest.raises(CorpusError, match="has no field 'nope'; its fields are"):
        load_corpus(str(path), text_field="nope", streaming=True)


def test_hub_datasets_stream_from_their_config_and_split(tmp_path, monkeypatch, tokenizer):
    """A hub id goes to `datasets.load_dataset(id, config, split=..., streaming=True)` and only the documents the
    harvest needs are read (the stream is a local one here: no network)."""
    import datasets

    from sae_kit.activations import HarvestConfig
    from sae_kit.data import pack

    real = datasets.load_dataset
    calls, read = [], []

    def fake(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        ds = real(str(_hub_like_dir(tmp_path)), config, split=split, streaming=streaming)
        return ds.map(lambda row: read.append(1) or row)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    cfg = HarvestConfig(corpus="org/data", corpus_config="large", corpus_split="test", text_field="content")
    cfg.check()
    from sae_kit.activations import open_corpus

    docs = documents(open_corpus(cfg), "train", cfg.holdout_fraction)
    first = next(pack(docs, tokenizer, PackConfig(context_size=16), rows_per_batch=2))
    assert calls == [("org/data", "large", "test", True)]
    text = tokenizer.decode(first.tokens[0, 1:])
    assert "large test document 0" in text
    assert len(read) <= 1100  # streamed: the documents after the first chunk of 1024 were never read
    settings = cfg.settings("m")
    assert settings["corpus_config"] == "large" and settings["corpus_split"] == "test"
    assert settings["dataset_fingerprint"] == "org/data:large/test"


def test_an_sae_records_its_hub_config_and_split_and_eval_reads_them_back():
    from sae_kit.activations import DATA_SETTINGS, HarvestConfig
    from sae_kit.heldout import harvest_config_for
    from sae_kit.sae import SAE, SAEConfig

    cfg = HarvestConfig(corpus="org/data", corpus_config="large", corpus_split="test")
    settings = cfg.settings("m")
    meta = {k: settings[k] for k in DATA_SETTINGS} | {"hook_name": "blocks.1.hook_resid_post"}
    sae = SAE(SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2, metadata=meta))
    back = harvest_config_for(sae)
    assert (back.corpus, back.corpus_config, back.corpus_split) == ("org/data", "large", "test")
    old = SAE(SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2, metadata={"dataset_path": "org/data"}))
    assert (harvest_config_for(old).corpus_config, harvest_config_for(old).corpus_split) == (None, "train")


def test_hub_config_and_split_errors_are_one_line(tmp_path, monkeypatch):
    """Real `datasets` errors of a repo with configurations (a local one, offline), each one line naming the fix."""
    import datasets

    from sae_kit.activations import HarvestConfig

    real, repo = datasets.load_dataset, str(_hub_like_dir(tmp_path))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: real(repo, *a, **k))
    cases = [
        ({}, r"hub dataset 'org/data' needs a configuration: pass --corpus-config, one of (small, large|large, small)"),
        ({"config": "huge"}, r"has no configuration 'huge': pass --corpus-config, one of"),
        (
            {"config": "small", "split": "validation"},
            r"has no split 'validation': pass --corpus-split, one of train, test",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(CorpusError, match=message) as err:
            load_corpus("org/data", text_field="content", **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(HarvestError, match="--corpus-config/--corpus-split choose a subset .* drop them"):
        HarvestConfig(corpus="default", corpus_config="small").check()
