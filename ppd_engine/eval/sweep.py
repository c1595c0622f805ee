"""β sweep: among runs trained with different β, pick the one with the best mean validation reward.

The paper picks β by the mean PickScore on Pick-a-Pic validation captions; here any reward and
prompt set work. β is read from each run's resolved config (`loss.beta`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence


@dataclass
class SweepEntry:
    name: str
    run_dir: str
    beta: float
    mean_reward: float
    per_user: dict[str, float]


def run_beta(run_dir: str) -> float:
    """β of a run folder, from RUN/config.yaml (`loss.beta`)."""
    from ppd_engine.config import load_config

    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    beta = getattr(getattr(load_config(p), "loss", None), "beta", None)
    if beta is None:
        raise KeyError(f"{p}: no loss.beta")
    return float(beta)


def pick_best(entries: Sequence[SweepEntry]) -> SweepEntry:
    """The entry with the highest mean reward (NaN means never win; the first of equal ones wins)."""
    ok = [e for e in entries if not math.isnan(e.mean_reward)]
    if not ok:
        raise ValueError("no run has a mean reward to compare")
    return max(ok, key=lambda e: e.mean_reward)


def build_entries(summary: Mapping, reward: str, runs: Mapping[str, str],
                  betas: Mapping[str, float]) -> list[SweepEntry]:
    """Sweep entries from an evaluation summary (`report.summarize` output) of one reward."""
    if reward not in summary:
        raise KeyError(f"no {reward!r} scores in the evaluation (have {sorted(summary)})")
    r = summary[reward]
    return [SweepEntry(name, run_dir, betas[name], r["mean"][name],
                       {u: v[name] for u, v in r["per_user"].items()})
            for name, run_dir in runs.items()]


def sweep_report(entries: Sequence[SweepEntry], reward: str, prompts: str) -> tuple[dict, str]:
    """(JSON-able dict, markdown) of a sweep, runs sorted by β, the best one marked."""
    best = pick_best(entries)
    rows = sorted(entries, key=lambda e: e.beta)
    data = {"reward": reward, "prompts": prompts, "best": best.name, "best_beta": best.beta,
            "best_mean_reward": best.mean_reward, "runs": [asdict(e) for e in rows]}
    lines = [f"# β sweep: mean {reward} on {prompts}", "", "| run | β | mean reward | best |",
             "|---|---|---|---|"]
    for e in rows:
        mean = "nan" if math.isnan(e.mean_reward) else f"{e.mean_reward:.4f}"
        lines.append(f"| {e.name} | {e.beta:g} | {mean} | {'**yes**' if e is best else ''} |")
    lines += ["", f"Best: **{best.name}** (β = {best.beta:g}, mean {reward} = {best.mean_reward:.4f})."]
    return data, "\n".join(lines) + "\n"
