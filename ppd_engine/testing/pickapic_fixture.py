"""Small parquet files in the Pick-a-Pic v2 schema, with every kind of row `load_pairs` must handle.

`write_pickapic_fixture(folder)` writes data/train-0000{0,1}-of-00002.parquet (small row groups, so
the readers cross row-group and file boundaries) and returns the stats `load_pairs(folder)` must
report with its defaults (min_pairs_per_user=4). Crafted content:

  u101: 6 clean pairs + 2 ties               -> kept (6)
  u102: 6 clean pairs, 1 of them has a truncated JPEG -> kept (5)
  u103: 4 clean pairs                        -> kept (4, exactly the threshold)
  u104: 3 clean pairs                        -> dropped, too few pairs
  u105: 4 clean pairs, 2 with garbage bytes (1 row both images) -> 2 left -> dropped, too few pairs
  u106: 1 are_different=False row, 1 has_label=False row, 1 labelled 0/0 -> nothing valid
  extra users (optional): `extra_users` users with `pairs_per_extra_user` clean pairs each.

Images are small JPEGs of varying size and aspect (e.g. 40x32, 32x48) with random content, so
center-crop code and per-image SDXL time ids see different originals. Winners alternate between
position 0 and 1 so "winner first" is exercised. Extra columns (model_0, model_1) that real
shards carry are included and must be ignored.
"""

from __future__ import annotations

import io
import os

import numpy as np

_SIZES = [(40, 32), (32, 48), (36, 36), (48, 40)]   # (width, height)


def _jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    from PIL import Image

    w, h = size
    # Smooth random colour field + noise: decodes to a real picture, different for every image.
    base = rng.uniform(0, 255, size=(1, 1, 3))
    grad = np.linspace(0, 1, w)[None, :, None] * rng.uniform(-80, 80, size=(1, 1, 3))
    arr = np.clip(base + grad + rng.normal(0, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_pickapic_fixture(folder: str, seed: int = 0, extra_users: int = 0, pairs_per_extra_user: int = 6,
                           row_group_size: int = 3, user_id_types: tuple[str, str] = ("int64", "int64"),
                           split: str = "train") -> dict:
    """Write the fixture parquet files under `folder`/data; returns the expected `load_pairs` stats.

    user_id_types: how each of the two files stores user_id ("int64", "string" or "float64", as a
    pandas export with missing ids does); the same users must come out whatever the mix.
    split: the split name the files carry (hub names "<split>-0000f-of-00002.parquet")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    counter = [0]

    def add(user: int, label_0: float = 1.0, are_different: bool = True, has_label: bool = True,
            corrupt: tuple[bool, bool] = (False, False), caption: str | None = None):
        k = counter[0]
        counter[0] += 1
        label_1 = 1.0 - label_0 if label_0 in (0.0, 1.0, 0.5) and has_label else label_0
        jpgs = []
        for j in range(2):
            data = _jpeg(rng, _SIZES[(k + j) % len(_SIZES)])
            if corrupt[j]:
                # Alternate the two real failure modes: a truncated download and non-JPEG garbage.
                data = data[: len(data) // 2] if k % 2 else b"\xff\xd8\xff\xe0 not really a jpeg"
            jpgs.append(data)
        uid0, uid1 = f"img-{k:04d}-a", f"img-{k:04d}-b"
        best = uid0 if label_0 > label_1 else (uid1 if label_1 > label_0 else "")
        rows.append(dict(caption=caption if caption is not None else f"a photo number {k} of the cat and dog",
                         jpg_0=jpgs[0], jpg_1=jpgs[1], label_0=float(label_0), label_1=float(label_1),
                         user_id=user, are_different=are_different, has_label=has_label,
                         image_0_uid=uid0, image_1_uid=uid1, ranking_id=10_000 + k, best_image_uid=best,
                         model_0="sdxl", model_1="sd2.1"))

    for i in range(6):
        add(101, label_0=float(i % 2))
    add(101, label_0=0.5)
    add(101, label_0=0.5)
    for i in range(6):
        add(102, label_0=float(i % 2), corrupt=(False, i == 2))
    for i in range(4):
        add(103, label_0=float((i + 1) % 2))
    for i in range(3):
        add(104, label_0=1.0)
    for i, bad in enumerate([(True, False), (False, False), (True, True), (False, False)]):
        add(105, label_0=float(i % 2), corrupt=bad)
    add(106, are_different=False)
    add(106, has_label=False, label_0=0.0)
    add(106, label_0=0.0, caption="labelled but no preference")
    rows[-1]["label_1"] = 0.0
    for e in range(extra_users):
        for i in range(pairs_per_extra_user):
            add(200 + e, label_0=float((i + e) % 2))

    # Interleave users across both files, as real shards do.
    order = np.random.default_rng(seed + 1).permutation(len(rows))
    rows = [rows[i] for i in order]
    data_dir = os.path.join(folder, "data")
    os.makedirs(data_dir, exist_ok=True)
    half = len(rows) // 2
    id_types = {"int64": (pa.int64(), int), "string": (pa.string(), str), "float64": (pa.float64(), float)}
    for f, part in enumerate([rows[:half], rows[half:]]):
        id_type, conv = id_types[user_id_types[f]]
        schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                            ("label_0", pa.float64()), ("label_1", pa.float64()), ("user_id", id_type),
                            ("are_different", pa.bool_()), ("has_label", pa.bool_()), ("image_0_uid", pa.string()),
                            ("image_1_uid", pa.string()), ("ranking_id", pa.int64()), ("best_image_uid", pa.string()),
                            ("model_0", pa.string()), ("model_1", pa.string())])
        table = pa.Table.from_pylist([{**r, "user_id": conv(r["user_id"])} for r in part], schema=schema)
        pq.write_table(table, os.path.join(data_dir, f"{split}-{f:05d}-of-00002.parquet"), row_group_size=row_group_size)

    extra_pairs = extra_users * pairs_per_extra_user
    extra_ok = extra_users if pairs_per_extra_user >= 4 else 0
    return dict(rows=len(rows), kept=15 + extra_ok * pairs_per_extra_user, ties_dropped=2,
                not_different_dropped=1, unlabeled_dropped=2, nonfinite_label_dropped=0, missing_fields_dropped=0,
                corrupt_images=4, corrupt_rows_dropped=3,
                pairs_dropped_few_pairs=3 + 2 + (extra_pairs if not extra_ok else 0),
                pairs_dropped_max_users=0, users_total=6 - 1 + extra_users, users_kept=3 + extra_ok,
                users_dropped_few_pairs=2 + (extra_users - extra_ok), users_dropped_max_users=0, files=2,
                files_not_parquet=0, files_ignored=0, files_other_splits=0)


def write_fixture_with_embeddings(root: str, extra_users: int = 3, du: int = 24, k: int = 2) -> tuple[str, str, list]:
    """The fixture (with `extra_users` clean users) under root/pickapic and a random (k, 1, du) embedding
    per kept user in root/users.safetensors: what a world=pickapic training run reads. Returns
    (data folder, store path, sorted user ids)."""
    import torch

    from ppd_engine.data.pickapic import load_pairs
    from ppd_engine.embed.store import EmbeddingStore

    data, store_path = os.path.join(root, "pickapic"), os.path.join(root, "users.safetensors")
    write_pickapic_fixture(data, extra_users=extra_users, pairs_per_extra_user=6)
    g = torch.Generator().manual_seed(0)
    users = sorted(load_pairs(data, progress=False).by_user())
    EmbeddingStore(store_path).append_many([(u, torch.randn(k, 1, du, generator=g), {"source": "test"})
                                            for u in users])
    return data, store_path, users


def _clean_rows(rng: np.random.Generator, prefix: str, users: list[int], pairs_each: int, jpeg=None) -> list[dict]:
    rows = []
    for u in users:
        for i in range(pairs_each):
            k = len(rows)
            uid0, uid1 = f"{prefix}-{u}-{i}-a", f"{prefix}-{u}-{i}-b"
            label_0 = float(i % 2)
            rows.append(dict(caption=f"{prefix} caption {u} {i}",
                             jpg_0=jpeg(k, 0) if jpeg else _jpeg(rng, _SIZES[k % 4]),
                             jpg_1=jpeg(k, 1) if jpeg else _jpeg(rng, _SIZES[(k + 1) % 4]),
                             label_0=label_0, label_1=1.0 - label_0, user_id=u, are_different=True, has_label=True,
                             image_0_uid=uid0, image_1_uid=uid1, ranking_id=hash((prefix, u, i)) & 0xFFFFFFF,
                             best_image_uid=uid0 if label_0 else uid1))
    return rows


def write_hub_layout(folder: str, seed: int = 0) -> dict:
    """The hub layout of Pick-a-Pic v2 in small: train in two shards (the crafted fixture above),
    validation, test and validation_unique shards with users and captions of their own, a stray
    README.md and a train-named `.parquet` that is a git-lfs pointer (what a clone without
    `git lfs pull` leaves). Returns {"train": the stats load_pairs(folder, split="train") must
    report, "captions": {split: set of that split's captions}}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    train = write_pickapic_fixture(folder, seed=seed)
    rng = np.random.default_rng(seed + 7)
    data_dir = os.path.join(folder, "data")
    captions = {}
    for j, split in enumerate(("validation", "test", "validation_unique")):
        rows = _clean_rows(rng, split, [900 + 10 * j, 901 + 10 * j], 4)
        captions[split] = {r["caption"] for r in rows}
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(data_dir, f"{split}-00000-of-00001-ab12cd.parquet"))
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("# pickapic_v2\n")
    with open(os.path.join(data_dir, "train-00002-of-00003-lfs.parquet"), "w") as f:
        f.write("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    train.update(files_ignored=1, files_other_splits=3, files_not_parquet=1)
    return {"train": train, "captions": captions}


def write_bulk_fixture(folder: str, total_image_bytes: int = 320 << 20, users: int = 400, pairs_each: int = 4,
                       row_group_size: int = 64) -> int:
    """One train shard whose JPEG columns hold about `total_image_bytes`: every image is one small
    real JPEG followed by random padding after its end-of-image marker (decoders stop at the marker,
    so the bytes are valid JPEGs that cost nothing to make). Written one row group at a time, so the
    builder's own memory stays at one row group. Returns the number of image bytes written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    base = _jpeg(rng, (32, 32))
    n_rows = users * pairs_each
    pad = max(0, total_image_bytes // (2 * n_rows) - len(base))
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    path = os.path.join(folder, "data", "train-00000-of-00001.parquet")
    written = 0
    writer = None
    try:
        for start in range(0, users, max(1, row_group_size // pairs_each)):
            chunk = list(range(start, min(users, start + max(1, row_group_size // pairs_each))))
            rows = _clean_rows(rng, "bulk", chunk, pairs_each, jpeg=lambda k, j: base + os.urandom(pad))
            written += sum(len(r["jpg_0"]) + len(r["jpg_1"]) for r in rows)
            table = pa.Table.from_pylist(rows)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="none")
            writer.write_table(table, row_group_size=row_group_size)
    finally:
        if writer is not None:
            writer.close()
    return written


def write_columns_twin(pickapic_folder: str, out: str, files: int = 2, row_group_size: int = 3) -> dict:
    """The Pick-a-Pic fixture under `pickapic_folder`/data re-written as a user's own dataset in
    `out`: every image as its own file in out/images/ (the corrupt ones too), and `files` parquet
    files with the columns text, left, right (paths relative to `out`), score_left, score_right and
    person. A row with are_different=False points both paths at one file and one with
    has_label=False has no scores, so `load_pairs` must report the same stats for both. Returns the
    data.columns mapping for it."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    rows = []
    for path in sorted(glob.glob(os.path.join(pickapic_folder, "data", "*.parquet"))):
        for r in pq.read_table(path).to_pylist():
            names = []
            for j in range(2):
                name = f"images/{r[f'image_{j}_uid']}.jpg"
                with open(os.path.join(out, name), "wb") as f:
                    f.write(r[f"jpg_{j}"])
                names.append(name)
            if not r["are_different"]:
                names[1] = names[0]
            labelled = r["has_label"]
            rows.append(dict(text=r["caption"], left=names[0], right=names[1], person=str(r["user_id"]),
                             score_left=r["label_0"] if labelled else None,
                             score_right=r["label_1"] if labelled else None))
    schema = pa.schema([("text", pa.string()), ("left", pa.string()), ("right", pa.string()),
                        ("person", pa.string()), ("score_left", pa.float64()), ("score_right", pa.float64())])
    step = -(-len(rows) // files)
    for f in range(files):
        table = pa.Table.from_pylist(rows[f * step:(f + 1) * step], schema=schema)
        pq.write_table(table, os.path.join(out, f"prefs-{f}.parquet"), row_group_size=row_group_size)
    return {"prompt": "text", "image_0": "left", "image_1": "right", "label_0": "score_left",
            "label_1": "score_right", "user_id": "person"}
