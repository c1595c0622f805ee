"""Users' few-shot pairs -> profile prompts -> batched generation -> the embedding store."""
from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ppd_engine.profile import parse_profile

from .generate import VLMGenerator
from .prompt import ProfileTemplate
from .store import EmbeddingStore

log = logging.getLogger(__name__)


@dataclass
class WorkItem:
    user_id: str
    chunk: int                 # index of this few-shot group among the user's embeddings
    shots: list[Any]           # PairRecord-like: caption, image_w, image_l, uid_w, uid_l


def _seed_for(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little")


def user_chunks(records: Sequence[Any], first: Sequence[Any], n_shots: int, k: int, seed: int,
                user_id: str) -> list[list[Any]]:
    """Up to `k` disjoint groups of `n_shots` pairs of one user, like the authors' chunking of a
    user's pairs into 4-shot groups. Group 0 is `first` (the user's held-out few-shot pairs, so the
    embedding the trainer uses by default never saw a training pair); the others come from the
    remaining pairs, shuffled with a seed that depends only on (seed, user_id)."""
    groups = [list(first)]
    taken = {id(r) for r in first}
    rest = [r for r in records if id(r) not in taken]
    random.Random(_seed_for(seed, user_id)).shuffle(rest)
    for i in range(0, len(rest) - n_shots + 1, n_shots):
        if len(groups) >= k:
            break
        groups.append(rest[i:i + n_shots])
    return groups[:k]


def stored_chunks(store: EmbeddingStore, user: str) -> set[int]:
    """Chunk numbers of `user`'s stored embeddings; a store written without them (another tool)
    counts its first K embeddings as chunks 0..K-1."""
    n = store.count(user)
    if not n:
        return set()
    records = store.meta(user)
    if all(isinstance(r.get("chunk"), int) for r in records):
        return {r["chunk"] for r in records}
    return set(range(n))


def plan(by_user: dict[str, list[Any]], shots: dict[str, list[Any]], n_shots: int, k: int, seed: int,
         store: EmbeddingStore) -> tuple[list[WorkItem], dict]:
    """Work items for every (user, chunk) the store does not hold yet (a rerun resumes): the chunks
    whose numbers the user's stored records lack, so a chunk that failed (no profile, a bad image)
    is tried again and one stored after it is not embedded twice."""
    items, done, partial = [], 0, 0
    for user in sorted(shots):
        have = stored_chunks(store, user)
        groups = user_chunks(by_user[user], shots[user], n_shots, k, seed, user)
        todo = [WorkItem(user, c, g) for c, g in enumerate(groups) if c not in have]
        if not todo:
            done += 1
        elif have:
            partial += 1
        items += todo
    return items, {"users_already_done": done, "users_resumed": partial}


def embed_users(items: list[WorkItem], generator: VLMGenerator, template: ProfileTemplate,
                store: EmbeddingStore, *, batch_users: int, seed: int, model_id: str,
                save_every: int = 8, progress: bool = True, require_profile: bool = False,
                retries: int = 2, images: Callable[[list[WorkItem]], list[WorkItem]] | None = None) -> dict:
    """Generate profiles and embeddings for `items` in batches of `batch_users` rows and append
    them to `store` every `save_every` batches and at the end (each save writes one new shard; a
    crash loses at most the unsaved batches, which a rerun redoes). Items whose images cannot be
    decoded are skipped and counted.

    With `require_profile` (the CLI's default), a generation without a "User Profile" section
    (ppd_engine.profile.parse_profile: a chain of thought cut off by the token budget, or one that
    wandered off) has no profile for its final token to summarise: it is generated again with
    another seed up to `retries` times, then recorded as failed (counted in chunks_no_profile,
    logged, not stored). Without it such chunks are stored and counted in without_profile.
    `images(batch) -> batch` fills the shots' image bytes of one batch just before it is rendered
    (None: the items carry them), so only a batch's images are in memory.
    Returns counts and throughput."""
    from tqdm.auto import tqdm

    settings = generator.settings
    stats = {"chunks_embedded": 0, "chunks_bad_images": 0, "chunks_no_profile": 0, "chunks_retried": 0,
             "without_profile": 0, "tokens_generated": 0, "generate_seconds": 0.0}
    users_seen: set[str] = set()
    pad_to = batch_users if settings.compile else None
    pending: list = []
    bar = tqdm(total=len(items), desc="embed", unit="chunk", disable=not progress)
    for start in range(0, len(items), batch_users):
        batch = items[start:start + batch_users]
        if images is not None:
            batch = images(batch)
        prompts, ok = [], []
        for it in batch:
            try:
                prompts.append(template.render(it.shots))
                ok.append(it)
            except ValueError as e:
                stats["chunks_bad_images"] += 1
                log.warning("skipping user %s chunk %d: %s", it.user_id, it.chunk, e)
        bar.update(len(batch) - len(ok))
        if not ok:
            continue
        done: list[tuple] = []   # item, text, states, n tokens, prompt len, seed, profile section
        todo = list(range(len(ok)))
        for attempt in range(retries + 1):
            # Rows of a batch share one sampling stream, so the seed is tied to the batch's first row.
            tag = "" if attempt == 0 else f"/retry{attempt}"
            sample_seed = _seed_for(seed, f"{ok[todo[0]].user_id}/{ok[todo[0]].chunk}{tag}")
            t0 = time.perf_counter()
            out = generator.generate([prompts[i] for i in todo], seed=sample_seed, pad_batch_to=pad_to)
            stats["generate_seconds"] += time.perf_counter() - t0
            stats["tokens_generated"] += sum(len(t) for t in out.tokens)
            again = []
            for row, i in enumerate(todo):
                sec = parse_profile(out.texts[row], len(out.tokens[row]) >= settings.max_new_tokens)
                if require_profile and sec.text is None:
                    again.append(i)
                    continue
                done.append((ok[i], out.texts[row], out.states[row:row + 1], len(out.tokens[row]),
                             out.prompt_lengths[row], sample_seed, sec))
            todo = again
            if not todo:
                break
            if attempt < retries:
                stats["chunks_retried"] += len(todo)
        for i in todo:
            stats["chunks_no_profile"] += 1
            log.warning("user %s chunk %d: no User Profile section in the generation after %d tries; not stored",
                        ok[i].user_id, ok[i].chunk, retries + 1)
        done.sort(key=lambda d: ok.index(d[0]))
        per_user: dict[str, list] = {}
        for d in done:
            per_user.setdefault(d[0].user_id, []).append(d)
        for user, rows in per_user.items():
            stats["without_profile"] += sum(sec.text is None for *_, sec in rows)
            chunks = [{
                "chunk": it.chunk,
                "profile": text,
                # The condensed "User Profile" section alone (the prompted-base baseline's caption suffix).
                "user_profile": sec.text,
                "user_profile_truncated": sec.truncated,
                "generated_tokens": n_tok,
                "prompt_tokens": n_prompt,
                "sample_seed": None if settings.greedy else s_seed,
                "shots": [{"uid_w": s.uid_w, "uid_l": s.uid_l, "caption": s.caption,
                           "ranking_id": getattr(s, "ranking_id", None)} for s in it.shots],
            } for it, text, _, n_tok, n_prompt, s_seed, sec in rows]
            meta = {"model": model_id, "prompt_sha256": template.sha256, "template": template.path,
                    "generation": settings.as_meta(), "chunks": chunks}
            pending.append((user, torch.cat([r[2] for r in rows]), meta))
            users_seen.add(user)
        if (start // batch_users + 1) % max(1, save_every) == 0:
            store.append_many(pending)
            pending = []
        stats["chunks_embedded"] += len(done)
        bar.update(len(ok))
        bar.set_postfix(tok_s=f"{stats['tokens_generated'] / max(stats['generate_seconds'], 1e-9):.1f}")
    if pending:
        store.append_many(pending)
    bar.close()
    secs = stats["generate_seconds"]
    stats["users_embedded"] = len(users_seen)
    stats["tokens_per_s"] = stats["tokens_generated"] / secs if secs else 0.0
    stats["chunks_per_s"] = stats["chunks_embedded"] / secs if secs else 0.0
    return stats
