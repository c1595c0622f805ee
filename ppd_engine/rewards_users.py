"""Multi-reward synthetic users on real Pick-a-Pic pairs: `python -m ppd_engine.rewards_users`.

The method's synthetic setting: each user is a reward model (CLIP score, LAION aesthetic, HPSv2,
PickScore) or a weighted mix of them; a pair is labelled by its user's reward, so the taste a model
must recover is known exactly and "interpolating users" has a ground truth.

  score    score both images of every pair with the chosen reward models (ppd_engine/eval/rewards.py)
           -> SCORES/part-RRR-NNNNNNNNN.parquet (pair_id, user_id, uid_w, uid_l, REWARD_w, REWARD_l).
           Batched; resumable (pairs already in a part are skipped; each part is written atomically);
           under torchrun each rank scores every WORLD_SIZE-th pair on cuda:LOCAL_RANK, no collectives.
  relabel  synthetic users = weight vectors over the rewards (a JSON/YAML file); each pair goes to
           one user (a hash of its pair id), and is relabelled by that user's weighted reward of the
           standardised scores (ties dropped) -> a Pick-a-Pic-schema parquet folder (so embed, train
           and eval run on it unchanged) + synthetic_users.json (weights, standardisation, counts),
           and optionally an EmbeddingStore whose embedding of a user is its weight vector itself
           (the other choice is the VLM embedding of 4 pairs labelled by it: run ppd_engine.embed on
           the written folder).

Standardising each reward (z-score over all scored images) before weighting makes weights
comparable across rewards whose scales differ by orders of magnitude (PickScore ~20, aesthetic ~5).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from ppd_engine.cli.common import cli_errors, data_columns

log = logging.getLogger("ppd_engine.rewards_users")

SCORE_KEYS = ("pair_id", "user_id", "uid_w", "uid_l")
USERS_FILE = "synthetic_users.json"


# --- scores ---------------------------------------------------------------------------------------

def read_scores(folder: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """{pair_id: {"REWARD": array([score_w, score_l])}} from every part under `folder` (later parts
    win for a pair scored twice, e.g. by a rerun with another reward)."""
    import pyarrow.parquet as pq

    out: dict[str, dict[str, np.ndarray]] = {}
    for p in sorted(Path(folder).glob("part-*.parquet")):
        t = pq.read_table(p).to_pydict()
        rewards = sorted({c[:-2] for c in t if c.endswith("_w") and c not in ("uid_w",)})
        for i, pid in enumerate(t["pair_id"]):
            d = out.setdefault(pid, {})
            for r in rewards:
                d[r] = np.array([t[f"{r}_w"][i], t[f"{r}_l"][i]], dtype=np.float64)
    return out


def record_images(records: Sequence) -> Iterator[tuple[object, bytes, bytes]]:
    """(record, winner JPEG, loser JPEG) from records that carry their bytes (decode_images=False)."""
    for r in records:
        yield r, r.image_w, r.image_l


def _chunks(it: Iterator, size: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def score_pairs(records: Sequence, rewards: Mapping[str, object], out_dir: str | os.PathLike, *,
                images: Callable[[list], Iterator] = record_images, chunk: int = 256, rank: int = 0,
                world_size: int = 1, progress: bool = True) -> dict:
    """Score this rank's share of `records` with every reward in `rewards` ({name: RewardModel});
    pairs whose scores for all of them are already on disk are skipped. `images(records)` yields
    (record, winner JPEG, loser JPEG) in any order (a reader that streams row groups keeps memory
    bounded); default: the bytes the records carry. Returns {"scored", "skipped", "bad_images"}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from ppd_engine.embed.prompt import as_pil
    from ppd_engine.files import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = read_scores(out)
    names = sorted(rewards)
    index = {r.pair_id: i for i, r in enumerate(records)}
    mine = [r for i, r in enumerate(records) if i % world_size == rank]
    todo = [r for r in mine if not all(n in done.get(r.pair_id, {}) for n in names)]
    stats = {"scored": 0, "skipped": len(mine) - len(todo), "bad_images": 0}
    bar = tqdm(total=len(todo), desc=f"score pairs (rank {rank})", unit="pair", disable=not progress)
    for part in _chunks(images(todo), chunk):
        imgs, ok = [], []
        for r, jw, jl in part:
            try:  # both decode, or neither is added
                imgs += [as_pil(jw, r.uid_w), as_pil(jl, r.uid_l)]
                ok.append(r)
            except ValueError as e:
                stats["bad_images"] += 1
                log.warning("skipping pair %s: %s", r.pair_id, e)
        bar.update(len(part))
        if not ok:
            continue
        cols = {k: [getattr(r, k) for r in ok] for k in SCORE_KEYS}
        captions = [r.caption for r in ok for _ in (0, 1)]
        for n in names:
            vals = rewards[n].score(imgs, captions, progress=False).double().numpy()
            cols[f"{n}_w"], cols[f"{n}_l"] = vals[0::2].tolist(), vals[1::2].tolist()
        # The smallest record index of the part makes its name unique and stable across reruns.
        first = min(index[r.pair_id] for r in ok)
        with atomic_path(out / f"part-{rank:03d}-{first:09d}.parquet") as tmp:
            pq.write_table(pa.table(cols), tmp)
        stats["scored"] += len(ok)
    bar.close()
    return stats


# --- users and relabelling ------------------------------------------------------------------------

@dataclass
class SyntheticUsers:
    """Users as weight vectors over rewards, and each reward's (mean, std) for standardising."""

    weights: dict[str, dict[str, float]]
    stats: dict[str, tuple[float, float]]

    @property
    def rewards(self) -> list[str]:
        return sorted({r for w in self.weights.values() for r in w})

    def vector(self, user: str) -> np.ndarray:
        return np.array([self.weights[user].get(r, 0.0) for r in self.rewards], dtype=np.float64)

    def reward(self, user: str, raw: Mapping[str, np.ndarray]) -> np.ndarray:
        """The user's reward of images whose raw scores are `raw[reward]` (arrays of equal shape):
        sum_r w_r * (raw_r - mean_r) / std_r."""
        total = None
        for r, w in self.weights[user].items():
            if r not in raw:
                raise KeyError(f"user {user!r} weighs reward {r!r}, which was not scored (have {sorted(raw)})")
            mean, std = self.stats[r]
            z = w * (np.asarray(raw[r], dtype=np.float64) - mean) / std
            total = z if total is None else total + z
        return total

    def to_json(self) -> dict:
        return {"weights": self.weights, "stats": {r: list(v) for r, v in self.stats.items()}}

    @classmethod
    def from_json(cls, d: Mapping) -> "SyntheticUsers":
        return cls({u: dict(w) for u, w in d["weights"].items()}, {r: tuple(v) for r, v in d["stats"].items()})


def read_user_weights(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """{user: {reward: weight}} from a JSON or YAML file ({"users": {...}} or the mapping itself)."""
    import yaml

    from ppd_engine.eval.rewards import REWARD_NAMES

    d = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    users = d.get("users", d) if isinstance(d, dict) else None
    if not isinstance(users, dict) or not users:
        raise ValueError(f"{path}: expected a mapping user -> {{reward: weight}}")
    for u, w in users.items():
        if not isinstance(w, dict) or not w:
            raise ValueError(f"{path}: user {u!r} needs a mapping reward -> weight")
        bad = [r for r in w if r not in REWARD_NAMES]
        if bad:
            raise ValueError(f"{path}: user {u!r}: unknown reward(s) {bad}; choose from {', '.join(REWARD_NAMES)}")
        if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in w.values()):
            raise ValueError(f"{path}: user {u!r}: weights must be finite numbers")
    return {str(u): {r: float(v) for r, v in w.items()} for u, w in users.items()}


def standardisation(scores: Mapping[str, Mapping[str, np.ndarray]], rewards: Sequence[str]) -> dict[str, tuple[float, float]]:
    """(mean, std) of each reward over every scored image (both of each pair)."""
    out = {}
    for r in rewards:
        vals = np.concatenate([s[r] for s in scores.values() if r in s]) if scores else np.zeros(0)
        if vals.size < 2 or not np.isfinite(vals).all():
            raise ValueError(f"reward {r!r}: {vals.size} scored images (need 2 or more, all finite)")
        std = float(vals.std())
        out[r] = (float(vals.mean()), std if std > 0 else 1.0)
    return out


def assign_user(pair_id: str, users: Sequence[str], seed: int = 0) -> str:
    """The synthetic user a pair belongs to: a hash of (seed, pair id), so it never depends on
    which other pairs exist."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{pair_id}".encode()).digest()[:8], "little")
    return users[h % len(users)]


def relabel(records: Sequence, scores: Mapping[str, Mapping[str, np.ndarray]], users: SyntheticUsers,
            seed: int = 0) -> tuple[list[tuple[object, str, bool]], dict]:
    """[(record, user, flipped)] for every scored pair with a strict preference under its user;
    flipped = the user prefers the originally dispreferred image. Pairs without scores and ties are
    dropped and counted."""
    names = sorted(users.weights)
    out, counts = [], {"unscored": 0, "ties": 0, "flipped": 0, "kept": 0,
                       "per_user": {u: {"pairs": 0, "flipped": 0} for u in names}}
    for r in records:
        s = scores.get(r.pair_id)
        if s is None or not all(k in s for k in users.rewards):
            counts["unscored"] += 1
            continue
        u = assign_user(r.pair_id, names, seed)
        rw, rl = users.reward(u, s)
        if rw == rl:
            counts["ties"] += 1
            continue
        flipped = bool(rl > rw)
        out.append((r, u, flipped))
        counts["kept"] += 1
        counts["flipped"] += flipped
        counts["per_user"][u]["pairs"] += 1
        counts["per_user"][u]["flipped"] += flipped
    return out, counts


def write_relabelled(labelled: Sequence[tuple[object, str, bool]], out_dir: str | os.PathLike,
                     images: Callable[[list], Iterator] = record_images, rows_per_file: int = 4096,
                     rows_per_group: int = 256) -> list[str]:
    """A Pick-a-Pic-schema parquet folder: jpg_0 = the original winner, jpg_1 = the original loser,
    labels by the synthetic user (user_id = the user's name). `images` as in `score_pairs`; each file
    is written `rows_per_group` pairs at a time (one parquet row group each), so at most that many
    pairs' bytes are held whatever the data's size."""
    import itertools

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ppd_engine.files import atomic_path

    text, flag, score, jpg = pa.string(), pa.bool_(), pa.float64(), pa.binary()
    schema = pa.schema([("caption", text), ("label_0", score), ("label_1", score), ("user_id", text),
                        ("are_different", flag), ("has_label", flag), ("image_0_uid", text), ("image_1_uid", text),
                        ("ranking_id", text), ("best_image_uid", text), ("jpg_0", jpg), ("jpg_1", jpg)])
    data = Path(out_dir) / "data"
    data.mkdir(parents=True, exist_ok=True)
    label = {r.pair_id: (u, fl) for r, u, fl in labelled}
    n_files = max(1, -(-len(labelled) // rows_per_file))
    stream = iter(images([r for r, _, _ in labelled]))
    files = []
    for f in range(n_files):
        path = data / f"train-{f:05d}-of-{n_files:05d}.parquet"
        with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
            for rows in _chunks(itertools.islice(stream, rows_per_file), rows_per_group):
                users = [label[r.pair_id] for r, _, _ in rows]
                writer.write_table(pa.table({
                    "caption": [r.caption for r, _, _ in rows],
                    "label_0": [0.0 if fl else 1.0 for _, fl in users],
                    "label_1": [1.0 if fl else 0.0 for _, fl in users],
                    "user_id": [u for u, _ in users],
                    "are_different": [True] * len(rows),
                    "has_label": [True] * len(rows),
                    "image_0_uid": [r.uid_w for r, _, _ in rows],
                    "image_1_uid": [r.uid_l for r, _, _ in rows],
                    "ranking_id": [str(r.ranking_id) for r, _, _ in rows],
                    "best_image_uid": [r.uid_l if fl else r.uid_w for (r, _, _), (_, fl) in zip(rows, users)],
                    "jpg_0": [None if jw is None else bytes(jw) for _, jw, _ in rows],
                    "jpg_1": [None if jl is None else bytes(jl) for _, _, jl in rows],
                }, schema=schema))
        files.append(str(path))
    return files


def write_weight_store(users: SyntheticUsers, path: str | os.PathLike) -> str:
    """An EmbeddingStore whose embedding of each user is its weight vector, (K=1, T_in=1, Du=R)."""
    import torch

    from ppd_engine.embed.store import EmbeddingStore

    store = EmbeddingStore(str(path))
    store.append_many([(u, torch.from_numpy(users.vector(u)).float().view(1, 1, -1),
                        {"source": "reward weights", "rewards": users.rewards, "weights": users.weights[u]})
                       for u in sorted(users.weights)])
    return store.path


# --- evaluation helpers -----------------------------------------------------------------------------

def own_reward_scores(scores: Mapping[str, Mapping], users: SyntheticUsers) -> dict:
    """scores[reward][checkpoint][user] (eval's layout) -> {checkpoint: {user: [the user's own reward
    per image]}} for the evaluated users that are synthetic users."""
    rewards = list(scores)
    ckpts = list(next(iter(scores.values()))) if scores else []
    out: dict = {}
    for c in ckpts:
        out[c] = {}
        for u in scores[rewards[0]][c]:
            if u in users.weights:
                raw = {r: np.asarray(scores[r][c][u], dtype=np.float64) for r in rewards}
                out[c][u] = users.reward(u, raw).tolist()
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for val in np.unique(v):
            m = v == val
            r[m] = r[m].mean()
        return r

    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two equal-length sequences of 2+ values, got {len(x)} and {len(y)}")
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


# --- CLI --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from ppd_engine.cli.common import DefaultsFormatter, add_data, add_device, add_progress
    from ppd_engine.eval.reward_args import add_reward_args

    p = argparse.ArgumentParser(prog="python -m ppd_engine.rewards_users", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("score", formatter_class=DefaultsFormatter, help="score both images of every pair")
    add_data(sc, "the pairs to score", None)
    sc.add_argument("--scores", required=True, help="output folder of the score parts (resumable)")
    sc.add_argument("--chunk", type=int, default=256, help="pairs per written part")
    sc.add_argument("--max-users", type=int, default=0, help="keep the users with the most pairs; 0 = all")
    add_reward_args(sc)
    add_device(sc, "device for the reward models (under torchrun: cuda:LOCAL_RANK)")
    add_progress(sc)
    rl = sub.add_parser("relabel", formatter_class=DefaultsFormatter, help="relabel pairs by synthetic users")
    add_data(rl, "the pairs that were scored", None)
    rl.add_argument("--scores", required=True, help="folder written by `score`")
    rl.add_argument("--users", required=True,
                    help="JSON/YAML {user: {reward: weight}}, e.g. {clip: {clipscore: 1}, mix: {clipscore: 0.5, aesthetic: 0.5}}")
    rl.add_argument("--out", required=True, help="output folder: data/*.parquet (Pick-a-Pic schema) + synthetic_users.json")
    rl.add_argument("--weight-store", default=None,
                    help="also write an EmbeddingStore with each user's weight vector as its embedding")
    rl.add_argument("--seed", type=int, default=0, help="seed of the pair -> user assignment")
    add_progress(rl)
    return p


def _score_cmd(args) -> int:
    from ppd_engine.data.pickapic import load_pairs
    from ppd_engine.eval.reward_args import load_named_reward, reward_names

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and args.device in ("auto", "cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    names = reward_names(args)
    if not names:
        raise ValueError("--rewards: name at least one reward model")
    # The index only: the JPEGs are read row group by row group as each chunk is scored.
    pairs = load_pairs(args.data, min_pairs_per_user=1, max_users=args.max_users or None, load_images=False,
                       split=args.split, streaming=args.streaming,
                       columns=data_columns(args), progress=args.progress and rank == 0)
    rewards = {n: load_named_reward(args, n) for n in names}
    stats = score_pairs(pairs.records, rewards, args.scores, chunk=args.chunk, rank=rank, world_size=world,
                        progress=args.progress, images=pairs.image_reader().iter_pairs)
    print(f"rank {rank}/{world}: scored {stats['scored']} pairs, {stats['skipped']} already scored, "
          f"{stats['bad_images']} with undecodable images -> {args.scores}")
    return 0


def _relabel_cmd(args) -> int:
    from ppd_engine.data.pickapic import load_pairs
    from ppd_engine.files import write_json_atomic

    weights = read_user_weights(args.users)
    scores = read_scores(args.scores)
    rewards = sorted({r for w in weights.values() for r in w})
    users = SyntheticUsers(weights, standardisation(scores, rewards))
    # The index only: the JPEGs are copied into the new folder row group by row group. Pairs whose
    # images did not decode were never scored, so relabel drops them (unscored).
    pairs = load_pairs(args.data, min_pairs_per_user=1, load_images=False, split=args.split,
                       streaming=args.streaming, columns=data_columns(args), progress=args.progress)
    labelled, counts = relabel(pairs.records, scores, users, seed=args.seed)
    files = write_relabelled(labelled, args.out, images=pairs.image_reader().iter_pairs)
    write_json_atomic(Path(args.out) / USERS_FILE, {**users.to_json(), "seed": args.seed, "counts": counts,
                                                   "source": {"data": args.data, "scores": args.scores}}, indent=1)
    if args.weight_store:
        write_weight_store(users, args.weight_store)
    print(f"{counts['kept']} pairs for {len(weights)} users ({counts['flipped']} labels flipped, {counts['ties']} "
          f"ties and {counts['unscored']} unscored dropped) -> {len(files)} file(s) under {args.out}/data")
    return 0


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _score_cmd(args) if args.command == "score" else _relabel_cmd(args)


if __name__ == "__main__":
    sys.exit(main())
