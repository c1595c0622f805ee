"""A user's own preference parquet (data.format=columns), read through the Pick-a-Pic path.

`ColumnMap.parse(data.columns)` names which of the user's columns hold each Pick-a-Pic field; the
map then turns every batch of the user's light columns into the Pick-a-Pic metadata columns, so
`load_pairs(..., columns=cmap)` filters, counts and indexes the pairs exactly as it does Pick-a-Pic
(records hold (file, row), images are read on demand by the same PairImageReader). Mapping keys:

  prompt                      the caption (required)
  image_0, image_1            the two images, with a preference given by one of:
    label                       the index of the preferred image (0 or 1; 0.5 = tie), or
    label_0 [, label_1]         Pick-a-Pic's scores (label_1 defaults to 1 - label_0)
  chosen, rejected            instead of image_0/image_1 + a label: the preferred and the other image
  user_id                     optional; without it every pair belongs to one pseudo-user (NO_USER) and
                              the pickapic world trains the non-personalized objective

An image column holds the image bytes (binary), a path (string), relative to the folder of the file
that names it (absolute paths and URLs are kept), or a Hugging Face `datasets` Image (a struct of
bytes and path: the bytes, else the path). A pair whose two paths are the same file is dropped as
"identical images"; bytes are not compared (that would read every image in the light pass). Image
uids, the cache's keys, are the resolved path, or "<data file>#<row>:<0|1>" for bytes and Images, so
two datasets sharing a cache folder never collide.

The files are any that data/sources.py resolves: parquet (local or at a URL) or a `datasets`
folder's arrow files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import pyarrow as pa

from ppd_engine.data.pickapic import _kind, normalise_id
from ppd_engine.data.sources import DataFileError, is_url, open_source

log = logging.getLogger(__name__)

NO_USER = "all"
MAPPING_KEYS = ("prompt", "image_0", "image_1", "label", "label_0", "label_1", "chosen", "rejected", "user_id")
_IMAGE_KINDS = {"binary", "string"}
_KINDS = {"prompt": {"string"}, "label": {"number", "integer", "bool"}, "label_0": {"number", "integer", "bool"},
          "label_1": {"number", "integer", "bool"}, "user_id": {"integer", "string", "number"}}


@dataclass(frozen=True)
class ColumnMap:
    """Which user column holds each Pick-a-Pic field (see the module doc). Picklable: the image
    reader carries it into DataLoader workers."""

    prompt: str
    image_0: str            # the chosen image's column in the chosen/rejected form
    image_1: str
    label: str | None = None
    label_0: str | None = None
    label_1: str | None = None
    chosen_rejected: bool = False
    user_id: str | None = None

    @classmethod
    def parse(cls, mapping: dict, key: str = "data.columns") -> "ColumnMap":
        """The map from a {field: column} mapping; ValueError naming `key` and the offending entry."""
        unknown = [k for k in mapping if k not in MAPPING_KEYS]
        if unknown:
            raise ValueError(f"{key}: unknown mapping key(s) {', '.join(map(repr, unknown))} "
                             f"(allowed: {', '.join(MAPPING_KEYS)})")
        bad = [k for k, v in mapping.items() if not isinstance(v, str) or not v]
        if bad:
            raise ValueError(f"{key}.{bad[0]}: must name a column (a non-empty string), got {mapping[bad[0]]!r}")
        m = dict(mapping)
        if "prompt" not in m:
            raise ValueError(f"{key}: needs prompt (the caption column)")
        pair, labelled = {"image_0", "image_1"} & m.keys(), {"label", "label_0", "label_1"} & m.keys()
        if {"chosen", "rejected"} & m.keys():
            if pair or labelled or not {"chosen", "rejected"} <= m.keys():
                raise ValueError(f"{key}: chosen/rejected take both chosen and rejected and no image_0/image_1/"
                                 f"label keys (got {', '.join(sorted(m))})")
            return cls(m["prompt"], m["chosen"], m["rejected"], chosen_rejected=True, user_id=m.get("user_id"))
        if pair != {"image_0", "image_1"}:
            raise ValueError(f"{key}: needs image_0 and image_1 (or chosen and rejected)")
        if "label" in m and labelled != {"label"} or "label" not in m and "label_0" not in m:
            raise ValueError(f"{key}: give the preference as label (index of the preferred image) or as "
                             f"label_0 [, label_1] (scores), not both")
        return cls(m["prompt"], m["image_0"], m["image_1"], label=m.get("label"), label_0=m.get("label_0"),
                   label_1=m.get("label_1"), user_id=m.get("user_id"))

    @property
    def image_columns(self) -> tuple[str, str]:
        return self.image_0, self.image_1

    def _fields(self) -> dict[str, str]:
        return {f: c for f, c in (("prompt", self.prompt), ("image_0", self.image_0), ("image_1", self.image_1),
                                  ("label", self.label), ("label_0", self.label_0), ("label_1", self.label_1),
                                  ("user_id", self.user_id)) if c}

    def source(self, name: str) -> "MappedSource":
        return MappedSource(open_source(name), self)

    def image_bytes(self, value, source_name: str):
        """The bytes an image cell stands for: the bytes themselves, the file its path names, or a
        `datasets` Image's bytes (else its path). None when a named file cannot be read, which the
        loaders count as a corrupt image."""
        if isinstance(value, dict):          # datasets.Image: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if not isinstance(value, str):
            return value
        path = _resolve_path(source_name, value)
        try:
            if is_url(path):
                import fsspec

                with fsspec.open(path, "rb") as f:
                    return f.read()
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            log.warning("%s: image %s cannot be read (%s)", source_name, path, e.strerror or e)
            return None


def _resolve_path(source_name: str, value: str) -> str:
    """An image path cell, relative to the data file that names it (absolute paths and URLs kept)."""
    if is_url(value) or os.path.isabs(value):
        return value
    if is_url(source_name):
        return source_name.rsplit("/", 1)[0] + "/" + value
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(source_name)), value))


def _is_image_struct(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} >= {"bytes", "path"}


class MappedSource:
    """A user's data file whose light columns come out as Pick-a-Pic's META_COLUMNS."""

    def __init__(self, base, cmap: ColumnMap):
        self.base, self.cmap = base, cmap
        self.name, self.schema, self.columns = base.name, base.schema, base.columns
        self.group_starts = base.group_starts

    def check(self) -> None:
        """Every mapped column exists with a usable type; errors name the file and the column."""
        for fld, col in self.cmap._fields().items():
            if col not in self.columns:
                raise KeyError(f"{self.name}: no column {col!r} (data.columns.{fld}); "
                               f"the file has: {', '.join(sorted(self.columns))}")
            kinds = _IMAGE_KINDS if fld.startswith("image_") else _KINDS[fld]
            typ = self.schema.field(col).type
            kind = "binary" if fld.startswith("image_") and _is_image_struct(typ) else _kind(typ)
            if kind != "null" and kind not in kinds:
                raise DataFileError(f"{self.name}: column {col!r} (data.columns.{fld}) has type "
                                    f"{self.schema.field(col).type}; expected {' or '.join(sorted(kinds))}")

    def iter_meta(self, batch_rows: int):
        c = self.cmap
        here = self.name if is_url(self.name) else os.path.abspath(self.name)
        paths = [col for col in c.image_columns if _kind(self.schema.field(col).type) == "string"]
        light = sorted(set(c._fields().values()) - set(c.image_columns) | set(paths))
        row = 0
        for batch in self.base.iter_batches(batch_rows, light):
            cols = {name: batch.column(name).to_pylist() for name in light}
            n = batch.num_rows
            ids = []
            for j, col in enumerate(c.image_columns):
                if col in paths:
                    ids.append([None if v is None else _resolve_path(self.name, v) for v in cols[col]])
                else:   # bytes or a datasets Image: named by where they are (never read here)
                    ids.append([f"{here}#{row + i}:{j}" for i in range(n)])
            if c.chosen_rejected:
                l0, l1 = [1.0] * n, [0.0] * n
            elif c.label:
                # label = index of the preferred image: image 0 scores 1 - label, image 1 scores label.
                l1 = [None if v is None else float(v) for v in cols[c.label]]
                l0 = [None if v is None else 1.0 - v for v in l1]
            else:
                l0 = [None if v is None else float(v) for v in cols[c.label_0]]
                l1 = ([None if v is None else float(v) for v in cols[c.label_1]] if c.label_1
                      else [None if v is None else 1.0 - v for v in l0])
            yield pa.RecordBatch.from_pydict({
                "caption": cols[c.prompt], "label_0": l0, "label_1": l1,
                "user_id": [normalise_id(v) for v in cols[c.user_id]] if c.user_id else [NO_USER] * n,
                "are_different": [a != b for a, b in zip(*ids)], "has_label": [True] * n,
                "image_0_uid": ids[0], "image_1_uid": ids[1],
                "ranking_id": [f"{os.path.basename(self.name)}:{row + i}" for i in range(n)],
                "best_image_uid": [None] * n,
            }, schema=_META_SCHEMA)
            row += n


_META_SCHEMA = pa.schema([("caption", pa.string()), ("label_0", pa.float64()), ("label_1", pa.float64()),
                          ("user_id", pa.string()), ("are_different", pa.bool_()), ("has_label", pa.bool_()),
                          ("image_0_uid", pa.string()), ("image_1_uid", pa.string()), ("ranking_id", pa.string()),
                          ("best_image_uid", pa.string())])   # pickapic.META_COLUMNS, in its order
