"""data.format=columns: a user's own parquet, mapped onto Pick-a-Pic's fields, loads through the same
bounded-memory path (same filtering, same records, images read on demand); a bad mapping is refused
naming it; a dataset without user ids trains the non-personalized objective through the CLI."""

import io
import json
import logging
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from ppd_engine.config import ConfigError, load_config
from ppd_engine.data.columns import NO_USER, ColumnMap
from ppd_engine.data.pickapic import DataFileError, load_pairs
from ppd_engine.testing.pickapic_fixture import write_columns_twin, write_pickapic_fixture
from ppd_engine.testing.tiny_pipelines import make_tiny_pipeline


def _view(pairs):
    """What a pair is, whatever the schema: caption, user, winner bytes, loser bytes, in record order."""
    return [(r.caption, r.user_id, r.image_w, r.image_l) for r in pairs.records]


def test_columns_twin_loads_the_same_records_and_stats_as_pickapic(tmp_path):
    pic, own = tmp_path / "pickapic", tmp_path / "own"
    write_pickapic_fixture(str(pic), user_id_types=("int64", "string"))
    mapping = write_columns_twin(str(pic), str(own))
    want = load_pairs(str(pic), decode_images=False, progress=False)
    got = load_pairs(str(own), decode_images=False, progress=False, columns=ColumnMap.parse(mapping))
    assert _view(got) == _view(want) and len(want.records) == 15
    drop = ("files", "files_ignored")          # the twin's 2 x 28 image files sit in its folder
    assert {k: v for k, v in got.stats.items() if k not in drop} == {k: v for k, v in want.stats.items() if k not in drop}
    assert got.stats["files_ignored"] == 56 and got.stats["files"] == want.stats["files"] == 2
    # The index holds locations only; the reader turns the path cells into the files' bytes.
    index = load_pairs(str(own), progress=False, load_images=False, columns=ColumnMap.parse(mapping))
    assert all(r.image_w is None for r in index.records)
    reader = pickle.loads(pickle.dumps(index.image_reader()))     # what a DataLoader worker gets
    clean = load_pairs(str(pic), decode_images=False, progress=False, min_pairs_per_user=1)
    by_caption = {r.caption: (r.image_w, r.image_l) for r in clean.records}
    read = list(reader.iter_pairs(index.records))
    assert len(read) == len(index.records) > 15
    assert all((b_w, b_l) == by_caption[r.caption] for r, b_w, b_l in read if r.caption in by_caption)


def test_chosen_rejected_bytes_and_label_index_forms_give_the_same_pairs(tmp_path):
    rng = np.random.default_rng(0)

    def png(k):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8 + k % 3, 8, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
        return buf.getvalue()

    imgs = [(png(2 * k), png(2 * k + 1)) for k in range(6)]
    winner = [k % 2 for k in range(6)]                      # which of the two was preferred
    pq.write_table(pa.table({"q": [f"p{k}" for k in range(6)],
                             "good": [imgs[k][winner[k]] for k in range(6)],
                             "bad": [imgs[k][1 - winner[k]] for k in range(6)]}), tmp_path / "cr.parquet",
                   row_group_size=4)
    pq.write_table(pa.table({"q": [f"p{k}" for k in range(6)], "a": [i[0] for i in imgs], "b": [i[1] for i in imgs],
                             "pick": pa.array(winner, pa.int64())}), tmp_path / "lab.parquet")
    cr = load_pairs(str(tmp_path / "cr.parquet"), decode_images=False, progress=False,
                    columns=ColumnMap.parse({"prompt": "q", "chosen": "good", "rejected": "bad"}))
    lab = load_pairs(str(tmp_path / "lab.parquet"), decode_images=False, progress=False,
                     columns=ColumnMap.parse({"prompt": "q", "image_0": "a", "image_1": "b", "label": "pick"}))
    want = [(f"p{k}", NO_USER, imgs[k][winner[k]], imgs[k][1 - winner[k]]) for k in range(6)]
    assert _view(cr) == want and _view(lab) == want
    # Without decoding at load, the on-demand reader gives the same bytes (across row groups).
    index = load_pairs(str(tmp_path / "cr.parquet"), progress=False, load_images=False,
                       columns=ColumnMap.parse({"prompt": "q", "chosen": "good", "rejected": "bad"}))
    assert [(r.caption, b_w, b_l) for r, b_w, b_l in index.image_reader().iter_pairs(index.records)] == \
        [(c, w, lo) for c, _, w, lo in want]


@pytest.mark.parametrize("mapping, fragment", [
    ({"prompt": "t", "image_0": "a", "image_1": "b", "label": "l", "promt": "x"}, "'promt'"),
    ({"prompt": "t", "chosen": "a", "rejected": "b", "label": "l"}, "chosen/rejected"),
    ({"prompt": "t", "image_0": "a", "image_1": "b"}, "label"),
    ({"image_0": "a", "image_1": "b", "label": "l"}, "prompt"),
])
def test_a_bad_mapping_is_refused_at_config_time_naming_it(mapping, fragment, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"format": "columns", "columns": mapping}}))
    with pytest.raises(ConfigError, match=fragment) as e:
        load_config(str(path))
    assert str(e.value).startswith("data.columns")
    with pytest.raises(ConfigError, match="data.columns.*data.format=columns"):
        load_config(None, ["data.columns.prompt=text"])


def test_a_mapped_column_the_file_lacks_or_mistypes_is_named_with_the_file(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a"], "x": [b"1"], "y": [b"2"], "lab": ["left"]}), path)
    with pytest.raises(KeyError, match=r"p\.parquet: no column 'right' \(data.columns.image_1\)"):
        load_pairs(str(path), progress=False,
                   columns=ColumnMap.parse({"prompt": "text", "image_0": "x", "image_1": "right", "label": "lab"}))
    with pytest.raises(DataFileError, match=r"p\.parquet: column 'lab' \(data.columns.label\) has type string"):
        load_pairs(str(path), progress=False,
                   columns=ColumnMap.parse({"prompt": "text", "image_0": "x", "image_1": "y", "label": "lab"}))


def _png_dataset(folder, n=8):
    """A user's dataset without user ids: PNG files beside the parquet, chosen/rejected path columns."""
    rng = np.random.default_rng(1)
    (folder / "img").mkdir(parents=True)
    for k in range(2 * n):
        Image.fromarray(rng.integers(0, 255, (24 + 4 * (k % 2), 24, 3), dtype=np.uint8), "RGB").save(
            folder / "img" / f"{k}.png")
    pq.write_table(pa.table({"prompt": [f"a red thing {k}" for k in range(n)],
                             "win": [f"img/{2 * k}.png" for k in range(n)],
                             "lose": [f"img/{2 * k + 1}.png" for k in range(n)]}), folder / "mine.parquet")


def _as_saved_dataset(folder):
    """The PNG dataset as a Hugging Face `datasets` save_to_disk folder with Image() columns."""
    datasets = pytest.importorskip("datasets")
    rows = pq.read_table(folder / "mine.parquet").to_pydict()
    image = {"win": [], "lose": []}
    for col in image:
        image[col] = [{"bytes": (folder / p).read_bytes(), "path": None} for p in rows[col]]
    features = datasets.Features({"prompt": datasets.Value("string"), "win": datasets.Image(), "lose": datasets.Image()})
    datasets.Dataset.from_dict({"prompt": rows["prompt"], **image}, features=features).save_to_disk(
        str(folder.parent / "saved"), num_shards=2)
    return folder.parent / "saved"


@pytest.mark.slow  # ~20 s each: cache build and one step on a tiny SD1.5
@pytest.mark.parametrize("form", ["parquet", "datasets"])
def test_a_dataset_without_user_ids_trains_non_personalized_through_the_cli(tmp_path, caplog, form):
    from ppd_engine.train import main

    _png_dataset(tmp_path / "mine")
    data = tmp_path / "mine" if form == "parquet" else _as_saved_dataset(tmp_path / "mine")
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="ppd_engine.worlds.pickapic"):
        rc = main(["world=pickapic", f"data.folder={data}", "data.format=columns",
                   "data.columns.prompt=prompt", "data.columns.chosen=win", "data.columns.rejected=lose",
                   "adapters.user_dim=16", "model.family=sd15",
                   f"model.pretrained={make_tiny_pipeline('sd15', str(tmp_path / 'sd15'), seed=1)}",
                   "model.resolution=32", f"cache.dir={tmp_path / 'cache'}", f"log.run_dir={run}",
                   "train.pairs_per_step=4", "train.micro_batch=2", "train.mixed_precision=fp32", "optim.lr=1e-3",
                   "optim.min_8bit_size=256", "log.report_to=none", "log.progress=false", "checkpoint.every=0",
                   "train.max_steps=1"])
    assert rc == 0
    said = [r.getMessage() for r in caplog.records if "non-personalized" in r.getMessage()]
    assert len(said) == 1 and "all 8 pairs" in said[0]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["personalized"] is False
    record = json.loads((run / "data.json").read_text())
    assert record["format"] == "columns" and record["stats"]["kept"] == 8
    assert all(f.endswith(".arrow" if form == "datasets" else ".parquet") for f in record["files"])


def test_a_path_to_a_missing_image_is_a_corrupt_image_named_by_its_path(tmp_path, caplog):
    _png_dataset(tmp_path)
    (tmp_path / "img" / "3.png").unlink()            # pair 1's loser
    with caplog.at_level(logging.WARNING):
        pairs = load_pairs(str(tmp_path / "mine.parquet"), progress=False, min_pairs_per_user=1,
                           columns=ColumnMap.parse({"prompt": "prompt", "chosen": "win", "rejected": "lose"}))
    assert [r.caption for r in pairs.records] == [f"a red thing {k}" for k in range(8) if k != 1]
    assert pairs.stats["corrupt_images"] == 1 and pairs.stats["corrupt_rows_dropped"] == 1
    assert any(str(tmp_path / "img" / "3.png") in r.getMessage() for r in caplog.records)
