"""The evaluation pipeline: generate -> score (reward models, optional VLM judge) -> report.

Every step reads and writes `OUT/`: `manifest.json` (prompts, seeds, users, checkpoints, sampler
settings) is written by the generate step and read by the others, so scoring can run later, on
another machine, or with other reward models, on the same images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from .generate import CheckpointSpec, adapter_input_shape, generate_images, load_images, user_dir
from .prompts import PromptSet
from .report import markdown_report, pair_key, summarize, write_json, write_text
from .rewards import RewardModel

MANIFEST = "manifest.json"
RESULTS = "results.json"
REPORT = "report.md"


def select_users(available: Sequence[str], users: Sequence[str] | None, num_users: int | None) -> list[str]:
    """Explicit `users` (each must exist), else the first `num_users` of the store (all if None)."""
    available = list(available)
    if users:
        missing = [u for u in users if u not in set(available)]
        if missing:
            raise KeyError(f"user(s) {missing[:5]} not in the embedding store ({len(available)} users)")
        chosen = list(users)
    else:
        chosen = available if num_users is None else available[:num_users]
    if not chosen:
        raise ValueError("no users to evaluate (empty embedding store?)")
    dirs = [user_dir(u) for u in chosen]
    if len(set(dirs)) != len(dirs):
        raise ValueError("two user ids map to the same folder name")
    return chosen


def run_generation(checkpoints: Sequence[CheckpointSpec], prompt_set: PromptSet, users: Sequence[str],
                   store, out_dir: str, *, seed: int = 0, batch_size: int = 4, embed_index: int = 0,
                   device: str = "cpu", progress: bool = True, load_run: Callable | None = None,
                   generate_fn: Callable | None = None, **sample_kw) -> dict:
    """Generate all images for every checkpoint and write `OUT/manifest.json`; returns the manifest.

    `store` is an `EmbeddingStore` (or anything with `.get(user) -> (K, T_in, Du)`); a checkpoint
    listed as non-personalized is sampled with zeros shaped like its adapters' input. `load_run` and
    `generate_fn` default to `ppd_engine.training.load_run` and `ppd_engine.sampling.generate`.
    """
    if load_run is None:
        from ppd_engine.training import load_run
    if generate_fn is None:
        from ppd_engine.sampling import generate as generate_fn
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = prompt_set.texts
    sampler = {"embed_index": embed_index, **{k: _jsonable(v) for k, v in sample_kw.items()}}
    this = {c.name: {"run_dir": str(c.run_dir), "personalized": c.personalized} for c in checkpoints}
    on_disk = dict(this)
    if (out / MANIFEST).is_file():
        old = read_manifest(str(out))
        _check_resumable(old, prompts, seed, sampler, checkpoints)
        on_disk = {**old.get("on_disk", old["checkpoints"]), **this}
    manifest = {
        "prompts": {"source": prompt_set.name, "texts": prompts,
                    "categories": [p.category for p in prompt_set.prompts], "skipped": prompt_set.skipped},
        "seeds": [seed + i for i in range(len(prompts))],
        "users": list(users),
        "user_dirs": {u: user_dir(u) for u in users},
        "checkpoints": this,
        "on_disk": on_disk,   # every checkpoint whose images OUT holds (earlier runs included)
        "sampler": sampler,
        "counts": {},
    }
    # Written first too, so an interrupted run's images are still tied to how they were made.
    write_json(out / MANIFEST, manifest)
    for ck in checkpoints:
        _, model = load_run(ck.run_dir, checkpoint=ck.checkpoint, device=device)
        shape = adapter_input_shape(model)
        if shape is None:
            raise ValueError(f"{ck.run_dir}: the loaded unet has no user adapters")
        if ck.personalized:
            got = tuple(store.get(users[0]).shape[1:])
            if got != shape:
                raise ValueError(f"checkpoint {ck.name} takes user embeddings (T_in, Du) = {shape}, but the "
                                 f"store holds {got}: was it trained on another store?")
        manifest["counts"][ck.name] = generate_images(
            model, generate_fn, ck, prompts, users, store.get, str(out), seed=seed, batch_size=batch_size,
            embed_index=embed_index, zero_shape=shape, progress=progress, **sample_kw)
        del model
        release_memory()
    write_json(out / MANIFEST, manifest)
    return manifest


def release_memory() -> None:
    """Free a dropped model's accelerator memory before the next one loads (a diffusion model and
    a CLIP-H reward model need not fit side by side)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_resumable(old: dict, prompts: list[str], seed: int, sampler: dict,
                     checkpoints: Sequence[CheckpointSpec]) -> None:
    # Images already in OUT are reused, which is only right when they were made the same way.
    diffs = []
    if old["prompts"]["texts"] != prompts:
        diffs.append("prompts")
    if old.get("seeds", [None])[:1] != [seed]:
        diffs.append("seed")
    if old.get("sampler") != sampler:
        diffs.append(f"sampler settings ({old.get('sampler')} vs {sampler})")
    for c in checkpoints:
        prev = old.get("on_disk", old["checkpoints"]).get(c.name)
        if prev is not None and (prev["run_dir"] != str(c.run_dir) or prev["personalized"] != c.personalized):
            diffs.append(f"checkpoint {c.name} ({prev['run_dir']} vs {c.run_dir})")
    if diffs:
        raise ValueError(f"the output folder already holds images made with other {', '.join(diffs)}; "
                         "use a new --out (existing images are reused only for an identical setup)")


def _jsonable(v):
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def read_manifest(out_dir: str) -> dict:
    p = Path(out_dir) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run `python -m ppd_engine.eval generate` first")
    m = json.loads(p.read_text(encoding="utf-8"))
    for key in ("prompts", "users", "checkpoints"):
        if key not in m:
            raise ValueError(f"{p}: missing key {key!r}")
    return m


def score_images(out_dir: str, manifest: dict, reward: RewardModel, chunk: int = 64,
                 progress: bool = True) -> dict[str, dict[str, list[float]]]:
    """One reward over every saved image -> {checkpoint: {user: [score per prompt index]}}.

    Images are read `chunk` at a time so a 1632-prompt run never holds them all in memory.
    """
    prompts = manifest["prompts"]["texts"]
    users, ckpts = manifest["users"], list(manifest["checkpoints"])
    n = len(prompts)
    total = n * len(users) * len(ckpts)
    bar = tqdm(total=total, desc=f"score {reward.name}", unit="img", disable=not progress)
    out: dict[str, dict[str, list[float]]] = {}
    for ck in ckpts:
        out[ck] = {}
        for u in users:
            vals: list[float] = []
            for s in range(0, n, chunk):
                idx = range(s, min(n, s + chunk))
                imgs = load_images(out_dir, ck, u, idx)
                vals += reward.score(imgs, [prompts[i] for i in idx], progress=False).tolist()
                bar.update(len(idx))
            out[ck][u] = vals
    bar.close()
    return out


def judge_images(out_dir: str, manifest: dict, judge_fn: Callable, progress: bool = True) -> dict:
    """VLM-judge win rate per checkpoint pair (first listed vs second), overall and per user.

    `judge_fn(user, prompts, images_a, images_b) -> (wins_a, wins_b, dropped) | None` counts, over
    one user's same-index pairs, the order-consistent judgements won by each side and the dropped
    (inconsistent or malformed) ones; None = user not judged (no few-shot pairs).
    Win rate = wins_a / (wins_a + wins_b).
    """
    from itertools import combinations

    prompts = manifest["prompts"]["texts"]
    users, ckpts = manifest["users"], list(manifest["checkpoints"])
    n = len(prompts)
    res = {}
    pairs = list(combinations(ckpts, 2))
    bar = tqdm(total=len(pairs) * len(users), desc="judge", unit="user", disable=not progress)
    for a, b in pairs:
        per_user, wa_tot, wb_tot, drop_tot, not_judged = {}, 0, 0, 0, []
        for u in users:
            got = judge_fn(u, prompts, load_images(out_dir, a, u, range(n)), load_images(out_dir, b, u, range(n)))
            bar.update(1)
            if got is None:
                not_judged.append(u)
                continue
            wa, wb, dropped = got
            per_user[u] = {"wins_a": wa, "wins_b": wb, "dropped": dropped,
                           "win_rate": wa / (wa + wb) if wa + wb else math.nan}
            wa_tot, wb_tot, drop_tot = wa_tot + wa, wb_tot + wb, drop_tot + dropped
        res[pair_key(a, b)] = {"win_rate": wa_tot / (wa_tot + wb_tot) if wa_tot + wb_tot else math.nan,
                               "kept": wa_tot + wb_tot, "dropped": drop_tot, "users_not_judged": not_judged,
                               "per_user": per_user}
    bar.close()
    return res


def write_results(out_dir: str, manifest: dict, scores: dict, judge: dict | None = None,
                  title: str | None = None) -> dict:
    """Summaries + per-image scores -> `OUT/results.json` and `OUT/report.md` (both atomic)."""
    users, ckpts = manifest["users"], list(manifest["checkpoints"])
    cats = manifest["prompts"].get("categories")
    summary = summarize(scores, users, ckpts, cats)
    results = {
        "prompts": {"source": manifest["prompts"]["source"], "count": len(manifest["prompts"]["texts"])},
        "users": users,
        "checkpoints": manifest["checkpoints"],
        "rewards": summary,
        "judge": judge,
        "scores": scores,
    }
    write_json(Path(out_dir) / RESULTS, results)
    title = title or f"Evaluation on {manifest['prompts']['source']} ({len(manifest['prompts']['texts'])} " \
                     f"prompts, {len(users)} users)"
    write_text(Path(out_dir) / REPORT, markdown_report(summary, ckpts, judge, title))
    return results

