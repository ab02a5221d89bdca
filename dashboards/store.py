"""The on-disk feature index: what `sae-kit index` writes and the browser reads.

    index/
      index.json              settings, the SAE it describes, shard list, timings; "complete" once every shard is written
      vocab.json              token id -> display string (so pages render without a tokenizer)
      features.parquet        one row per feature: the scalars the feature list sorts and filters on
      shards/00000-01023.parquet
                              one row per feature of the range: histogram, top/quantile contexts, logit effects,
                              decoder neighbours, co-firing features; row groups of `row_group` features, so one
                              feature is one row-group read
      .work/                  the unfinished pass (deleted when the index completes)

Every file is written atomically (temp file + rename); parquet pages carry CRC checksums, so a damaged shard is
reported as damaged instead of read as wrong numbers.
"""

from __future__ import annotations

import json
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sae_kit.atomic import atomic_path
from sae_kit.dashboards.render import plain
from sae_kit.errors import SaeKitError

SCHEMA = "sae-kit/feature-index"
VERSION = 1

CONTEXT = pa.struct(
    [
        ("row", pa.int32()),
        ("pos", pa.int32()),
        ("act", pa.float32()),
        ("peak", pa.int32()),  # index of the peak token within `tokens`
        ("tokens", pa.list_(pa.int32())),
        ("acts", pa.list_(pa.float32())),
        ("band", pa.int8()),  # activation-quantile band (-1 for top contexts)
    ]
)
SHARD_SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("hist_counts", pa.list_(pa.int32())),
        ("hist_lo", pa.float32()),
        ("hist_hi", pa.float32()),
        ("top", pa.list_(CONTEXT)),
        ("top_negative", pa.list_(CONTEXT)),
        ("quantiles", pa.list_(CONTEXT)),
        ("band_lo", pa.list_(pa.float32())),
        ("band_hi", pa.list_(pa.float32())),  # |activation| range of each quantile band
        ("logit_pos_ids", pa.list_(pa.int32())),
        ("logit_pos_vals", pa.list_(pa.float32())),
        ("logit_neg_ids", pa.list_(pa.int32())),
        ("logit_neg_vals", pa.list_(pa.float32())),
        ("neighbour_ids", pa.list_(pa.int32())),
        ("neighbour_cos", pa.list_(pa.float32())),
        ("cofire_ids", pa.list_(pa.int32())),
        ("cofire_jaccard", pa.list_(pa.float32())),
        ("cofire_frac", pa.list_(pa.float32())),
    ]
)
SUMMARY_SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("count", pa.int64()),
        ("density", pa.float64()),
        ("max_act", pa.float32()),
        ("min_act", pa.float32()),
        ("mean_act", pa.float32()),
        ("top_token_ids", pa.list_(pa.int32())),  # the token at the peak of each top context
        ("logit_pos_ids", pa.list_(pa.int32())),
    ]
)


class FeatureIndexError(SaeKitError):
    """The index is missing, unfinished or damaged."""


def shard_name(start: int, stop: int) -> str:
    return f"shards/{start:05d}-{stop - 1:05d}.parquet"


def write_table(target: Path, table: pa.Table, row_group: int | None = None) -> None:
    """Write a parquet file atomically, with page checksums."""
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group, write_page_checksum=True, compression="zstd")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FeatureIndexError(
            f"{path} is damaged ({type(err).__name__}); rebuild it: sae-kit index {path.parent.parent} --force"
        ) from None


class FeatureIndex:
    """A finished index, opened lazily: the meta and summary at once, one feature's shard row group on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_file = self.path / "index.json"
        if not meta_file.is_file():
            raise FeatureIndexError(
                f"no feature index in {self.path.parent}; build it: sae-kit index {self.path.parent}"
            )
        self.meta = _json(self._inside(meta_file))
        if self.meta.get("schema") != SCHEMA or self.meta.get("version") != VERSION:
            raise FeatureIndexError(
                f"{meta_file} is not a version-{VERSION} sae-kit feature index; rebuild it: sae-kit index {self.path.parent} --force"
            )
        if not self.meta.get("complete"):
            raise FeatureIndexError(
                f"the index in {self.path.parent} is unfinished; resume it: sae-kit index {self.path.parent}"
            )
        self.vocab: list[str] = _json(self._inside(self.path / "vocab.json"))
        self.d_sae: int = self.meta["sae"]["d_sae"]
        self.signed: bool = self.meta["sae"]["signed"]
        self._files = lru_cache(maxsize=64)(self._open)

    @cached_property
    def table(self) -> pa.Table:
        """The per-feature summary (SUMMARY_SCHEMA), read once."""
        table = self._read(self.path / "features.parquet", lambda f: f.read())
        if table.num_rows != self.d_sae:
            raise FeatureIndexError(
                f"features.parquet has {table.num_rows} rows for {self.d_sae} features; rebuild it: sae-kit index {self.path.parent} --force"
            )
        return table

    @cached_property
    def summary(self):
        """The per-feature scalars as a pandas DataFrame (row i is feature i)."""
        return self.table.drop_columns(["top_token_ids", "logit_pos_ids"]).to_pandas()

    def with_tokens(self, ids: set[int], columns: tuple[str, ...] = ("top_token_ids", "logit_pos_ids")) -> np.ndarray:
        """[d_sae] bool: features whose `columns` (peak tokens of the top contexts, top promoted tokens) hold any of `ids`."""
        hit = np.zeros(self.d_sae, dtype=bool)
        for name in columns:
            col = self.table[name].combine_chunks()
            found = np.isin(pc.list_flatten(col).to_numpy(), np.fromiter(ids, dtype=np.int64))
            hit[pc.list_parent_indices(col).to_numpy()[found]] = True
        return hit

    def token_strings(self, ids) -> str:
        """Token ids as a short readable string (for tables), whitespace shown."""
        return "  ".join(plain(self.vocab[int(i)]) for i in ids)

    def feature(self, i: int) -> dict[str, Any]:
        """Everything the feature page shows for feature `i` (one row-group read)."""
        if not 0 <= i < self.d_sae:
            raise FeatureIndexError(f"feature {i} is out of range; this SAE has features 0..{self.d_sae - 1}")
        size, group = self.meta["shard_size"], self.meta["row_group"]
        start = i // size * size
        file = self.path / shard_name(start, min(start + size, self.d_sae))
        rows = self._read(file, lambda f: f.read_row_group((i - start) // group)).to_pylist()
        row = rows[(i - start) % group] if (i - start) % group < len(rows) else {"feature": None}
        if row["feature"] != i:
            raise FeatureIndexError(
                f"{file} is damaged (feature {i} is not where it belongs); rebuild it: sae-kit index {self.path.parent} --force"
            )
        return row

    def _open(self, file: Path) -> pq.ParquetFile:
        return pq.ParquetFile(file, page_checksum_verification=True)

    def _inside(self, file: Path) -> Path:
        """`file`, or a one-line error when it resolves outside the index directory (a symlink out of it)."""
        if not file.resolve().is_relative_to(self.path.resolve()):
            raise FeatureIndexError(
                f"{file} resolves to {file.resolve()}, outside the index {self.path}; the browser reads only inside the directory it was given"
            )
        return file

    def _read(self, file: Path, how) -> pa.Table:
        self._inside(file)
        if not file.is_file():
            raise FeatureIndexError(
                f"{file.relative_to(self.path.parent)} is missing; rebuild the index: sae-kit index {self.path.parent} --force"
            )
        try:
            return how(self._files(file))
        except (OSError, pa.ArrowException, ValueError, IndexError) as err:
            self._files.cache_clear()
            reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            raise FeatureIndexError(
                f"{file.relative_to(self.path.parent)} is damaged ({reason}); rebuild it: sae-kit index {self.path.parent} --force"
            ) from None
