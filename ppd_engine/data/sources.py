"""Where preference pairs are read from: the files behind `data.folder`, each opened the same way.

A *source* is one file of rows that can be read column by column and group by group, so the light
columns of every row and the image columns of a few rows are read without ever holding a file whole:

- `ParquetSource`: a parquet file, local or at any fsspec URL (hf://, s3://, gs://, memory://...);
  its groups are the row groups. Over a URL only the footer and the column chunks asked for are
  fetched (HTTP range requests through fsspec's block cache), so nothing is downloaded whole.
- `ArrowSource`: an arrow file of a Hugging Face `datasets` dataset (what `save_to_disk` writes and
  `load_dataset` caches), memory-mapped; its groups are its record batches. Only the pages touched
  are read from disk, and they are file-backed, so the process's memory does not grow with the
  dataset's bytes.

`resolve(folder, split, ...)` turns `data.folder` into source names:

  a .parquet file or a folder of them  Pick-a-Pic's hub layout data/<split>-NNNNN-of-NNNNN-*.parquet,
                                       or a user's own files
  a `datasets.save_to_disk` folder     a Dataset, or a DatasetDict whose `split` is taken
  an fsspec URL                        the parquet files at or under it, read in place
  a hub dataset id (owner/name)        `datasets.load_dataset(id, split=...)` (downloads and caches it
                                       as arrow files, then reads those), or with streaming=True the
                                       hub's parquet files in place at hf://datasets/owner/name

Source names are plain strings (paths or URLs), so a reader pickled into a DataLoader worker
reopens them there instead of carrying data across processes.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections import Counter
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

_MAGIC = b"PAR1"
_HUB_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-\d+-of-\d+(-[^.]*)?\.parquet$")


class DataFileError(ValueError):
    """A data file that cannot be read as the expected schema; the message names the file."""


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def is_url(name: str) -> bool:
    return "://" in name


# ----------------------------------------------------------------------------------------------
# Sources


class ParquetSource:
    """One parquet file (a local path or an fsspec URL); groups are its row groups."""

    def __init__(self, name: str):
        self.name = name
        try:
            if is_url(name):
                import fsspec

                self._handle = fsspec.open(name, "rb").open()
                # pre_buffer: pyarrow coalesces a row group's column-chunk reads into few large
                # range requests, its setting for high-latency stores.
                self.file = pq.ParquetFile(self._handle, pre_buffer=True)
            else:
                self.file = pq.ParquetFile(name)
        except Exception as e:  # noqa: BLE001 - pyarrow/fsspec raise ArrowInvalid/OSError/...; name the file either way
            raise DataFileError(f"{name}: not a readable parquet file ({one_line(e)})") from e
        self.schema = self.file.schema_arrow
        self.columns = set(self.schema.names)
        starts, n = [], 0
        for g in range(self.file.num_row_groups):
            starts.append(n)
            n += self.file.metadata.row_group(g).num_rows
        self.group_starts = starts + [n]   # row of each group's first row, then the row count

    def iter_batches(self, batch_rows: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        try:
            yield from self.file.iter_batches(batch_size=batch_rows, columns=columns)
        except Exception as e:  # noqa: BLE001 - a corrupt page header surfaces as a thrift OSError
            raise DataFileError(f"{self.name}: corrupt parquet data ({one_line(e)})") from e

    def read_group(self, g: int, columns: list[str]) -> pa.Table:
        try:
            return self.file.read_row_group(g, columns=columns)
        except Exception as e:  # noqa: BLE001 - name the file whatever pyarrow raised
            raise DataFileError(f"{self.name}: corrupt parquet data in row group {g} ({one_line(e)})") from e


class ArrowSource:
    """One arrow file of a `datasets` dataset, memory-mapped; groups are its record batches."""

    def __init__(self, name: str):
        self.name = name
        try:
            mapped = pa.memory_map(name)
            try:   # `datasets` writes the IPC stream format; accept the file format too
                self.table = pa.ipc.open_stream(mapped).read_all()
            except pa.ArrowInvalid:
                self.table = pa.ipc.open_file(mapped).read_all()
        except Exception as e:  # noqa: BLE001 - name the file whatever pyarrow raised
            raise DataFileError(f"{name}: not a readable arrow file ({one_line(e)})") from e
        self.schema = self.table.schema
        self.columns = set(self.schema.names)
        starts, n = [], 0
        for b in self.table.to_batches():       # zero-copy views of the mapped batches
            starts.append(n)
            n += b.num_rows
        self.group_starts = starts + [n]

    def iter_batches(self, batch_rows: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        yield from self.table.select(columns).to_batches(max_chunksize=batch_rows)

    def read_group(self, g: int, columns: list[str]) -> pa.Table:
        start, end = self.group_starts[g], self.group_starts[g + 1]
        return self.table.slice(start, end - start).select(columns)


def file_identity(name: str) -> str:
    """What changes when the file `name` is replaced or edited: size and mtime of a local file; size
    and the store's version tag (hub blob id, ETag, mtime) of a URL; "missing" when it is gone."""
    if not is_url(name):
        if not os.path.exists(name):
            return "missing"
        st = os.stat(name)
        return f"{st.st_size}:{st.st_mtime_ns}"
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(name)
        info = fs.info(path)
    except (OSError, ValueError):
        return "missing"
    tag = next((info[k] for k in ("blob_id", "ETag", "etag", "mtime", "LastModified", "last_modified")
                if info.get(k) is not None), "")
    return f"{info.get('size', -1)}:{tag}"


def open_source(name: str):
    """The source of one file name that `resolve` returned."""
    return ArrowSource(name) if name.endswith(".arrow") else ParquetSource(name)


# ----------------------------------------------------------------------------------------------
# data.folder -> file names


def split_of(path: str) -> str | None:
    """The split a hub-layout parquet name says (train-00000-of-00010-x.parquet -> train), or None."""
    m = _HUB_NAME.match(os.path.basename(path))
    return m.group("split") if m else None


def _parquet_state(path: str) -> str | None:
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


def _choose_split(where: str, paths: list[str], split: str | None, stats: Counter, lenient: bool) -> list[str]:
    """The parquet files of `split` among `paths`. lenient: split applies only where the names carry
    splits (a user's own files), instead of also selecting by the old "<split>-" prefix."""
    splits = {split_of(p) for p in paths} - {None}
    if lenient and not splits:
        return paths
    if split is None and len(splits) > 1:
        raise ValueError(f"{where!r} holds the splits {', '.join(sorted(splits))}: pass split= "
                         f"(data.split / --split) so no pairs leak between them")
    if split is None:
        return paths
    chosen = [p for p in paths if split_of(p) == split]
    if not chosen and not splits:   # a flat folder without hub names: the old prefix rule
        chosen = [p for p in paths if os.path.basename(p).startswith(f"{split}-")]
    stats["files_other_splits"] = len(paths) - len(chosen)
    if not chosen:
        raise FileNotFoundError(f"no *.parquet files under {where!r} of split {split!r}"
                                + (f" (it has: {', '.join(sorted(splits))})" if splits else ""))
    return chosen


def _local_parquet(folder: str, split: str | None, stats: Counter, lenient: bool) -> list[str]:
    every = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(p))
    paths = [p for p in every if p.endswith(".parquet")]
    stats["files_ignored"] = len(every) - len(paths)
    if not paths:
        raise FileNotFoundError(f"no *.parquet files under {folder!r}")
    readable = []
    for p in _choose_split(folder, paths, split, stats, lenient):
        why = _parquet_state(p)
        if why == "truncated":
            raise DataFileError(f"{p}: truncated parquet file (no footer); download it again")
        if why is not None:
            log.warning("skipping %s: %s", p, "an empty file" if why == "empty" else "not a parquet file")
            stats["files_not_parquet"] += 1
            continue
        readable.append(p)
    if not readable:
        raise FileNotFoundError(f"no readable *.parquet files under {folder!r}" + (f" of split {split!r}" if split else ""))
    return readable


def _remote_parquet(url: str, split: str | None, stats: Counter, lenient: bool) -> list[str]:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
        if fs.isfile(root):
            return [url]
        found = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    except (OSError, ValueError, ImportError) as e:
        raise FileNotFoundError(f"{url}: cannot be listed ({one_line(e)})") from e
    if not found:
        raise FileNotFoundError(f"no *.parquet files under {url!r}")
    return [fs.unstrip_protocol(p) for p in _choose_split(url, found, split, stats, lenient)]


class MissingPackageError(ImportError, ValueError):
    """An optional package the input needs is not installed (a ValueError too, so commands print
    it as one line)."""


def is_datasets_folder(folder: str | os.PathLike) -> bool:
    """A folder `datasets.save_to_disk` wrote: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("dataset_dict.json", "state.json"))


def _need_datasets(what: str):
    try:
        import datasets
    except ImportError as e:
        raise MissingPackageError(f"{what} needs the optional `datasets` package "
                                  f"(pip install 'ppd_engine[hub]')") from e
    return datasets


def _dataset_files(ds, where: str) -> list[str]:
    """The arrow files behind a `datasets.Dataset`, refusing one whose rows are not those files' rows."""
    if getattr(ds, "_indices", None) is not None:
        raise ValueError(f"{where}: the dataset has an indices mapping (select/shuffle/filter without a rewrite); "
                         f"save it with save_to_disk and pass that folder")
    files = [f["filename"] for f in ds.cache_files]
    if not files:
        raise ValueError(f"{where}: the dataset is held in memory, not in arrow files; save it with "
                         f"save_to_disk and pass that folder")
    return files


def _saved_dataset(folder: str, split: str | None, stats: Counter) -> list[str]:
    datasets = _need_datasets(f"{folder!r} (a `datasets` save_to_disk folder)")
    ds = datasets.load_from_disk(folder)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{folder!r} is a DatasetDict with the splits {', '.join(sorted(ds))}; "
                             f"data.split / --split is {split!r}")
        stats["files_other_splits"] = sum(len(ds[s].cache_files) for s in ds if s != split)
        return _dataset_files(ds[split], f"{folder}[{split}]")
    return _dataset_files(ds, folder)


def _hub_dataset(repo_id: str, split: str | None, streaming: bool, stats: Counter, lenient: bool) -> list[str]:
    if streaming:
        # The hub's own parquet files, read in place (row groups fetched as needed).
        url = f"hf://datasets/{repo_id}"
        try:
            return _remote_parquet(url, split, stats, lenient)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}; a dataset the hub stores in another format has a parquet copy at "
                                    f"hf://datasets/{repo_id}@refs%2Fconvert%2Fparquet (pass that as the folder), "
                                    f"or load it without streaming") from e
    datasets = _need_datasets(f"{repo_id!r} is not a local folder; loading it from the hub")
    ds = datasets.load_dataset(repo_id, split=split or "train")
    return _dataset_files(ds, f"{repo_id}[{split or 'train'}]")


def resolve(folder: str, split: str | None, stats: Counter, *, streaming: bool = False, lenient: bool = False) -> list[str]:
    """The file names `folder` stands for (see the module doc), in a fixed order. `stats` gets
    files_ignored / files_other_splits / files_not_parquet counts. lenient: `split` only selects
    where the data carries splits (a user's own files may have none)."""
    folder = str(folder)
    if is_url(folder):
        return _remote_parquet(folder, split, stats, lenient)
    if streaming and os.path.exists(folder):
        log.warning("data.streaming / --streaming applies to hub ids; %s is a local path and is read from disk "
                    "as always", folder)
    if os.path.isfile(folder):
        if folder.endswith(".parquet"):
            return [folder]
        raise DataFileError(f"{folder}: not a .parquet file, a folder of them or a `datasets` folder")
    if os.path.isdir(folder):
        if is_datasets_folder(folder):
            return _saved_dataset(folder, split, stats)
        return _local_parquet(folder, split, stats, lenient)
    # owner/name is a hub id, unless "owner" is a folder here (a mistyped local path, not a download).
    if folder.startswith(("/", ".", "~")) or folder.count("/") != 1 or os.path.isdir(folder.split("/")[0]):
        raise FileNotFoundError(f"data folder {folder!r} does not exist (nor is it a hub id owner/name or a URL)")
    return _hub_dataset(folder, split, streaming, stats, lenient)
