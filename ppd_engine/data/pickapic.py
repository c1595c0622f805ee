"""Pick-a-Pic v2 preference pairs, read from the dataset's own parquet layout.

`load_pairs(folder, split=...)` reads the *.parquet files of one split under `folder` (the hub
layout is data/<split>-NNNNN-of-NNNNN-<hash>.parquet, e.g. train, validation, test,
validation_unique, test_unique) with pyarrow, in two passes so a big shard never loads whole and
JPEG bytes are read only for rows that survive filtering:

1. the light columns (caption, labels, flags, ids) batch by batch: drop rows without a label,
   with a NaN/Inf label, with identical images or tied (counted separately, in that order of
   precedence), then keep users with at least `min_pairs_per_user` pairs (and the `max_users`
   users with the most pairs);
2. (unless `load_images=False`) the JPEG columns of the surviving rows, row group by row group:
   bytes that do not decode are skipped and counted (first few uids logged); users that fall
   below `min_pairs_per_user` because of that are dropped too.

With `load_images=False` a record holds where its bytes are (file, row), not the bytes, so the
index of the full train split (~1M pairs, ~335 GB of JPEGs) fits in a few hundred MB whatever the
image sizes; `PickAPicPairs.with_images(records)` reads the bytes of the records that need them in
row-group order, and `PickAPicPairs.image_reader()` is the picklable reader DataLoader workers use.

`folder` may also be one .parquet file (read whatever its name), and `columns=` maps a user's own
columns onto the fields below (data/columns.py, data.format=columns).

Files: only `*.parquet` files of the chosen split are read. Other files (README.md, .gitattributes)
are counted in `files_ignored`; a `.parquet` file that is empty or not parquet at all (no PAR1 magic
at its start) is skipped, counted in `files_not_parquet` and logged by name; a parquet file that is
truncated or whose pages do not decode stops the load with a one-line DataFileError naming it
(skipping it would silently train on less data than the user asked for). Column types are checked
per file, naming the file and the column; user ids are normalised to one string form across files
(an int64 101 in one shard, a float64 101.0 or a string "101" in another are the same user).

Records come out in file order (files sorted by path) then row order, with the preferred image
first, so the same folder always gives the same list.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import math
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import PIL.Image

    from ppd_engine.data.columns import ColumnMap

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("jpg_0", "jpg_1")
META_COLUMNS = ("caption", "label_0", "label_1", "user_id", "are_different", "has_label",
                "image_0_uid", "image_1_uid", "ranking_id", "best_image_uid")
REQUIRED_COLUMNS = META_COLUMNS + IMAGE_COLUMNS
SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")
_LOGGED_CORRUPT = 5
_MAGIC = b"PAR1"
_HUB_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-\d+-of-\d+(-[^.]*)?\.parquet$")


class DataFileError(ValueError):
    """A data file that cannot be read as the Pick-a-Pic schema; the message names the file."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass(slots=True)
class PairRecord:
    """One preference pair; `image_w` is the preferred image.

    `source` and `row` say where the pair's JPEG bytes are (index into PickAPicPairs.sources, row in
    that file); `col_w` is the column (0 or 1) of the preferred image. The images are None for an
    index loaded with load_images=False."""

    caption: str
    image_w: "PIL.Image.Image | bytes | None"   # RGB image, JPEG bytes (decode_images=False) or None
    image_l: "PIL.Image.Image | bytes | None"
    uid_w: str
    uid_l: str
    user_id: str
    ranking_id: str
    source: int = -1
    row: int = -1
    col_w: int = 0

    @property
    def pair_id(self) -> str:
        """Stable id of the pair (a ranking may hold more than one pair)."""
        return f"{self.ranking_id}:{self.uid_w}:{self.uid_l}"


@dataclass
class PickAPicPairs:
    """Filtered pairs plus the counts of everything that was dropped (`stats`) and the files read."""

    records: list[PairRecord]
    stats: dict = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    _tables: dict = field(default_factory=dict, repr=False)   # name -> in-memory table (`datasets` path)
    columns: "ColumnMap | None" = None                        # data.format=columns: the user's column map

    def by_user(self) -> dict[str, list[PairRecord]]:
        """user_id -> that user's records in record order; users sorted by id."""
        groups: dict[str, list[PairRecord]] = defaultdict(list)
        for r in self.records:
            groups[r.user_id].append(r)
        return {u: groups[u] for u in sorted(groups)}

    def drop_corrupt(self, bad_uids: set[str], min_pairs_per_user: int) -> "PickAPicPairs":
        """Remove pairs that use an image in `bad_uids` (counted per image and per row), then users
        left with fewer than `min_pairs_per_user` pairs; updates `stats` in place. Returns self."""
        if not bad_uids:
            return self
        s = self.stats
        before = Counter(r.user_id for r in self.records)
        kept = []
        for r in self.records:
            n_bad = (r.uid_w in bad_uids) + (r.uid_l in bad_uids)
            s["corrupt_images"] += n_bad
            if n_bad:
                s["corrupt_rows_dropped"] += 1
            else:
                kept.append(r)
        log.warning("%d corrupt image(s) skipped (first uids: %s)", s["corrupt_images"], sorted(bad_uids)[:_LOGGED_CORRUPT])
        counts = Counter(r.user_id for r in kept)
        few = {u for u, n in counts.items() if n < min_pairs_per_user} | (set(before) - set(counts))
        s["pairs_dropped_few_pairs"] += sum(counts[u] for u in few)
        s["users_dropped_few_pairs"] += len(few)
        self.records = [r for r in kept if r.user_id not in few]
        s["kept"] = len(self.records)
        s["users_kept"] = len({r.user_id for r in self.records})
        return self

    def image_reader(self) -> "PairImageReader":
        """A picklable reader of these records' JPEG bytes (reopens files in each process)."""
        return PairImageReader(self.sources, self._tables, self.columns)

    def with_images(self, records: list[PairRecord]) -> list[PairRecord]:
        """Copies of `records` holding their JPEG bytes (read row group by row group), same order."""
        got = {}
        for rec, b_w, b_l in self.image_reader().iter_pairs(records):
            got[id(rec)] = replace(rec, image_w=b_w, image_l=b_l)
        return [got[id(r)] for r in records]

    def few_shot_split(self, n_shots: int = 4, seed: int = 0) -> tuple[dict[str, list[PairRecord]], list[PairRecord]]:
        """Hold out `n_shots` pairs per user (the pairs that build the user's embedding).

        Returns (shots: user -> n_shots records, train: every other record in record order). The
        choice for a user depends only on (seed, user_id, that user's records), so adding or
        removing other users does not change it. Users with fewer than `n_shots` pairs cannot get
        an embedding and are left out of both (logged).
        """
        if n_shots < 1:
            raise ValueError(f"n_shots must be >= 1; got {n_shots}")
        shots: dict[str, list[PairRecord]] = {}
        held: set[int] = set()
        skipped = []
        for user, recs in self.by_user().items():
            if len(recs) < n_shots:
                skipped.append(user)
                held.update(id(r) for r in recs)
                continue
            rng = random.Random(_seed_for(seed, user))
            picked = sorted(rng.sample(range(len(recs)), n_shots))
            shots[user] = [recs[i] for i in picked]
            held.update(id(recs[i]) for i in picked)
        if skipped:
            log.warning("few_shot_split: %d user(s) have fewer than %d pairs and are left out (e.g. %s)",
                        len(skipped), n_shots, skipped[:5])
        train = [r for r in self.records if id(r) not in held]
        return shots, train

    def user_split(self, unseen_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
        """Split users into (seen, unseen), both sorted; unseen users are never trained on.

        round(unseen_fraction * n_users) users are unseen, but at least one of each side when
        0 < unseen_fraction < 1 and there are two or more users.
        """
        if not 0.0 <= unseen_fraction <= 1.0:
            raise ValueError(f"unseen_fraction must be in [0, 1]; got {unseen_fraction}")
        users = sorted(self.by_user())
        n_unseen = round(unseen_fraction * len(users))
        if 0.0 < unseen_fraction < 1.0 and len(users) >= 2:
            n_unseen = min(max(n_unseen, 1), len(users) - 1)
        order = users[:]
        random.Random(seed).shuffle(order)
        return sorted(order[n_unseen:]), sorted(order[:n_unseen])


def _seed_for(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")


# ----------------------------------------------------------------------------------------------
# Sources: a parquet file, or an in-memory/memory-mapped arrow table (what `datasets` holds).


class _ParquetSource:
    def __init__(self, path: str):
        self.name = path
        try:
            self.file = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError; name the file either way
            raise DataFileError(f"{path}: not a readable parquet file ({_one_line(e)})") from e
        self.schema = self.file.schema_arrow
        self.columns = set(self.schema.names)

    def iter_meta(self, batch_rows: int) -> Iterator[pa.RecordBatch]:
        yield from self.iter_batches(batch_rows, list(META_COLUMNS))

    def iter_batches(self, batch_rows: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        try:
            yield from self.file.iter_batches(batch_size=batch_rows, columns=columns)
        except Exception as e:  # noqa: BLE001 - a corrupt page header surfaces as a thrift OSError
            raise DataFileError(f"{self.name}: corrupt parquet data ({_one_line(e)})") from e


class _TableSource:
    def __init__(self, name: str, table: pa.Table):
        self.name = name
        self.table = table
        self.schema = table.schema
        self.columns = set(table.column_names)

    def iter_meta(self, batch_rows: int) -> Iterator[pa.RecordBatch]:
        yield from self.table.select(list(META_COLUMNS)).to_batches(max_chunksize=batch_rows)


class PairImageReader:
    """Reads the JPEG bytes of PairRecords from their files, row group by row group.

    Picklable: parquet handles are opened lazily in the process that reads (DataLoader workers)."""

    def __init__(self, sources: list[str], tables: dict | None = None, columns: "ColumnMap | None" = None):
        self.sources = list(sources)
        self._tables = dict(tables or {})
        self.columns = columns
        self._image_columns = list(columns.image_columns if columns else IMAGE_COLUMNS)
        self._files: dict[int, pq.ParquetFile] = {}
        self._starts: dict[int, list[int]] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def _file(self, si: int) -> pq.ParquetFile:
        f = self._files.get(si)
        if f is None:
            f = self._files[si] = pq.ParquetFile(self.sources[si])
            starts, n = [], 0
            for g in range(f.num_row_groups):
                starts.append(n)
                n += f.metadata.row_group(g).num_rows
            self._starts[si] = starts + [n]
        return f

    def row_groups(self, records: list[PairRecord]) -> list[tuple[int, int, list[PairRecord]]]:
        """(source, row group, records in it sorted by row) for `records`: the units of reading."""
        by_source = defaultdict(list)
        for r in records:
            if r.source < 0:
                raise ValueError(f"pair {r.pair_id} has no file location (built by hand?); pass its images")
            by_source[r.source].append(r)
        units = []
        for si in sorted(by_source):
            recs = sorted(by_source[si], key=lambda r: r.row)
            name = self.sources[si]
            if name in self._tables:
                units.append((si, -1, recs))
                continue
            self._file(si)
            starts = self._starts[si]
            g, cur = 0, []
            for r in recs:
                while r.row >= starts[g + 1]:
                    if cur:
                        units.append((si, g, cur))
                        cur = []
                    g += 1
                cur.append(r)
            if cur:
                units.append((si, g, cur))
        return units

    def read_unit(self, si: int, g: int, recs: list[PairRecord]) -> Iterator[tuple[PairRecord, bytes, bytes]]:
        """(record, winner bytes, loser bytes) for the records of one row group."""
        name = self.sources[si]
        if g < 0:
            part = self._tables[name].select(list(IMAGE_COLUMNS)).take(pa.array([r.row for r in recs], type=pa.int64()))
            c0, c1 = part.column(0).to_pylist(), part.column(1).to_pylist()
            for i, r in enumerate(recs):
                pair = (c0[i], c1[i])
                yield r, pair[r.col_w], pair[1 - r.col_w]
            return
        try:
            group = self._file(si).read_row_group(g, columns=self._image_columns)
        except Exception as e:  # noqa: BLE001 - name the file whatever pyarrow raised
            raise DataFileError(f"{name}: corrupt parquet data in row group {g} ({_one_line(e)})") from e
        c0, c1 = group.column(0), group.column(1)
        start = self._starts[si][g]
        for r in recs:
            i = r.row - start
            pair = (c0[i].as_py(), c1[i].as_py())
            if self.columns is not None:
                pair = tuple(self.columns.image_bytes(v, name) for v in pair)
            yield r, pair[r.col_w], pair[1 - r.col_w]

    def iter_pairs(self, records: list[PairRecord]) -> Iterator[tuple[PairRecord, bytes, bytes]]:
        for unit in self.row_groups(records):
            yield from self.read_unit(*unit)


def _split_of(path: str) -> str | None:
    m = _HUB_NAME.match(os.path.basename(path))
    return m.group("split") if m else None


def _is_parquet(path: str) -> str | None:
    """None if `path` looks like a whole parquet file; otherwise why not ('empty', 'not parquet', 'truncated')."""
    size = os.path.getsize(path)
    if size == 0:
        return "empty"
    with open(path, "rb") as f:
        head = f.read(4)
        if head != _MAGIC:
            return "not parquet"
        if size < 12:
            return "truncated"
        f.seek(-4, os.SEEK_END)
        return None if f.read(4) == _MAGIC else "truncated"


def _sources(folder: str, split: str | None, stats: Counter, columns: "ColumnMap | None" = None) -> list:
    make = columns.source if columns else _ParquetSource
    if os.path.isfile(folder) and folder.endswith(".parquet"):
        return [make(folder)]
    if os.path.isdir(folder):
        every = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(p))
        paths = [p for p in every if p.endswith(".parquet")]
        stats["files_ignored"] = len(every) - len(paths)
        splits = {_split_of(p) for p in paths} - {None}
        if split is None and len(splits) > 1:
            raise ValueError(f"{folder!r} holds the splits {', '.join(sorted(splits))}: pass split= "
                             f"(data.split / --split) so no pairs leak between them")
        if split is not None:
            chosen = [p for p in paths if _split_of(p) == split]
            if not chosen and not splits:   # a flat folder without hub names: the old prefix rule
                chosen = [p for p in paths if os.path.basename(p).startswith(f"{split}-")]
            stats["files_other_splits"] = len(paths) - len(chosen)
            paths = chosen
        readable = []
        for p in paths:
            why = _is_parquet(p)
            if why == "truncated":
                raise DataFileError(f"{p}: truncated parquet file (no footer); download it again")
            if why is not None:
                log.warning("skipping %s: %s", p, "an empty file" if why == "empty" else "not a parquet file")
                stats["files_not_parquet"] += 1
                continue
            readable.append(p)
        if not readable:
            raise FileNotFoundError(f"no *.parquet files under {folder!r}"
                                    + (f" of split {split!r}" if split else ""))
        return [make(p) for p in readable]
    if folder.startswith(("/", ".", "~")) or folder.count("/") > 1 or columns:
        raise FileNotFoundError(f"{'data' if columns else 'Pick-a-Pic'} folder {folder!r} does not exist")
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{folder!r} is not a local folder; loading it from the hub needs the optional "
                          f"`datasets` package (pip install datasets), or download its parquet files and "
                          f"pass that folder") from e
    ds = datasets.load_dataset(folder, split=split or "train")
    # A datasets.Dataset is backed by a memory-mapped arrow table: project and take from it directly.
    return [_TableSource(f"{folder}[{split or 'train'}]", ds.data.table)]


def _kind(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "number"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_null(t):
        return "null"
    return str(t)


# Accepted kinds per column (an all-null column reads as type null and is accepted; its rows are
# then dropped as unlabelled or missing ids).
_KINDS = {"caption": {"string"}, "label_0": {"number", "integer"}, "label_1": {"number", "integer"},
          "user_id": {"integer", "string", "number"}, "are_different": {"bool", "integer"},
          "has_label": {"bool", "integer"}, "image_0_uid": {"string", "integer"},
          "image_1_uid": {"string", "integer"}, "ranking_id": {"integer", "string", "number"},
          "best_image_uid": {"string", "integer"}, "jpg_0": {"binary"}, "jpg_1": {"binary"}}


def _check_columns(source) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in source.columns]
    if missing:
        raise KeyError(f"Pick-a-Pic file {source.name!r} has no column {missing[0]!r}"
                       + (f" (also missing: {', '.join(missing[1:])})" if missing[1:] else "")
                       + f"; required columns: {', '.join(REQUIRED_COLUMNS)}")
    for col, kinds in _KINDS.items():
        kind = _kind(source.schema.field(col).type)
        if kind != "null" and kind not in kinds:
            raise DataFileError(f"{source.name}: column {col!r} has type {source.schema.field(col).type}; "
                                f"expected {' or '.join(sorted(kinds))}")


def normalise_id(v) -> str | None:
    """One string form for an id however a file stored it: 101, 101.0 and "101" -> "101"."""
    if v is None:
        return None
    if isinstance(v, float):
        if not math.isfinite(v):
            return None
        return str(int(v)) if v.is_integer() else repr(v)
    return str(v).strip() if isinstance(v, str) else str(v)


def _decode(data, keep: bool):
    """Decode JPEG bytes fully (PIL is lazy); the RGB image if `keep`, else the bytes. Raises on corrupt data."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"image bytes expected, got {type(data).__name__}")
    img = Image.open(io.BytesIO(data))
    if not keep:
        # JPEG DCT scaling: decoding at 1/8 size still reads every byte, so truncation is caught, ~10x faster.
        img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
        return bytes(data)
    img.load()
    return img.convert("RGB")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def load_pairs(folder: str, min_pairs_per_user: int = 4, max_users: int | None = None,
               decode_images: bool = True, split: str | None = None, verify_images: bool = True,
               batch_rows: int = 4096, progress: bool = True, load_images: bool = True,
               columns: "ColumnMap | None" = None) -> PickAPicPairs:
    """Load filtered Pick-a-Pic v2 pairs from a local folder of parquet files (or a hub id via `datasets`).

    min_pairs_per_user: users with fewer valid pairs are dropped (paper: N = 4).
    max_users: keep the users with the most valid pairs (ties by user id); ranked on label-valid
        pairs, before corrupt images are removed.
    decode_images: records hold RGB PIL images; False keeps JPEG bytes (far less memory).
    split: only files of that split (hub layout "{split}-NNNNN-of-NNNNN-*.parquet"), or the hub
        split; None = every file, refused when the folder holds several splits.
    verify_images: with decode_images=False, still decode each JPEG once so corrupt bytes are
        dropped here rather than at cache build.
    load_images: False = records hold only where their bytes are (no image is read or verified
        here; the cache build and `embed` find corrupt bytes as they decode).
    columns: a data.columns.ColumnMap = `folder` (a folder or one .parquet file) holds a user's own
        columns, mapped onto these fields (data.format=columns); None = the Pick-a-Pic schema.
    Returns PickAPicPairs; `stats` holds rows, kept, ties_dropped, not_different_dropped,
    unlabeled_dropped, nonfinite_label_dropped, missing_fields_dropped, corrupt_images,
    corrupt_rows_dropped, pairs_dropped_few_pairs, pairs_dropped_max_users, users_total, users_kept,
    users_dropped_few_pairs, users_dropped_max_users, files, files_not_parquet, files_ignored,
    files_other_splits. Every row is counted exactly once: rows = kept + *_dropped + pairs_dropped_*.
    """
    from tqdm.auto import tqdm

    if min_pairs_per_user < 1:
        raise ValueError(f"min_pairs_per_user must be >= 1; got {min_pairs_per_user}")
    if max_users is not None and max_users < 1:
        raise ValueError(f"max_users must be >= 1 or None; got {max_users}")
    stats = Counter(rows=0, ties_dropped=0, not_different_dropped=0, unlabeled_dropped=0, nonfinite_label_dropped=0,
                    missing_fields_dropped=0, corrupt_images=0, corrupt_rows_dropped=0, files_not_parquet=0,
                    files_ignored=0, files_other_splits=0)
    sources = _sources(str(folder), split, stats, columns)
    for s in sources:
        if columns:
            s.check()
        else:
            _check_columns(s)

    # Pass 1: label filtering on the light columns. cand: (source, row, caption, winner, uid0, uid1, user, ranking)
    cands = []
    for si, src in enumerate(sources):
        row = 0
        for batch in src.iter_meta(batch_rows):
            cols = {name: batch.column(name).to_pylist() for name in META_COLUMNS}
            for i in range(batch.num_rows):
                stats["rows"] += 1
                l0, l1 = cols["label_0"][i], cols["label_1"][i]
                user = normalise_id(cols["user_id"][i])
                u0, u1 = normalise_id(cols["image_0_uid"][i]), normalise_id(cols["image_1_uid"][i])
                if not cols["has_label"][i] or l0 is None or l1 is None:
                    stats["unlabeled_dropped"] += 1
                elif not (_finite(l0) and _finite(l1)):
                    # NaN compares false both ways: `l0 > l1` would silently make image 1 the winner.
                    stats["nonfinite_label_dropped"] += 1
                elif not cols["are_different"][i]:
                    stats["not_different_dropped"] += 1
                elif l0 == 0.5 and l1 == 0.5:
                    stats["ties_dropped"] += 1
                elif l0 == l1:
                    stats["unlabeled_dropped"] += 1  # labelled but no preference (e.g. 0/0)
                elif user is None or u0 is None or u1 is None:
                    stats["missing_fields_dropped"] += 1
                else:
                    cands.append((si, row + i, cols["caption"][i] or "", 0 if l0 > l1 else 1,
                                  u0, u1, user, normalise_id(cols["ranking_id"][i])))
            row += batch.num_rows

    users_before = Counter(c[6] for c in cands)
    stats["users_total"] = len(users_before)
    eligible = {u for u, n in users_before.items() if n >= min_pairs_per_user}
    few_users = set(users_before) - eligible
    if max_users is not None and len(eligible) > max_users:
        ranked = sorted(eligible, key=lambda u: (-users_before[u], u))
        kept_users = set(ranked[:max_users])
        stats["users_dropped_max_users"] = len(eligible) - max_users
        stats["pairs_dropped_max_users"] = sum(users_before[u] for u in eligible - kept_users)
        eligible = kept_users
    stats["pairs_dropped_few_pairs"] = sum(users_before[u] for u in few_users)
    records = [PairRecord(caption=caption, image_w=None, image_l=None, uid_w=(u0, u1)[w], uid_l=(u0, u1)[1 - w],
                          user_id=user, ranking_id=ranking, source=si, row=row, col_w=w)
               for si, row, caption, w, u0, u1, user, ranking in cands if user in eligible]
    del cands
    pairs = PickAPicPairs(records=records, sources=[s.name for s in sources],
                          _tables={s.name: s.table for s in sources if isinstance(s, _TableSource)}, columns=columns)

    stats["users_dropped_few_pairs"] = len(few_users)
    stats["kept"] = len(records)
    stats["users_kept"] = len({r.user_id for r in records})
    stats["files"] = len(sources)
    stats.setdefault("users_dropped_max_users", 0)
    stats.setdefault("pairs_dropped_max_users", 0)
    pairs.stats = dict(stats)
    if load_images:
        # Pass 2: JPEG bytes of surviving rows only.
        bad: set[str] = set()
        check = decode_images or verify_images
        with tqdm(total=len(records), desc="Pick-a-Pic images", unit="pair", disable=not progress) as bar:
            for rec, b_w, b_l in pairs.image_reader().iter_pairs(records):
                pair = []
                for data, uid in ((b_w, rec.uid_w), (b_l, rec.uid_l)):
                    try:
                        pair.append(_decode(data, decode_images) if check else bytes(data))
                    # Untrusted bytes: any decoder failure means "corrupt", never a crash.
                    except Exception as e:  # noqa: BLE001
                        if len(bad) < _LOGGED_CORRUPT:
                            log.warning("skipping corrupt image %s in %s: %s", uid, sources[rec.source].name, e)
                        bad.add(uid)
                        pair.append(None)
                rec.image_w, rec.image_l = pair
                bar.update(1)
        pairs.drop_corrupt(bad, min_pairs_per_user)
    log.info("%s", format_stats(pairs.stats))
    return pairs


def format_stats(stats: dict) -> str:
    """One readable summary of `load_pairs` stats."""
    files = f"{stats['files']} files"
    extra = [f"{stats[k]} {what}" for k, what in (("files_not_parquet", "not parquet, skipped"),
                                                  ("files_other_splits", "of other splits"),
                                                  ("files_ignored", "other files ignored")) if stats.get(k)]
    return (f"Pick-a-Pic: {stats['rows']} rows of {files}{' (' + ', '.join(extra) + ')' if extra else ''} -> "
            f"{stats['kept']} pairs from {stats['users_kept']} users "
            f"(dropped: {stats['ties_dropped']} ties, {stats['not_different_dropped']} identical images, "
            f"{stats['unlabeled_dropped']} unlabeled, {stats.get('nonfinite_label_dropped', 0)} NaN/Inf labels, "
            f"{stats['missing_fields_dropped']} missing ids, "
            f"{stats['corrupt_rows_dropped']} with corrupt images ({stats['corrupt_images']} images), "
            f"{stats['pairs_dropped_few_pairs']} pairs of {stats['users_dropped_few_pairs']} users with too few "
            f"pairs, {stats['pairs_dropped_max_users']} pairs of {stats['users_dropped_max_users']} users over max_users)")
