"""User-embedding store: a folder of shards that appends without rewriting and loads lazily.

STORE/ (the path names a folder)
  store.json                    {"format": "ppd-user-embeddings/2"}: marks the folder as a store
  <writer>-NNNNN.safetensors    one tensor per user of that append, key "user/<user_id>", (k, T_in, Du)
  <writer>-NNNNN.jsonl          one line per user: {"user", "records": [one dict per embedding]}
                                (profile text, shot uids and captions, model id, prompt sha256, ...)
  <writer>-NNNNN.json           the shard's index, written last: user -> [k, byte offset, byte length
                                of its jsonl line], shape, dtype, and the sha256 of the shard's
                                .safetensors and .jsonl. A shard without it is not committed.

A user's embeddings are the concatenation of its entries over the shards in name order, so a
user can gain embeddings in a later append. Every user shares (T_in, Du) (T_in = 1 for
layers=last, num_layers + 1 for layers=all).

Why shards: one safetensors file refuses a header over 100 MB (the old format stored ~6 KB of
metadata per record in it and failed partway through 5k users x 4 chunks), and rewriting it per
append costs quadratic I/O. Here an append writes one new shard; a reader opens the small indexes
only and reads a user's tensor (memory-mapped) and jsonl line (one seek) on first use, so a
training rank holds only the users it trains. Several writers (one per torchrun rank, `writer=`)
can append to one folder at once: their shard names never collide, and the union of their shards
is the store. Non-finite embeddings are refused on append and again when a user is read.
The first read from a shard's .safetensors or .jsonl hashes that whole file (one sequential read)
and refuses it, naming the file, when it differs from the sha256 its index recorded.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Any, Iterable, Mapping

import torch

from ppd_engine.files import TEMP_PREFIX, save_safetensors_atomic, write_json_atomic, write_text_atomic
from ppd_engine.integrity import CorruptFileError, sha256_file

log = logging.getLogger(__name__)

FORMAT = "ppd-user-embeddings/2"
_PREFIX = "user/"
_MARKER = "store.json"
_SHARD = re.compile(r"^(?P<writer>[A-Za-z0-9_]+)-(?P<n>\d{5})\.json$")


class StoreError(CorruptFileError):
    """A store folder that cannot be read; the message names the file or the user."""


class EmbeddingStore:
    """Mapping user_id -> Tensor (K, T_in, Du), backed by the folder `path` (see module doc).

    writer: the shard-name prefix this object appends with (e.g. "r0", "r1" per torchrun rank)."""

    def __init__(self, path: str, writer: str = "r0"):
        if not re.fullmatch(r"[A-Za-z0-9_]+", writer):
            raise ValueError(f"writer must be letters, digits or _, got {writer!r}")
        self.path = str(path)
        self.writer = writer
        if os.path.isfile(self.path):
            raise StoreError(f"{self.path} is a file, not a user-embedding store (a store is a folder written by "
                             f"python -m ppd_engine.embed)")
        self._where: dict[str, list[tuple[str, int, int, int]]] = {}   # user -> [(shard, k, offset, length)]
        self._tensors: dict[str, torch.Tensor] = {}
        self._meta: dict[str, list[dict]] = {}
        self._shape: tuple[int, int] | None = None
        self._dtype: str | None = None
        self._shards: list[str] = []
        self._sha256: dict[str, str | None] = {}   # shard file name -> sha256 its index recorded
        self._verified: set[str] = set()            # shard files already hashed by this object
        if os.path.isdir(self.path):
            self._open()

    # -- reading ------------------------------------------------------------------------------
    def _open(self) -> None:
        marker = os.path.join(self.path, _MARKER)
        if not os.path.exists(marker):
            raise StoreError(f"{self.path} is not a user-embedding store (no {_MARKER})")
        doc = _read_json(marker)
        if doc.get("format") != FORMAT:
            raise StoreError(f"{marker}: unsupported store format {doc.get('format')!r} (want {FORMAT})")
        names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.path, "*-*.json")))
        for name in names:
            if not _SHARD.match(name):
                continue
            idx = _read_json(os.path.join(self.path, name))
            shard = name[: -len(".json")]
            shape = tuple(idx["shape"])
            if self._shape is not None and shape != self._shape:
                raise StoreError(f"{os.path.join(self.path, name)}: (T_in, Du) = {shape}, other shards hold {self._shape}")
            self._shape, self._dtype = shape, idx["dtype"]
            for user, (k, off, length) in idx["users"].items():
                self._where.setdefault(user, []).append((shard, int(k), int(off), int(length)))
            self._note_hashes(shard, idx.get("sha256"))
            self._shards.append(shard)
        unhashed = sorted({n.rsplit(".", 1)[0] for n, h in self._sha256.items() if h is None})
        if unhashed:
            log.warning("%s: %d shard(s) record no sha256 (written before ppd_engine recorded them; e.g. %s); "
                        "they are not verified", self.path, len(unhashed), unhashed[0])

    def _note_hashes(self, shard: str, hashes: dict | None) -> None:
        for ext in ("safetensors", "jsonl"):
            self._sha256[f"{shard}.{ext}"] = (hashes or {}).get(ext)

    def _verified_path(self, name: str) -> str:
        """Path of the shard file `name`, hashed against its index on this object's first use of it."""
        path = os.path.join(self.path, name)
        if name in self._verified:
            return path
        want = self._sha256.get(name)
        if want is not None:
            try:
                got = sha256_file(path)
            except OSError as e:
                raise StoreError(f"{path}: cannot read it ({e.strerror or e})") from e
            if got != want:
                raise StoreError(f"{path}: content does not match the sha256 in its index "
                                 f"{name.rsplit('.', 1)[0]}.json (corrupted file); re-embed its users or remove "
                                 f"that shard's three files")
        self._verified.add(name)
        return path

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._where

    def users(self) -> list[str]:
        """Sorted user ids."""
        return sorted(self._where)

    def count(self, user_id: str) -> int:
        """How many embeddings `user_id` has (0 when absent), without reading them."""
        return sum(k for _, k, _, _ in self._where.get(user_id, []))

    def _require(self, user_id: str) -> None:
        if user_id not in self._where:
            raise KeyError(f"user {user_id!r} is not in the store {self.path} ({len(self)} users)")

    def get(self, user_id: str) -> torch.Tensor:
        """(K, T_in, Du) embeddings of `user_id`, read on first use; non-finite values are refused."""
        self._require(user_id)
        t = self._tensors.get(user_id)
        if t is None:
            from safetensors import safe_open

            parts = []
            for shard, _, _, _ in self._where[user_id]:
                path = self._verified_path(shard + ".safetensors")
                try:
                    with safe_open(path, framework="pt") as f:
                        parts.append(f.get_tensor(_PREFIX + user_id))
                except Exception as e:  # noqa: BLE001 - truncated or foreign file: name it, one line
                    raise StoreError(f"{path}: cannot read user {user_id!r} ({str(e).splitlines()[0] if str(e) else e!r})") from e
            t = torch.cat(parts) if len(parts) > 1 else parts[0]
            if not torch.isfinite(t).all():
                raise StoreError(f"{self.path}: the embeddings of user {user_id!r} contain NaN or inf; re-embed "
                                 f"that user or remove its shard")
            self._tensors[user_id] = t
        return t

    def as_mapping(self) -> dict[str, torch.Tensor]:
        """user_id -> (K, T_in, Du), users sorted (reads every user)."""
        return {u: self.get(u) for u in self.users()}

    def lazy_mapping(self, users: Iterable[str] | None = None) -> "LazyUsers":
        """A read-on-demand Mapping over `users` (default all): a rank reads only the users it trains."""
        return LazyUsers(self, self.users() if users is None else sorted(set(users) & set(self._where)))

    def meta(self, user_id: str) -> list[dict]:
        """One metadata record per stored embedding of `user_id` (same order as get(user_id))."""
        self._require(user_id)
        m = self._meta.get(user_id)
        if m is None:
            m = []
            for shard, _, off, length in self._where[user_id]:
                with open(self._verified_path(shard + ".jsonl"), "rb") as f:
                    f.seek(off)
                    m += json.loads(f.read(length))["records"]
            self._meta[user_id] = m
        return m

    def profile(self, user_id: str, index: int = 0) -> str:
        """Generated profile text of the user's `index`-th embedding (the "caption + user profile"
        baseline appends it to the prompt)."""
        records = self.meta(user_id)
        if not -len(records) <= index < len(records):
            raise IndexError(f"user {user_id!r} has {len(records)} embeddings, asked for index {index}")
        text = records[index].get("profile")
        if text is None:
            raise KeyError(f"user {user_id!r} embedding {index} has no 'profile' text in {self.path}")
        return text

    @property
    def shape(self) -> tuple[int, int] | None:
        """(T_in, Du) shared by every user, or None while empty."""
        return self._shape

    # -- writing ------------------------------------------------------------------------------
    def append(self, user_id: str, embeds: torch.Tensor, meta: Mapping[str, Any] | None = None) -> None:
        """Add K embeddings (K, T_in, Du) for `user_id` (after any it already has) and save.

        `meta` keys apply to all K; an optional meta["chunks"] list of K dicts (e.g. the profile
        text and shot uids of each embedding) adds per-embedding fields."""
        self.append_many([(user_id, embeds, meta)])

    def append_many(self, items: Iterable[tuple[str, torch.Tensor, Mapping[str, Any] | None]]) -> None:
        """`append` for several users as one new shard (nothing is rewritten)."""
        tensors: dict[str, torch.Tensor] = {}
        records: dict[str, list[dict]] = {}
        shape, dtype = self._shape, self._dtype
        for user_id, embeds, meta in items:
            if not isinstance(user_id, str) or not user_id:
                raise ValueError(f"user_id must be a non-empty string, got {user_id!r}")
            if not torch.is_tensor(embeds) or embeds.dim() != 3 or embeds.shape[0] < 1:
                raise ValueError(f"embeddings of user {user_id!r} must be a (K, T_in, Du) tensor with K >= 1, "
                                 f"got {getattr(embeds, 'shape', type(embeds))}")
            if not torch.isfinite(embeds).all():
                raise ValueError(f"embeddings of user {user_id!r} contain NaN or inf")
            if shape is not None and tuple(embeds.shape[1:]) != shape:
                raise ValueError(f"embeddings of user {user_id!r} have (T_in, Du) = {tuple(embeds.shape[1:])}, "
                                 f"but the store holds {shape}")
            shape = tuple(embeds.shape[1:])
            embeds = embeds.detach().to("cpu").contiguous()
            if dtype is not None and str(embeds.dtype) != dtype:
                embeds = embeds.to(getattr(torch, dtype.split(".")[-1]))
            dtype = str(embeds.dtype)
            recs = _records(user_id, embeds.shape[0], dict(meta or {}))
            tensors[user_id] = torch.cat([tensors[user_id], embeds]) if user_id in tensors else embeds
            records[user_id] = records.get(user_id, []) + recs
        if not tensors:
            return
        self._write_shard(tensors, records, shape, dtype)

    def _write_shard(self, tensors, records, shape, dtype) -> None:
        os.makedirs(self.path, exist_ok=True)
        marker = os.path.join(self.path, _MARKER)
        if not os.path.exists(marker):
            write_json_atomic(marker, {"format": FORMAT})
        n = 0
        while os.path.exists(os.path.join(self.path, f"{self.writer}-{n:05d}.json")):
            n += 1
        shard = f"{self.writer}-{n:05d}"
        users = sorted(tensors)
        tensor_path = os.path.join(self.path, shard + ".safetensors")
        save_safetensors_atomic({_PREFIX + u: tensors[u] for u in users}, tensor_path)
        lines, where, off = [], {}, 0
        for u in users:
            line = json.dumps({"user": u, "records": records[u]}, ensure_ascii=False).encode("utf-8")
            where[u] = [int(tensors[u].shape[0]), off, len(line)]
            lines.append(line)
            off += len(line) + 1
        jsonl_path = os.path.join(self.path, shard + ".jsonl")
        write_text_atomic(jsonl_path, b"\n".join(lines).decode("utf-8") + "\n")
        # Hashed as they landed on disk (the files were just written, so these reads hit the page cache).
        hashes = {"safetensors": sha256_file(tensor_path), "jsonl": sha256_file(jsonl_path)}
        # The index last: until it exists the shard is not part of the store (a crash leaves the old store).
        write_json_atomic(os.path.join(self.path, shard + ".json"),
                          {"format": FORMAT, "shape": list(shape), "dtype": dtype, "users": where, "sha256": hashes})
        self._note_hashes(shard, hashes)
        for u in users:
            self._where.setdefault(u, []).append((shard, *where[u]))
            self._tensors.pop(u, None)
            self._meta.pop(u, None)
        self._shape, self._dtype = shape, dtype
        self._shards.append(shard)

    def remove_uncommitted(self) -> int:
        """Delete this writer's shard files that have no index (a killed append) and temp files."""
        if not os.path.isdir(self.path):
            return 0
        gone = 0
        for p in glob.glob(os.path.join(self.path, f"{self.writer}-*.*")) + glob.glob(os.path.join(self.path, TEMP_PREFIX + "*")):
            base = os.path.basename(p)
            if base.startswith(TEMP_PREFIX) or not os.path.exists(os.path.join(self.path, base.split(".")[0] + ".json")):
                os.unlink(p)
                gone += 1
        return gone


class LazyUsers(Mapping):
    """user_id -> (K, T_in, Du), read from the store on first access (and kept)."""

    def __init__(self, store: EmbeddingStore, users: list[str]):
        self.store, self._users, self._set = store, users, set(users)

    def __getitem__(self, user_id: str) -> torch.Tensor:
        if user_id not in self._set:
            raise KeyError(user_id)
        return self.store.get(user_id)

    def __iter__(self):
        return iter(self._users)

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user_id) -> bool:
        return user_id in self._set


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: not a readable store file ({e})") from e


def _records(user_id: str, k: int, meta: dict) -> list[dict]:
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta of user {user_id!r} must be plain JSON data: {e}") from e
    chunks = meta.pop("chunks", None)
    if chunks is None:
        return [dict(meta) for _ in range(k)]
    if len(chunks) != k:
        raise ValueError(f"meta['chunks'] of user {user_id!r} has {len(chunks)} entries for {k} embeddings")
    return [{**meta, **c} for c in chunks]
