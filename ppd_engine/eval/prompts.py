"""Evaluation prompt sets: PartiPrompts (shipped with the package), Pick-a-Pic captions, or a file.

Every loader returns a list of `EvalPrompt`; the position in that list is the image index used in
output paths (`OUT/<checkpoint>/<user>/<index>.png`) and the seed offset, so the same prompt gets the
same seed for every checkpoint and user.
"""

from __future__ import annotations

import csv
import importlib.resources
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

PARTI_COLUMNS = ("Prompt", "Category", "Challenge", "Note")


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    category: str = ""       # PartiPrompts category ("" where the source has none)
    challenge: str = ""      # PartiPrompts challenge ("" where the source has none)


@dataclass
class PromptSet:
    name: str                # "parti" | "pickapic" | the file path
    prompts: list[EvalPrompt]
    skipped: int = 0         # corrupt / empty rows dropped while reading

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    @property
    def has_categories(self) -> bool:
        return any(p.category for p in self.prompts)


def _apply_limit(prompts: list[EvalPrompt], limit: int | None) -> list[EvalPrompt]:
    if limit is None:
        return prompts
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return prompts[:limit]


def _read_tsv(lines, source: str, require_category: bool) -> tuple[list[EvalPrompt], int]:
    # PartiPrompts is raw TSV (quotes belong to the prompt text, e.g. `"G I G G L E" painted ...`),
    # so csv quoting must be off or those quotes would be eaten.
    reader = csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    if reader.fieldnames is None or "Prompt" not in reader.fieldnames:
        raise ValueError(f"{source}: no 'Prompt' column in the header (got {reader.fieldnames})")
    if require_category and "Category" not in reader.fieldnames:
        raise ValueError(f"{source}: no 'Category' column in the header (got {reader.fieldnames})")
    prompts, skipped = [], 0
    for row in reader:
        text = (row.get("Prompt") or "").strip()
        if not text or None in row:  # None key = more cells than header columns
            skipped += 1
            continue
        prompts.append(EvalPrompt(text, (row.get("Category") or "").strip(),
                                  (row.get("Challenge") or "").strip()))
    return prompts, skipped


def load_parti(limit: int | None = None) -> PromptSet:
    """PartiPrompts (1632 prompts, 12 categories) from the copy shipped in `ppd_engine/data`."""
    res = importlib.resources.files("ppd_engine").joinpath("data/PartiPrompts.tsv")
    with res.open("r", encoding="utf-8", newline="") as f:
        prompts, skipped = _read_tsv(f, "PartiPrompts.tsv", require_category=True)
    if skipped:
        log.warning("PartiPrompts.tsv: skipped %d malformed rows", skipped)
    return PromptSet("parti", _apply_limit(prompts, limit), skipped)


def _parquet_files(folder: Path) -> list[Path]:
    files = sorted(folder.rglob("*.parquet"))
    # A full Pick-a-Pic download holds every split side by side; take only validation_unique then.
    unique = [f for f in files if "validation_unique" in str(f.relative_to(folder))]
    return unique or files


def _caption_batches(folder: str, stats) -> Iterator[tuple[str, object]]:
    """(file name, caption column or the error reading it) for each file the captions come from."""
    from ppd_engine.data.sources import is_datasets_folder, open_source, resolve

    path = Path(folder)
    if path.is_dir() and not is_datasets_folder(path):
        import pyarrow.parquet as pq

        files = _parquet_files(path)
        if not files:
            raise FileNotFoundError(f"no .parquet files under {folder}")
        for f in files:
            try:
                schema = pq.read_schema(f)
                if "caption" not in schema.names:
                    raise ValueError(f"no 'caption' column (columns: {schema.names})")
                yield str(f), pq.read_table(f, columns=["caption"]).column("caption").to_pylist()
            except Exception as e:  # noqa: BLE001 - a broken shard must not sink the whole evaluation
                yield str(f), e
        return
    # A `datasets` folder, a hub id or a URL: its validation_unique split (data/sources.py).
    for name in resolve(folder, "validation_unique", stats, lenient=True):
        try:
            src = open_source(name)
            if "caption" not in src.columns:
                raise ValueError(f"no 'caption' column (columns: {sorted(src.columns)})")
            yield name, [c for b in src.iter_batches(4096, ["caption"]) for c in b.column(0).to_pylist()]
        except Exception as e:  # noqa: BLE001 - as above
            yield name, e


def load_pickapic_captions(folder: str | os.PathLike, limit: int | None = None) -> PromptSet:
    """Unique captions (first occurrence order) of Pick-a-Pic's `validation_unique` split (500
    captions): a folder of parquet files (when it holds several splits, only files whose path
    contains `validation_unique` are read), or a `datasets` folder, hub id or URL (its
    validation_unique split). Unreadable files and empty captions are skipped and counted.
    """
    from collections import Counter

    seen: set[str] = set()
    prompts: list[EvalPrompt] = []
    skipped = 0
    for name, captions in _caption_batches(str(folder), Counter()):
        if isinstance(captions, Exception):
            log.warning("skipping %s: %s", name, captions)
            skipped += 1
            continue
        for cap in captions:
            text = cap.strip() if isinstance(cap, str) else ""
            if not text:
                skipped += 1
                continue
            if text not in seen:
                seen.add(text)
                prompts.append(EvalPrompt(text))
    if not prompts:
        raise ValueError(f"no usable captions in {folder} ({skipped} files/rows skipped)")
    if skipped:
        log.warning("Pick-a-Pic captions: skipped %d unreadable files / empty captions", skipped)
    return PromptSet("pickapic", _apply_limit(prompts, limit), skipped)


def load_prompt_file(path: str | os.PathLike, limit: int | None = None) -> PromptSet:
    """A `.tsv` with a `Prompt` column (optional `Category`, `Challenge`), or plain text, one per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    with path.open("r", encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".tsv":
            prompts, skipped = _read_tsv(f, str(path), require_category=False)
        else:
            prompts, skipped = [], 0
            for line in f:
                text = line.strip()
                if text:
                    prompts.append(EvalPrompt(text))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return PromptSet(str(path), _apply_limit(prompts, limit), skipped)


def load_prompts(spec: str, limit: int | None = None,
                 pickapic_dir: str | os.PathLike | None = None) -> PromptSet:
    """`spec` is "parti", "pickapic" (needs `pickapic_dir`) or a prompt file path."""
    if spec == "parti":
        return load_parti(limit)
    if spec == "pickapic":
        if pickapic_dir is None:
            raise ValueError("--prompts pickapic needs --pickapic-dir (a folder of Pick-a-Pic "
                             "validation_unique parquet files)")
        return load_pickapic_captions(pickapic_dir, limit)
    return load_prompt_file(spec, limit)
