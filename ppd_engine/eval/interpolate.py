"""Interpolating two users at inference: e(λ) = (1 − λ)·e_A + λ·e_B, sampled with the same prompts
and seeds at every λ, scored with each user's own reward (synthetic users, ppd_engine.rewards_users).

If the model learned the users' tastes, user B's reward rises and user A's falls with λ; Spearman ρ
between λ and each reward (over every image) says how monotonically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .report import write_json, write_text

INTERPOLATION = "interpolation.json"


def lambda_id(a: str, b: str, lam: float) -> str:
    return f"{a}~{b}@{lam:g}"


class InterpolatedStore:
    """The store surface run_generation reads, holding e(λ) for every λ (K = 1 each)."""

    def __init__(self, store, a: str, b: str, lambdas: Sequence[float], embed_index: int = 0):
        ea, eb = store.get(a)[embed_index].float(), store.get(b)[embed_index].float()
        self.ids = [lambda_id(a, b, lam) for lam in lambdas]
        self.embeds = {i: ((1 - lam) * ea + lam * eb).unsqueeze(0) for i, lam in zip(self.ids, lambdas)}

    def users(self) -> list[str]:
        return list(self.ids)

    def get(self, user: str) -> torch.Tensor:
        return self.embeds[user]


def interpolation_summary(scores: Mapping[str, Mapping], checkpoint: str, a: str, b: str,
                          lambdas: Sequence[float], users) -> dict:
    """Per λ: mean own reward of A and of B; Spearman ρ of λ against each (over all images)."""
    from ppd_engine.rewards_users import spearman

    curves = {a: [], b: []}
    xs, ys = [], {a: [], b: []}
    for lam in lambdas:
        uid = lambda_id(a, b, lam)
        raw = {r: np.asarray(scores[r][checkpoint][uid], dtype=np.float64) for r in scores}
        for u in (a, b):
            vals = users.reward(u, raw)
            curves[u].append(float(vals.mean()))
            ys[u] += vals.tolist()
        xs += [lam] * len(raw[next(iter(raw))])
    return {"checkpoint": checkpoint, "user_a": a, "user_b": b, "lambdas": list(lambdas),
            "mean_own_reward": curves, "spearman": {u: spearman(xs, ys[u]) for u in (a, b)}}


def write_interpolation(out_dir: str, summary: dict) -> list[str]:
    """interpolation.json, interpolation.png and interpolation.md in `out_dir`."""
    from .plots import reward_vs_lambda

    out = Path(out_dir)
    a, b = summary["user_a"], summary["user_b"]
    png = reward_vs_lambda(out / "interpolation.png", summary["lambdas"], summary["mean_own_reward"],
                           summary["spearman"], ylabel="own reward (standardised)",
                           title=f"{summary['checkpoint']}: {a} (λ=0) → {b} (λ=1)")
    write_json(out / INTERPOLATION, summary)
    rows = [f"# Interpolation {a} → {b} ({summary['checkpoint']})", "",
            "| λ | " + f"{a}'s reward | {b}'s reward |", "|---|---|---|"]
    for i, lam in enumerate(summary["lambdas"]):
        rows.append(f"| {lam:g} | {summary['mean_own_reward'][a][i]:.4f} | {summary['mean_own_reward'][b][i]:.4f} |")
    rows += ["", f"Spearman ρ(λ, reward): {a} {summary['spearman'][a]:+.3f}, {b} {summary['spearman'][b]:+.3f} "
             "(expected: negative for A, positive for B)", "", f"![interpolation]({Path(png).name})"]
    write_text(out / "interpolation.md", "\n".join(rows) + "\n")
    return [INTERPOLATION, Path(png).name, "interpolation.md"]
