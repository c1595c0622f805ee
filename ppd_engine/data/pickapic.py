"""Pick-a-Pic v2 preference pairs, read from the dataset's own parquet layout.

`load_pairs(folder)` reads every *.parquet under `folder` (the hub layout is data/train-*.parquet,
data/validation-*.parquet, ...; `split=` picks one) with pyarrow, in two passes so a big shard never
loads whole and JPEG bytes are read only for rows that survive filtering:

1. the light columns (caption, labels, flags, ids) batch by batch: drop rows without a label,
   with identical images or tied (counted separately, in that order of precedence), then keep users
   with at least `min_pairs_per_user` pairs (and the `max_users` users with the most pairs);
2. the JPEG columns of the surviving rows, row group by row group: bytes that do not decode are
   skipped and counted (first few uids logged); users that fall below `min_pairs_per_user`
   because of that are dropped too.

Records come out in file order (files sorted by path) then row order, with the preferred image
first, so the same folder always gives the same list.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import PIL.Image

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("jpg_0", "jpg_1")
META_COLUMNS = ("caption", "label_0", "label_1", "user_id", "are_different", "has_label",
                "image_0_uid", "image_1_uid", "ranking_id", "best_image_uid")
REQUIRED_COLUMNS = META_COLUMNS + IMAGE_COLUMNS
_LOGGED_CORRUPT = 5


@dataclass
class PairRecord:
    """One preference pair; `image_w` is the preferred image."""

    caption: str
    image_w: "PIL.Image.Image | bytes"   # RGB image, or JPEG bytes when decode_images=False
    image_l: "PIL.Image.Image | bytes"
    uid_w: str
    uid_l: str
    user_id: str
    ranking_id: str

    @property
    def pair_id(self) -> str:
        """Stable id of the pair (a ranking may hold more than one pair)."""
        return f"{self.ranking_id}:{self.uid_w}:{self.uid_l}"


@dataclass
class PickAPicPairs:
    """Filtered pairs plus the counts of everything that was dropped (`stats`)."""

    records: list[PairRecord]
    stats: dict = field(default_factory=dict)

    def by_user(self) -> dict[str, list[PairRecord]]:
        """user_id -> that user's records in record order; users sorted by id."""
        groups: dict[str, list[PairRecord]] = defaultdict(list)
        for r in self.records:
            groups[r.user_id].append(r)
        return {u: groups[u] for u in sorted(groups)}

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
        self.file = pq.ParquetFile(path)
        self.columns = set(self.file.schema_arrow.names)

    def iter_meta(self, batch_rows: int) -> Iterator[pa.RecordBatch]:
        yield from self.file.iter_batches(batch_size=batch_rows, columns=list(META_COLUMNS))

    def iter_images(self, rows: list[int]) -> Iterator[tuple[int, bytes, bytes]]:
        """Yield (row, jpg_0, jpg_1) for the sorted `rows`, reading only row groups that hold one."""
        wanted = iter(rows)
        nxt = next(wanted, None)
        start = 0
        for g in range(self.file.num_row_groups):
            n = self.file.metadata.row_group(g).num_rows
            if nxt is not None and nxt < start + n:
                group = self.file.read_row_group(g, columns=list(IMAGE_COLUMNS))
                c0, c1 = group.column(0), group.column(1)
                while nxt is not None and nxt < start + n:
                    i = nxt - start
                    yield nxt, c0[i].as_py(), c1[i].as_py()
                    nxt = next(wanted, None)
            start += n


class _TableSource:
    def __init__(self, name: str, table: pa.Table):
        self.name = name
        self.table = table
        self.columns = set(table.column_names)

    def iter_meta(self, batch_rows: int) -> Iterator[pa.RecordBatch]:
        yield from self.table.select(list(META_COLUMNS)).to_batches(max_chunksize=batch_rows)

    def iter_images(self, rows: list[int]) -> Iterator[tuple[int, bytes, bytes]]:
        images = self.table.select(list(IMAGE_COLUMNS))
        for s in range(0, len(rows), 256):
            chunk = rows[s:s + 256]
            part = images.take(pa.array(chunk, type=pa.int64()))
            for row, b0, b1 in zip(chunk, part.column(0).to_pylist(), part.column(1).to_pylist()):
                yield row, b0, b1


def _sources(folder: str, split: str | None) -> list:
    if os.path.isdir(folder):
        paths = sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True))
        if split is not None:
            paths = [p for p in paths if os.path.basename(p).startswith(f"{split}-")]
        if not paths:
            raise FileNotFoundError(f"no *.parquet files under {folder!r}"
                                    + (f" whose name starts with '{split}-'" if split else ""))
        return [_ParquetSource(p) for p in paths]
    if folder.startswith(("/", ".", "~")) or folder.count("/") > 1:
        raise FileNotFoundError(f"Pick-a-Pic folder {folder!r} does not exist")
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{folder!r} is not a local folder; loading it from the hub needs the optional "
                          f"`datasets` package (pip install datasets), or download its parquet files and "
                          f"pass that folder") from e
    ds = datasets.load_dataset(folder, split=split or "train")
    # A datasets.Dataset is backed by a memory-mapped arrow table: project and take from it directly.
    return [_TableSource(f"{folder}[{split or 'train'}]", ds.data.table)]


def _check_columns(source) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in source.columns]
    if missing:
        raise KeyError(f"Pick-a-Pic file {source.name!r} has no column {missing[0]!r}"
                       + (f" (also missing: {', '.join(missing[1:])})" if missing[1:] else "")
                       + f"; required columns: {', '.join(REQUIRED_COLUMNS)}")


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


def load_pairs(folder: str, min_pairs_per_user: int = 4, max_users: int | None = None,
               decode_images: bool = True, split: str | None = None, verify_images: bool = True,
               batch_rows: int = 4096, progress: bool = True) -> PickAPicPairs:
    """Load filtered Pick-a-Pic v2 pairs from a local folder of parquet files (or a hub id via `datasets`).

    min_pairs_per_user: users with fewer valid pairs are dropped (paper: N = 4).
    max_users: keep the users with the most valid pairs (ties by user id); ranked on label-valid
        pairs, before corrupt images are removed.
    decode_images: records hold RGB PIL images; False keeps JPEG bytes (far less memory).
    split: only files named "{split}-*.parquet" (hub layout), or the hub split; None = every file.
    verify_images: with decode_images=False, still decode each JPEG once so corrupt bytes are
        dropped here rather than at cache build.
    Returns PickAPicPairs; `stats` holds rows, kept, ties_dropped, not_different_dropped,
    unlabeled_dropped, missing_fields_dropped, corrupt_images, corrupt_rows_dropped,
    pairs_dropped_few_pairs, pairs_dropped_max_users, users_total, users_kept,
    users_dropped_few_pairs, users_dropped_max_users, files. Every row is counted exactly once:
    rows = kept + *_dropped + pairs_dropped_*.
    """
    from tqdm.auto import tqdm

    if min_pairs_per_user < 1:
        raise ValueError(f"min_pairs_per_user must be >= 1; got {min_pairs_per_user}")
    if max_users is not None and max_users < 1:
        raise ValueError(f"max_users must be >= 1 or None; got {max_users}")
    sources = _sources(str(folder), split)
    for s in sources:
        _check_columns(s)

    stats = Counter(rows=0, ties_dropped=0, not_different_dropped=0, unlabeled_dropped=0,
                    missing_fields_dropped=0, corrupt_images=0, corrupt_rows_dropped=0)
    # Pass 1: label filtering on the light columns. cand: (source, row, caption, winner, uid0, uid1, user, ranking)
    cands = []
    for si, src in enumerate(sources):
        row = 0
        for batch in src.iter_meta(batch_rows):
            cols = {name: batch.column(name).to_pylist() for name in META_COLUMNS}
            for i in range(batch.num_rows):
                stats["rows"] += 1
                l0, l1 = cols["label_0"][i], cols["label_1"][i]
                user, u0, u1 = cols["user_id"][i], cols["image_0_uid"][i], cols["image_1_uid"][i]
                if not cols["has_label"][i] or l0 is None or l1 is None:
                    stats["unlabeled_dropped"] += 1
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
                                  str(u0), str(u1), str(user), str(cols["ranking_id"][i])))
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
    cands = [c for c in cands if c[6] in eligible]

    # Pass 2: JPEG bytes of surviving rows only.
    images: dict[tuple[int, int], tuple] = {}
    corrupt_uids: list[str] = []
    check = decode_images or verify_images
    rows_by_source = defaultdict(list)
    for c in cands:
        rows_by_source[c[0]].append(c[1])
    uid_of = {(c[0], c[1]): (c[4], c[5]) for c in cands}
    with tqdm(total=len(cands), desc="Pick-a-Pic images", unit="pair", disable=not progress) as bar:
        for si, rows in rows_by_source.items():
            for row, b0, b1 in sources[si].iter_images(rows):
                pair = []
                for data, uid in zip((b0, b1), uid_of[(si, row)]):
                    try:
                        pair.append(_decode(data, decode_images) if check else bytes(data))
                    # Untrusted bytes: any decoder failure means "corrupt", never a crash.
                    except Exception as e:  # noqa: BLE001
                        stats["corrupt_images"] += 1
                        if len(corrupt_uids) < _LOGGED_CORRUPT:
                            log.warning("skipping corrupt image %s in %s: %s", uid, sources[si].name, e)
                            corrupt_uids.append(uid)
                if len(pair) == 2:
                    images[(si, row)] = tuple(pair)
                else:
                    stats["corrupt_rows_dropped"] += 1
                bar.update(1)
    if corrupt_uids:
        log.warning("%d corrupt image(s) skipped (first uids: %s)", stats["corrupt_images"], corrupt_uids)
    cands = [c for c in cands if (c[0], c[1]) in images]

    # Users that fell below the threshold because of corrupt images.
    counts = Counter(c[6] for c in cands)
    late_few = {u for u, n in counts.items() if n < min_pairs_per_user} | (eligible - set(counts))
    stats["pairs_dropped_few_pairs"] += sum(counts[u] for u in late_few)
    stats["users_dropped_few_pairs"] = len(few_users) + len(late_few)
    records = []
    for si, row, caption, winner, u0, u1, user, ranking in cands:
        if user in late_few:
            continue
        im = images[(si, row)]
        w, l = (0, 1) if winner == 0 else (1, 0)
        records.append(PairRecord(caption=caption, image_w=im[w], image_l=im[l], uid_w=(u0, u1)[w],
                                  uid_l=(u0, u1)[l], user_id=user, ranking_id=ranking))
    stats["kept"] = len(records)
    stats["users_kept"] = len({r.user_id for r in records})
    stats["files"] = len(sources)
    stats.setdefault("users_dropped_max_users", 0)
    stats.setdefault("pairs_dropped_max_users", 0)
    pairs = PickAPicPairs(records=records, stats=dict(stats))
    log.info("%s", format_stats(pairs.stats))
    return pairs


def format_stats(stats: dict) -> str:
    """One readable summary of `load_pairs` stats."""
    return (f"Pick-a-Pic: {stats['rows']} rows -> {stats['kept']} pairs from {stats['users_kept']} users "
            f"(dropped: {stats['ties_dropped']} ties, {stats['not_different_dropped']} identical images, "
            f"{stats['unlabeled_dropped']} unlabeled, {stats['missing_fields_dropped']} missing ids, "
            f"{stats['corrupt_rows_dropped']} with corrupt images ({stats['corrupt_images']} images), "
            f"{stats['pairs_dropped_few_pairs']} pairs of {stats['users_dropped_few_pairs']} users with too few "
            f"pairs, {stats['pairs_dropped_max_users']} pairs of {stats['users_dropped_max_users']} users over max_users)")
