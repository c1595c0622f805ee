"""Figures a person reads at a glance (matplotlib, Agg backend, PNG written atomically).

Generic helpers, usable by any world's report: win-rate bars per user with 95% intervals (seen and
unseen users told apart, goal lines), reward distributions per model, reward-vs-λ curves, a
per-category heatmap (PartiPrompts), and training curves (and held-out evaluation curves) of
several runs overlaid from their metrics.jsonl. `evaluation_figures` draws the set an `eval` results.json supports.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from ppd_engine.files import atomic_path

TRAINING_KEYS = ("loss", "implicit_acc", "reward_margin")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> str:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def win_rate_bars(path, bars: Mapping[str, Mapping[str, tuple[float, tuple[float, float] | None]]],
                  roles: Mapping[str, str | None] | None = None, goals: Mapping[str, float] | None = None,
                  title: str = "Win rate", ylabel: str = "win rate") -> str:
    """Grouped bars: bars[comparison][user] = (win rate, (lo, hi) or None). Unseen users' bars are
    hatched and their labels marked "*"; a dashed line at 0.5 (no preference) and, per user, a
    short goal line from `goals`."""
    plt = _pyplot()
    comps = list(bars)
    users = list(dict.fromkeys(u for c in comps for u in bars[c]))
    width = 0.8 / max(1, len(comps))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(users) * max(1, len(comps)) + 2), 3.6))
    for k, comp in enumerate(comps):
        xs, ys, err_lo, err_hi, hatch = [], [], [], [], []
        for i, u in enumerate(users):
            wr, ci = bars[comp].get(u, (math.nan, None))
            xs.append(i + (k - (len(comps) - 1) / 2) * width)
            ys.append(wr)
            lo, hi = ci if ci else (wr, wr)
            err_lo.append(max(0.0, wr - lo) if not math.isnan(wr) else 0.0)
            err_hi.append(max(0.0, hi - wr) if not math.isnan(wr) else 0.0)
            hatch.append("//" if (roles or {}).get(u) == "unseen" else "")
        rects = ax.bar(xs, ys, width, yerr=[err_lo, err_hi], capsize=2, ecolor="0.35",
                       error_kw={"elinewidth": 0.8}, label=comp.replace("_vs_", " vs "))
        for r, h in zip(rects, hatch):
            r.set_hatch(h)
    ax.axhline(0.5, color="gray", ls="--", lw=1)
    for i, u in enumerate(users):
        if goals and u in goals:
            ax.hlines(goals[u], i - 0.45, i + 0.45, colors="black", lw=1.5)
    ax.set_xticks(range(len(users)))
    ax.set_xticklabels([u + ("*" if (roles or {}).get(u) == "unseen" else "") for u in users], rotation=45,
                       ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (" (* / hatched: unseen users)" if roles and "unseen" in roles.values() else ""),
                 fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def reward_distributions(path, samples: Mapping[str, Sequence[float]], reward: str) -> str:
    """One histogram per model of a reward's per-image values (same bins)."""
    import numpy as np

    plt = _pyplot()
    allv = np.concatenate([np.asarray(v, dtype=float) for v in samples.values()]) if samples else np.zeros(1)
    bins = np.histogram_bin_edges(allv[np.isfinite(allv)], bins=min(30, max(5, len(allv) // 4)))
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, v in samples.items():
        v = np.asarray(v, dtype=float)
        ax.hist(v, bins=bins, alpha=0.45, label=f"{name} (mean {np.nanmean(v):.3f})")
    ax.set_xlabel(reward)
    ax.set_ylabel("images")
    ax.set_title(f"{reward} per image", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def reward_vs_lambda(path, lambdas: Sequence[float], curves: Mapping[str, Sequence[float]],
                     rho: Mapping[str, float] | None = None, ylabel: str = "reward",
                     title: str = "Interpolation between two users") -> str:
    """curves[name][i] = mean reward at lambdas[i]; the legend carries Spearman ρ when given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, ys in curves.items():
        label = name + (f" (ρ = {rho[name]:+.2f})" if rho and name in rho else "")
        ax.plot(list(lambdas), list(ys), marker="o", label=label)
    ax.set_xlabel("λ (0 = user A, 1 = user B)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def category_heatmap(path, per_category: Mapping[str, Mapping[str, float]], reward: str,
                     relative_to: str | None = None) -> str:
    """Rows = categories, columns = models; with `relative_to`, each cell is the difference to that
    model's mean in the category (so a win shows as a sign, not a shade of the absolute level)."""
    import numpy as np

    plt = _pyplot()
    models = [m for m in per_category if m != relative_to] if relative_to else list(per_category)
    cats = sorted({c for m in per_category.values() for c in m})
    grid = np.array([[per_category[m].get(c, math.nan) - (per_category[relative_to].get(c, math.nan)
                                                           if relative_to else 0.0) for m in models] for c in cats])
    fig, ax = plt.subplots(figsize=(1.2 * len(models) + 3, 0.35 * len(cats) + 1.5))
    lim = float(np.nanmax(np.abs(grid))) if relative_to and np.isfinite(grid).any() else None
    im = ax.imshow(grid, aspect="auto", cmap="RdBu" if relative_to else "viridis",
                   vmin=-lim if lim else None, vmax=lim if lim else None)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(cats)))
    ax.set_yticklabels(cats, fontsize=8)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, "nan" if math.isnan(v) else f"{v:.3f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax)
    ax.set_title(f"{reward} per category" + (f" minus {relative_to}" if relative_to else ""), fontsize=9)
    return _save(fig, path)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of RUN/metrics.jsonl (an unreadable trailing line, from a crash mid-write, is dropped)."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found (not a training run folder?)")
    rows = []
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def training_curves(path, runs: Mapping[str, str | os.PathLike], keys: Sequence[str] = TRAINING_KEYS,
                    sets: Sequence[str] = ()) -> str:
    """One panel per metric key, every run's curve overlaid (x = step). With `sets`, the held-out
    evaluation's curves instead (metrics.jsonl's eval/<set>/<key>): one line per run and set, a
    colour per run, a line style per set, a dot per evaluation."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    series = [(f" {s}", f"eval/{s}/", ("-", "--", ":", "-.")[i % 4]) for i, s in enumerate(sets)] or [("", "", "-")]
    for i, (name, d) in enumerate(runs.items()):
        rows = read_metrics(d)
        for ax, key in zip(axes[0], keys):
            for label, prefix, style in series:
                pts = [(r["step"], r[prefix + key]) for r in rows if isinstance(r.get(prefix + key), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), label=name + label, lw=1, color=f"C{i}", ls=style,
                            marker="o" if sets else None, ms=3)
    for ax, key in zip(axes[0], keys):
        ax.set_xlabel("step")
        ax.set_title(f"held-out {key}" if sets else key, fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def evaluation_figures(out_dir: str | os.PathLike, summary: Mapping, scores: Mapping, manifest: Mapping) -> list[str]:
    """PNGs for an eval folder (names relative to it): win-rate bars per reward, reward
    distributions per reward, a per-category heatmap per reward when prompts have categories,
    and training curves of the listed runs that have a metrics.jsonl."""
    out = Path(out_dir)
    roles = manifest.get("roles") or {}
    ckpts = list(manifest["checkpoints"])
    from .evaluate import plain_bases

    bases = plain_bases(manifest)
    made = []
    for reward, r in summary.items():
        pairs = [p for p in r["win_rates"] if p.split("_vs_")[-1] in bases] or list(r["win_rates"])
        if pairs:
            bars = {p: {u: (r["win_rates"][p]["per_user"][u], r["win_rates"][p]["per_user_ci95"][u])
                        for u in r["win_rates"][p]["per_user"]} for p in pairs}
            made.append(win_rate_bars(out / f"win_rates_{reward}.png", bars, roles,
                                      title=f"{reward} win rate per user, 95% bootstrap intervals"))
        flat = {c: [s for u in manifest["users"] for s in scores[reward][c][u]] for c in ckpts}
        made.append(reward_distributions(out / f"rewards_{reward}.png", flat, reward))
        if "per_category" in r:
            made.append(category_heatmap(out / f"categories_{reward}.png", r["per_category"], reward,
                                         relative_to=bases[0] if bases else None))
    runs = {c: m["run_dir"] for c, m in manifest["checkpoints"].items()
            if m.get("kind") != "base" and (Path(m["run_dir"]) / "metrics.jsonl").is_file()}
    if runs:
        made.append(training_curves(out / "training_curves.png", runs))
    return [Path(p).name for p in made]
