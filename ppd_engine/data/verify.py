"""Opt-in verification of every JPEG of a pair index, with worker processes, remembered on disk.

The cache build and `embed` find corrupt images as they decode them anyway; this pass is for
commands that do not decode (the judge's agreement sampling, statistics) or for knowing up front.
The answer is written to a small JSON memo keyed by the parquet files' fingerprint (name, size and
mtime of each file), so a later command over the same files reads it instead of decoding again:

  python -m ppd_engine.data.verify --data /data/pickapic_v2 --split train --workers 8 --memo verified-train.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ppd_engine.cli.common import (DefaultsFormatter, UsageError, add_data, add_debug, add_progress, cli_errors,
                                   data_columns)
from ppd_engine.data.pickapic import PickAPicPairs, _decode, format_stats, load_pairs
from ppd_engine.data.sources import file_identity
from ppd_engine.files import write_json_atomic

log = logging.getLogger(__name__)
MEMO_FORMAT = "ppd-verified/1"


def files_fingerprint(paths: list[str]) -> str:
    """sha256 over (name, size, version) of each file, local or at a URL (sources.file_identity):
    changes whenever a file is replaced or edited."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{os.path.basename(p)}:{file_identity(p)};".encode())
    return h.hexdigest()


class _Decode(IterableDataset):
    """uid of every image of the units (row groups) that does not decode; workers split the units."""

    def __init__(self, reader, units):
        self.reader, self.units = reader, units

    def __iter__(self):
        info = get_worker_info()
        units = self.units if info is None else self.units[info.id::info.num_workers]
        for unit in units:
            for rec, b_w, b_l in self.reader.read_unit(*unit):
                for uid, data in ((rec.uid_w, b_w), (rec.uid_l, b_l)):
                    try:
                        _decode(data, keep=False)
                    # Untrusted bytes: any decoder failure means "corrupt".
                    except Exception:  # noqa: BLE001
                        yield uid
                yield None   # one tick per pair, for the progress bar


def find_corrupt(pairs: PickAPicPairs, workers: int = 0, memo: str | None = None, progress: bool = True) -> set[str]:
    """uids of the images of `pairs.records` that do not decode, from `memo` when it matches the files."""
    from tqdm.auto import tqdm

    fp = files_fingerprint(pairs.sources)
    if memo and os.path.exists(memo):
        with open(memo) as f:
            doc = json.load(f)
        if doc.get("format") == MEMO_FORMAT and doc.get("files") == fp:
            checked = set(doc["checked"])
            if all(r.pair_id in checked for r in pairs.records):
                log.info("verify: %s answers for these files; nothing decoded", memo)
                return set(doc["corrupt"])
    reader = pairs.image_reader()
    units = reader.row_groups(pairs.records)
    bad: set[str] = set()
    loader = DataLoader(_Decode(reader, units), batch_size=None, num_workers=workers)
    with tqdm(total=len(pairs.records), desc="verifying JPEGs", unit="pair", disable=not progress) as bar:
        for uid in loader:
            if uid is None:
                bar.update(1)
            else:
                bad.add(uid)
    if memo:
        write_json_atomic(memo, {"format": MEMO_FORMAT, "files": fp, "corrupt": sorted(bad),
                                 "checked": sorted(r.pair_id for r in pairs.records)})
    return bad


@cli_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ppd_engine.data.verify", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsFormatter)
    add_data(p, "the pairs to verify", "train", "the split verified")
    p.add_argument("--min-pairs-per-user", type=int, default=4, help="as the command that will use the pairs")
    p.add_argument("--workers", type=int, default=4, help="decoding processes")
    p.add_argument("--memo", required=True, help="JSON file the answer is remembered in")
    add_progress(p)
    add_debug(p)
    args = p.parse_args(argv)
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    pairs = load_pairs(args.data, min_pairs_per_user=args.min_pairs_per_user, split=args.split,
                       streaming=args.streaming, columns=data_columns(args), load_images=False, progress=args.progress)
    bad = find_corrupt(pairs, workers=args.workers, memo=args.memo, progress=args.progress)
    print(format_stats(pairs.drop_corrupt(bad, args.min_pairs_per_user).stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
