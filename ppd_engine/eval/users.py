"""Who is evaluated, and with what: users' roles (seen / unseen), their shot pairs, and the profile
captions of the prompted-base baseline.

Roles come from the training run (RUN/users.json, written by the pickapic world at training start:
role + the shot pairs that build each user's embedding) or, for stores that carry it, from the
embedding store's metadata ("split", as the toy world writes). An unseen user's embedding must be
built from its shot pairs only — pairs that never appear in training — and eval checks the
store's record of it rather than trusting it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from ppd_engine.profile import parse_profile

ROLES = ("seen", "unseen")
USERS_JSON = "users.json"


def user_roles(run_dirs: Sequence[str], store) -> tuple[dict[str, dict], str | None]:
    """({user: {"role", "shots"}}, source): the first listed run folder with a users.json, else the
    store's per-embedding "split"/"role" metadata; ({}, None) when neither records roles."""
    for d in run_dirs:
        p = Path(d) / USERS_JSON
        if p.is_file():
            data = json.loads(p.read_text(encoding="utf-8"))
            users = data.get("users")
            if not isinstance(users, dict):
                raise ValueError(f"{p}: no 'users' mapping")
            for u, info in users.items():
                if info.get("role") not in ROLES:
                    raise ValueError(f"{p}: user {u!r} has role {info.get('role')!r}; expected seen or unseen")
            return users, str(p)
    roles = {}
    for u in store.users():
        meta = store.meta(u)[0] if hasattr(store, "meta") else {}
        role = meta.get("role", meta.get("split"))
        if role in ROLES:
            roles[u] = {"role": role, "shots": meta.get("shots", [])}
    return roles, (str(getattr(store, "path", "store")) if roles else None)


def select_users(available: Sequence[str], users: Sequence[str] | None, num_users: int | None,
                 roles: Mapping[str, dict] | None = None) -> list[str]:
    """`users` = ["seen"], ["unseen"], ["all"] (by role, store order) or explicit ids (each must
    exist); then the first `num_users` of them (all if None)."""
    from .generate import user_dir

    available = list(available)
    sel = list(users or ["all"])
    if len(sel) == 1 and sel[0] in ROLES:
        if not roles:
            raise ValueError(f"--users {sel[0]}: no run folder has a users.json and the store records no "
                             "roles (train with this version, or list user ids)")
        chosen = [u for u in available if roles.get(u, {}).get("role") == sel[0]]
    elif sel == ["all"]:
        chosen = available
    else:
        missing = [u for u in sel if u not in set(available)]
        if missing:
            raise KeyError(f"user(s) {missing[:5]} not in the embedding store ({len(available)} users)")
        chosen = sel
    if num_users is not None:
        chosen = chosen[:num_users]
    if not chosen:
        raise ValueError(f"no users to evaluate (selection {sel}; empty embedding store?)")
    dirs = [user_dir(u) for u in chosen]
    if len(set(dirs)) != len(dirs):
        raise ValueError("two user ids map to the same folder name")
    return chosen


def _pair_keys(shots) -> set[tuple[str, str]]:
    return {(s["uid_w"], s["uid_l"]) for s in shots}


def check_unseen_embeddings(users: Sequence[str], roles: Mapping[str, dict], store, embed_index: int) -> None:
    """Every unseen user's embedding (the `embed_index`-th) was built from its recorded shot pairs
    only; a store without shot records for it cannot prove that and is refused."""
    for u in users:
        info = roles.get(u, {})
        if info.get("role") != "unseen" or not info.get("shots"):
            continue
        meta = store.meta(u)
        rec = meta[embed_index] if -len(meta) <= embed_index < len(meta) else {}
        used = _pair_keys(rec.get("shots") or [])
        if not used or not used <= _pair_keys(info["shots"]):
            raise ValueError(f"unseen user {u!r}: embedding {embed_index} was built from pairs "
                             f"{sorted(used)[:4]} that are not its held-out shot pairs; embed it from "
                             "its shots (the same --shots/--seed as data.n_shots/data.split_seed) or "
                             "use --embed-index 0")


def user_profile(store, user: str, index: int) -> str | None:
    """The user's parsed "User Profile" section (stored by embed, else parsed from the generation)."""
    rec = store.meta(user)[index]
    if "user_profile" in rec:
        return rec["user_profile"]
    return parse_profile(rec.get("profile") or "").text


class ProfileCaptions:
    """caption + ", " + the user's profile, cut to the text encoder's token limit.

    `tokenizer` is the base model's (first) CLIP tokenizer; its model_max_length (77) counts BOS
    and EOS. Counts: captions made, truncated, and users without a profile (bare caption)."""

    def __init__(self, tokenizer, store, embed_index: int = 0):
        self.tok, self.store, self.embed_index = tokenizer, store, embed_index
        self.limit = int(tokenizer.model_max_length)
        self.counts = {"captions": 0, "truncated": 0, "users_without_profile": 0}
        self.suffixes: dict[str, str | None] = {}

    def caption(self, prompt: str, profile: str | None) -> str:
        self.counts["captions"] += 1
        if not profile:
            return prompt
        text = f"{prompt}, {profile}"
        ids = self.tok(text, add_special_tokens=False).input_ids
        if len(ids) <= self.limit - 2:
            return text
        self.counts["truncated"] += 1
        return self.tok.decode(ids[: self.limit - 2]).strip()

    def __call__(self, user: str, prompts: Sequence[str]) -> list[str]:
        profile = user_profile(self.store, user, self.embed_index)
        self.suffixes[user] = profile
        if not profile:
            self.counts["users_without_profile"] += 1
        return [self.caption(p, profile) for p in prompts]
