"""User-embedding store: one safetensors file of per-user embeddings plus a JSON sidecar.

Layout of STORE.safetensors: one tensor per user, key "user/<user_id>", shape (K, T_in, Du):
K few-shot (4-shot) embeddings of that user, each T_in tokens of width Du (T_in = 1 for
layers=last, num_layers + 1 for layers=all). Every user shares (T_in, Du).

The metadata (per user: one record per embedding with the generated profile text, the shot image
uids and captions, model id, prompt-template sha256, generation settings) is stored twice: inside
the safetensors header, where it is written in the same atomic rename as the tensors and so can
never disagree with them, and in STORE.json beside it, for people and tools (rewritten after).

Writes go to a temporary file in the same folder and are renamed over the old file, so a crash
or a full disk leaves the previous store intact, and appending never drops existing users.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import torch

from ppd_engine.files import save_safetensors_atomic, write_text_atomic

FORMAT = "ppd-user-embeddings/1"
_PREFIX = "user/"
_META_KEY = "ppd_store"


class EmbeddingStore:
    """Mapping user_id -> Tensor (K, T_in, Du), backed by `path` (.safetensors) and its .json sidecar."""

    def __init__(self, path: str):
        if not path.endswith(".safetensors"):
            raise ValueError(f"store path must end with .safetensors, got {path!r}")
        self.path = path
        self.sidecar = path[: -len(".safetensors")] + ".json"
        self._tensors: dict[str, torch.Tensor] = {}
        self._meta: dict[str, list[dict]] = {}
        if os.path.exists(path):
            self._load()

    # -- reading ------------------------------------------------------------------------------
    def _load(self) -> None:
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            header = f.metadata() or {}
            if _META_KEY not in header:
                raise ValueError(f"{self.path} is not a user-embedding store (no '{_META_KEY}' metadata)")
            doc = json.loads(header[_META_KEY])
            if doc.get("format") != FORMAT:
                raise ValueError(f"{self.path}: unsupported store format {doc.get('format')!r} (want {FORMAT})")
            for key in f.keys():
                if not key.startswith(_PREFIX):
                    raise ValueError(f"{self.path}: unexpected tensor key {key!r}")
                self._tensors[key[len(_PREFIX):]] = f.get_tensor(key)
        self._meta = {u: list(doc["users"].get(u, [])) for u in self._tensors}

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._tensors

    def users(self) -> list[str]:
        """Sorted user ids."""
        return sorted(self._tensors)

    def get(self, user_id: str) -> torch.Tensor:
        """(K, T_in, Du) embeddings of `user_id`."""
        if user_id not in self._tensors:
            raise KeyError(f"user {user_id!r} is not in the store {self.path} ({len(self)} users)")
        return self._tensors[user_id]

    def as_mapping(self) -> dict[str, torch.Tensor]:
        """user_id -> (K, T_in, Du), users sorted."""
        return {u: self._tensors[u] for u in self.users()}

    def meta(self, user_id: str) -> list[dict]:
        """One metadata record per stored embedding of `user_id` (same order as get(user_id))."""
        self.get(user_id)
        return self._meta[user_id]

    def profile(self, user_id: str, index: int = 0) -> str:
        """Generated profile text of the user's `index`-th embedding (the "caption + user profile"
        baseline appends it to the prompt)."""
        records = self.meta(user_id)
        if not -len(records) <= index < len(records):
            raise IndexError(f"user {user_id!r} has {len(records)} embeddings, asked for index {index}")
        text = records[index].get("profile")
        if text is None:
            raise KeyError(f"user {user_id!r} embedding {index} has no 'profile' text in {self.sidecar}")
        return text

    @property
    def shape(self) -> tuple[int, int] | None:
        """(T_in, Du) shared by every user, or None while empty."""
        for t in self._tensors.values():
            return tuple(t.shape[1:])
        return None

    # -- writing ------------------------------------------------------------------------------
    def append(self, user_id: str, embeds: torch.Tensor, meta: Mapping[str, Any] | None = None) -> None:
        """Add K embeddings (K, T_in, Du) for `user_id` (after any it already has) and save.

        `meta` keys apply to all K; an optional meta["chunks"] list of K dicts (e.g. the profile
        text and shot uids of each embedding) adds per-embedding fields."""
        self.append_many([(user_id, embeds, meta)])

    def append_many(self, items: Iterable[tuple[str, torch.Tensor, Mapping[str, Any] | None]]) -> None:
        """`append` for several users with a single rewrite of the files."""
        staged_t = dict(self._tensors)
        staged_m = {u: list(v) for u, v in self._meta.items()}
        shape = self.shape
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
            records = _records(user_id, embeds.shape[0], dict(meta or {}))
            embeds = embeds.detach().to("cpu").contiguous()
            if user_id in staged_t:
                old = staged_t[user_id]
                if old.dtype != embeds.dtype:
                    embeds = embeds.to(old.dtype)
                embeds = torch.cat([old, embeds], dim=0)
            staged_t[user_id] = embeds
            staged_m[user_id] = staged_m.get(user_id, []) + records
        self._write(staged_t, staged_m)
        self._tensors, self._meta = staged_t, staged_m

    def _write(self, tensors: dict[str, torch.Tensor], meta: dict[str, list[dict]]) -> None:

        doc = {"format": FORMAT, "users": {u: meta[u] for u in sorted(tensors)}}
        header = json.dumps(doc, ensure_ascii=False)
        save_safetensors_atomic({_PREFIX + u: tensors[u] for u in sorted(tensors)}, self.path,
                                metadata={_META_KEY: header})
        side = {"format": FORMAT, "store": os.path.basename(self.path),
                "shape": list(next(iter(tensors.values())).shape[1:]) if tensors else None,
                "users": {u: {"k": int(tensors[u].shape[0]), "embeddings": meta[u]} for u in sorted(tensors)}}
        write_text_atomic(self.sidecar, json.dumps(side, ensure_ascii=False, indent=1))


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
