"""Pick-a-Pic v2 loading: every drop reason counted, winner first, splits deterministic and disjoint."""

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ppd_engine.data.pickapic import load_pairs
from ppd_engine.testing.pickapic_fixture import write_pickapic_fixture

DROP_KEYS = ("ties_dropped", "not_different_dropped", "unlabeled_dropped", "nonfinite_label_dropped",
             "missing_fields_dropped",
             "corrupt_rows_dropped", "pairs_dropped_few_pairs", "pairs_dropped_max_users")


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pickapic"))
    expected = write_pickapic_fixture(folder, seed=3)
    return folder, expected


@pytest.fixture(scope="module")
def pairs(fixture_dir):
    return load_pairs(fixture_dir[0], progress=False)


def _rows(folder):
    table = pa.concat_tables(pq.read_table(os.path.join(folder, "data", f)) for f in sorted(os.listdir(os.path.join(folder, "data"))))
    return {r["ranking_id"]: r for r in table.to_pylist()}


def test_every_stat_matches_the_crafted_rows(fixture_dir, pairs):
    _, expected = fixture_dir
    for key in ("rows", "kept", "ties_dropped", "not_different_dropped", "unlabeled_dropped", "corrupt_images",
                "users_kept", "users_dropped_few_pairs"):
        assert key in pairs.stats
    assert pairs.stats == expected
    assert pairs.stats["rows"] == pairs.stats["kept"] + sum(pairs.stats[k] for k in DROP_KEYS)
    assert len(pairs.records) == expected["kept"]
    assert sorted(pairs.by_user()) == ["101", "102", "103"]
    assert [len(v) for v in pairs.by_user().values()] == [6, 5, 4]


def test_winner_first_and_images_match_the_parquet(fixture_dir, pairs):
    rows = _rows(fixture_dir[0])
    flipped = 0
    for r in pairs.records:
        row = rows[int(r.ranking_id)]
        w = 0 if row["label_0"] > row["label_1"] else 1
        flipped += w
        assert (r.uid_w, r.uid_l) == (row[f"image_{w}_uid"], row[f"image_{1 - w}_uid"])
        assert r.uid_w == row["best_image_uid"]
        assert r.caption == row["caption"] and r.user_id == str(row["user_id"])
        want = np.asarray(Image.open(io.BytesIO(row[f"jpg_{w}"])).convert("RGB"))
        assert r.image_w.mode == "RGB" and np.array_equal(np.asarray(r.image_w), want)
        assert r.image_l.size == Image.open(io.BytesIO(row[f"jpg_{1 - w}"])).size
    assert 0 < flipped < len(pairs.records)   # winners sit in both positions in the fixture


def test_bytes_mode_same_counts_and_deterministic_order(fixture_dir, pairs):
    raw = load_pairs(fixture_dir[0], decode_images=False, progress=False)
    assert raw.stats == pairs.stats
    assert all(isinstance(r.image_w, bytes) and isinstance(r.image_l, bytes) for r in raw.records)
    assert [r.pair_id for r in raw.records] == [r.pair_id for r in pairs.records]
    # Without verification the corrupt bytes get through: they are then the cache builder's job.
    unverified = load_pairs(fixture_dir[0], decode_images=False, verify_images=False, progress=False)
    assert unverified.stats["corrupt_images"] == 0 and unverified.stats["kept"] == pairs.stats["kept"] + 1 + 4  # u102 row back, u105 kept


def test_corrupt_rows_are_counted_and_logged(fixture_dir, caplog):
    with caplog.at_level("WARNING", logger="ppd_engine.data.pickapic"):
        p = load_pairs(fixture_dir[0], progress=False)
    assert p.stats["corrupt_images"] == 4 and p.stats["corrupt_rows_dropped"] == 3
    assert "corrupt" in caplog.text and "img-" in caplog.text


def test_max_users_and_min_pairs(fixture_dir):
    folder = fixture_dir[0]
    p = load_pairs(folder, max_users=2, progress=False)
    # Before corrupt images: 101 (6), 102 (6), 103 (4), 105 (4) pass; the two largest win, ties by id.
    assert sorted(p.by_user()) == ["101", "102"]
    assert p.stats["users_dropped_max_users"] == 2 and p.stats["pairs_dropped_max_users"] == 8
    assert p.stats["corrupt_images"] == 1           # u105's bytes are never read
    assert p.stats["rows"] == p.stats["kept"] + sum(p.stats[k] for k in DROP_KEYS)
    p3 = load_pairs(folder, min_pairs_per_user=3, progress=False)
    assert sorted(p3.by_user()) == ["101", "102", "103", "104"]
    assert p3.stats["users_dropped_few_pairs"] == 1 and p3.stats["pairs_dropped_few_pairs"] == 2


def test_missing_column_names_column_and_file(tmp_path, fixture_dir):
    src = os.path.join(fixture_dir[0], "data", "train-00001-of-00002.parquet")
    table = pq.read_table(src).drop_columns(["has_label"])
    (tmp_path / "data").mkdir()
    bad = str(tmp_path / "data" / "train-00000-of-00001.parquet")
    pq.write_table(table, bad)
    with pytest.raises(KeyError) as e:
        load_pairs(str(tmp_path), progress=False)
    assert "'has_label'" in str(e.value) and bad in str(e.value)


def test_missing_folder_and_split(tmp_path, fixture_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(str(tmp_path / "nope"), progress=False)
    with pytest.raises(FileNotFoundError, match="validation"):
        load_pairs(fixture_dir[0], split="validation", progress=False)
    assert load_pairs(fixture_dir[0], split="train", progress=False).stats["kept"] == 15


def test_few_shot_split_disjoint_and_deterministic(pairs):
    shots, train = pairs.few_shot_split(n_shots=4, seed=0)
    assert sorted(shots) == ["101", "102", "103"] and all(len(v) == 4 for v in shots.values())
    shot_ids = {r.pair_id for v in shots.values() for r in v}
    train_ids = [r.pair_id for r in train]
    assert not shot_ids & set(train_ids)
    assert shot_ids | set(train_ids) == {r.pair_id for r in pairs.records}
    assert all(r.user_id == u for u, v in shots.items() for r in v)
    assert sum(1 for r in train if r.user_id == "103") == 0   # 4 pairs, all held out as shots
    again = pairs.few_shot_split(n_shots=4, seed=0)
    assert {u: [r.pair_id for r in v] for u, v in again[0].items()} == {u: [r.pair_id for r in v] for u, v in shots.items()}
    assert [r.pair_id for r in again[1]] == train_ids
    others = [{r.pair_id for v in pairs.few_shot_split(4, seed=s)[0].values() for r in v} for s in range(1, 6)]
    assert any(o != shot_ids for o in others)
    shots5, train5 = pairs.few_shot_split(n_shots=5, seed=0)
    assert sorted(shots5) == ["101", "102"] and all(r.user_id != "103" for r in train5)


def test_user_split_disjoint_and_deterministic(pairs):
    seen, unseen = pairs.user_split(unseen_fraction=0.34, seed=7)
    assert len(unseen) == 1 and len(seen) == 2 and not set(seen) & set(unseen)
    assert sorted(seen + unseen) == ["101", "102", "103"]
    assert pairs.user_split(unseen_fraction=0.34, seed=7) == (seen, unseen)
    assert len({tuple(pairs.user_split(0.34, seed=s)[1]) for s in range(10)}) > 1
    assert pairs.user_split(unseen_fraction=0.0) == (["101", "102", "103"], [])
    with pytest.raises(ValueError, match="unseen_fraction"):
        pairs.user_split(unseen_fraction=1.5)
