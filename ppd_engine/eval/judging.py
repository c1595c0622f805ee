"""VLM-judge win rates on evaluation images, through `ppd_engine.judge` (order-consistent).

The judge sees a user's few-shot pairs. Where the embedding store recorded which pairs built the
embedding that conditioned sampling (meta "shots": uid_w / uid_l), the judge is shown exactly
those; otherwise the user's held-out few-shot split (`few_shot_split(n_shots, seed)`), the same
rule `python -m ppd_engine.embed` and `python -m ppd_engine.judge` use.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)


def user_shots(records: Sequence[Any], meta: Mapping | None, fallback: Sequence[Any] | None) -> list | None:
    """The few-shot pairs of one user: those named in `meta["shots"]` (matched by uid_w/uid_l among
    the user's `records`), else `fallback`; None when neither is available."""
    named = (meta or {}).get("shots")
    if named:
        by_uids = {(r.uid_w, r.uid_l): r for r in records}
        found = [by_uids.get((s.get("uid_w"), s.get("uid_l"))) for s in named]
        if all(f is not None for f in found):
            return found
        log.warning("%d of %d recorded shots not found in the Pick-a-Pic data; using the few-shot split",
                    sum(f is None for f in found), len(found))
    return list(fallback) if fallback else None


def load_judge_shots(data: str, users: Sequence[str], store=None, embed_index: int = 0,
                     n_shots: int = 4, seed: int = 0, split: str | None = None,
                     progress: bool = True) -> dict[str, list]:
    """user -> few-shot PairRecords (JPEG bytes) for each evaluated user that has them."""
    from ppd_engine.data.pickapic import load_pairs

    # The index only; the bytes of the evaluated users' shots are read at the end (not the split's).
    pairs = load_pairs(data, min_pairs_per_user=n_shots, load_images=False, split=split, progress=progress)
    split_shots, _ = pairs.few_shot_split(n_shots=n_shots, seed=seed)
    by_user = pairs.by_user()
    out = {}
    for u in users:
        meta = None
        if store is not None and u in store:
            records = store.meta(u)
            meta = records[embed_index] if -len(records) <= embed_index < len(records) else None
        shots = user_shots(by_user.get(u, []), meta, split_shots.get(u))
        if shots:
            out[u] = shots
    missing = [u for u in users if u not in out]
    if missing:
        log.warning("%d user(s) have no few-shot pairs in %s and are not judged (e.g. %s)",
                    len(missing), data, missing[:5])
    filled = iter(pairs.with_images([r for shots in out.values() for r in shots]))
    return {u: [next(filled) for _ in shots] for u, shots in out.items()}


def make_judge_fn(judge, shots: Mapping[str, list], batch: int = 4) -> Callable:
    """`judge_fn(user, prompts, images_a, images_b) -> (wins_a, wins_b, dropped)`, or None for a user
    without few-shot pairs (reported as not judged), for `evaluate.judge_images`."""
    def judge_fn(user, prompts, images_a, images_b):
        if user not in shots:
            return None
        wr = judge.winrate(shots[user], images_a, images_b, prompts, batch=batch)
        return wr.wins_a, wr.wins_b, wr.dropped
    return judge_fn
