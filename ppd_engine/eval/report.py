"""Numbers and tables from per-image scores: means, per-user / per-category breakdowns, win rates.

Score layout everywhere: `scores[reward][checkpoint][user]` is a list of floats indexed by prompt
position (the same index for every checkpoint, so index i of two checkpoints is a same-prompt,
same-seed pair).
"""

from __future__ import annotations

import math
import os
from itertools import combinations
from typing import Mapping, Sequence

from ppd_engine.files import write_json_atomic, write_text_atomic

Scores = Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]]


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Fraction of same-index pairs where `a` scores higher than `b`; ties count 0.5."""
    if len(a) != len(b):
        raise ValueError(f"win_rate needs equal lengths, got {len(a)} and {len(b)}")
    if not a:
        return math.nan
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    return wins / len(a)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def pair_key(a: str, b: str) -> str:
    return f"{a}_vs_{b}"


def summarize(scores: Scores, users: Sequence[str], checkpoints: Sequence[str],
              categories: Sequence[str] | None = None) -> dict:
    """Per reward: mean per checkpoint (over every user's images), per-user means, per-category means
    (when `categories[i]` names prompt i's category), and win rates for every checkpoint pair
    (first listed vs second: overall over all same-index pairs, and per user)."""
    out: dict = {}
    for reward, by_ckpt in scores.items():
        missing = [c for c in checkpoints if c not in by_ckpt]
        if missing:
            raise KeyError(f"reward {reward!r}: no scores for checkpoint(s) {missing}")
        flat = {c: [s for u in users for s in by_ckpt[c][u]] for c in checkpoints}
        r: dict = {
            "mean": {c: _mean(flat[c]) for c in checkpoints},
            "per_user": {u: {c: _mean(by_ckpt[c][u]) for c in checkpoints} for u in users},
            "win_rates": {},
        }
        for a, b in combinations(checkpoints, 2):
            r["win_rates"][pair_key(a, b)] = {
                "overall": win_rate(flat[a], flat[b]),
                "per_user": {u: win_rate(by_ckpt[a][u], by_ckpt[b][u]) for u in users},
            }
        if categories is not None and any(categories):
            r["per_category"] = {c: category_means(by_ckpt[c], users, categories) for c in checkpoints}
        out[reward] = r
    return out


def category_means(by_user: Mapping[str, Sequence[float]], users: Sequence[str],
                   categories: Sequence[str]) -> dict[str, float]:
    """Mean score per prompt category over all users' images (sorted by category name)."""
    sums: dict[str, list[float]] = {}
    for u in users:
        vals = by_user[u]
        if len(vals) != len(categories):
            raise ValueError(f"user {u!r}: {len(vals)} scores for {len(categories)} prompts")
        for v, cat in zip(vals, categories):
            sums.setdefault(cat or "(none)", []).append(v)
    return {cat: _mean(v) for cat, v in sorted(sums.items())}


def _fmt(x: float, digits: int = 4) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_report(summary: Mapping, checkpoints: Sequence[str], judge: Mapping | None = None,
                    title: str = "Evaluation") -> str:
    """Markdown: mean reward per checkpoint, win-rate table, judge win rates, per-category tables."""
    lines = [f"# {title}", "", "## Mean reward per checkpoint", ""]
    lines.append("| reward | " + " | ".join(checkpoints) + " |")
    lines.append("|---|" + "---|" * len(checkpoints))
    for reward, r in summary.items():
        lines.append(f"| {reward} | " + " | ".join(_fmt(r["mean"][c]) for c in checkpoints) + " |")
    pairs = [pair_key(a, b) for a, b in combinations(checkpoints, 2)]
    if pairs:
        lines += ["", "## Win rate (first vs second; same prompt and seed; ties 0.5)", ""]
        lines.append("| reward | " + " | ".join(p.replace("_vs_", " vs ") for p in pairs) + " |")
        lines.append("|---|" + "---|" * len(pairs))
        for reward, r in summary.items():
            lines.append(f"| {reward} | "
                         + " | ".join(_fmt(r["win_rates"][p]["overall"], 3) for p in pairs) + " |")
    if judge:
        lines += ["", "## VLM-judge win rate (order-consistent judgements only)", ""]
        lines.append("| pair | win rate | kept | dropped |")
        lines.append("|---|---|---|---|")
        for p, j in judge.items():
            lines.append(f"| {p.replace('_vs_', ' vs ')} | {_fmt(j.get('win_rate', math.nan), 3)} | "
                         f"{j.get('kept', 0)} | {j.get('dropped', 0)} |")
    for reward, r in summary.items():
        if "per_category" not in r:
            continue
        cats = sorted({k for c in checkpoints for k in r["per_category"][c]})
        lines += ["", f"## {reward} per category", ""]
        lines.append("| category | " + " | ".join(checkpoints) + " |")
        lines.append("|---|" + "---|" * len(checkpoints))
        for cat in cats:
            lines.append(f"| {cat} | " + " | ".join(_fmt(r["per_category"][c].get(cat, math.nan))
                                                 for c in checkpoints) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomic JSON write (temp file in the same folder, then rename); NaN is written as null."""
    write_json_atomic(path, _nan_to_none(obj), indent=2)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic text write."""
    write_text_atomic(path, text)


def _nan_to_none(obj):
    # Strict JSON has no NaN; an empty group's mean becomes null.
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj
