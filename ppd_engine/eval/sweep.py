"""β sweep: among runs trained with different β, pick the one with the best mean validation reward.

The paper picks β by the mean PickScore on Pick-a-Pic validation captions; here any reward and
prompt set work. β is read from each run's resolved config (`loss.beta`, in its `loss.beta_units`);
`python -m ppd_engine.sweep` launches the runs.
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
    beta_units: str = "official"


def run_beta(run_dir: str) -> tuple[float, str]:
    """(β, its units) of a run folder, from RUN/config.yaml (`loss.beta`, `loss.beta_units`)."""
    from ppd_engine.config import load_config

    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    loss = getattr(load_config(p), "loss", None)
    if getattr(loss, "beta", None) is None:
        raise KeyError(f"{p}: no loss.beta")
    return float(loss.beta), str(getattr(loss, "beta_units", "official"))


def pick_best(entries: Sequence[SweepEntry]) -> SweepEntry:
    """The entry with the highest mean reward (NaN means never win; the first of equal ones wins)."""
    ok = [e for e in entries if not math.isnan(e.mean_reward)]
    if not ok:
        raise ValueError("no run has a mean reward to compare")
    return max(ok, key=lambda e: e.mean_reward)


def build_entries(summary: Mapping, reward: str, runs: Mapping[str, str],
                  betas: Mapping[str, float | tuple[float, str]]) -> list[SweepEntry]:
    """Sweep entries from an evaluation summary (`report.summarize` output) of one reward; `betas`
    maps a run to β or (β, units)."""
    if reward not in summary:
        raise KeyError(f"no {reward!r} scores in the evaluation (have {sorted(summary)})")
    r = summary[reward]
    out = []
    for name, run_dir in runs.items():
        beta, units = betas[name] if isinstance(betas[name], tuple) else (betas[name], "official")
        out.append(SweepEntry(name, run_dir, beta, r["mean"][name], {u: v[name] for u, v in r["per_user"].items()},
                              units))
    return out


def sweep_report(entries: Sequence[SweepEntry], reward: str, prompts: str) -> tuple[dict, str]:
    """(JSON-able dict, markdown) of a sweep, runs sorted by β, the best one marked."""
    best = pick_best(entries)
    rows = sorted(entries, key=lambda e: e.beta)
    data = {"reward": reward, "prompts": prompts, "best": best.name, "best_beta": best.beta,
            "best_mean_reward": best.mean_reward, "runs": [asdict(e) for e in rows]}
    if len({e.beta_units for e in entries}) > 1:
        raise ValueError("the runs give β in different units (loss.beta_units); compare runs of one unit")
    data["beta_units"] = best.beta_units
    lines = [f"# β sweep: mean {reward} on {prompts}", "", f"| run | β ({best.beta_units} units) | mean reward | best |",
             "|---|---|---|---|"]
    for e in rows:
        mean = "nan" if math.isnan(e.mean_reward) else f"{e.mean_reward:.4f}"
        lines.append(f"| {e.name} | {e.beta:g} | {mean} | {'**yes**' if e is best else ''} |")
    lines += ["", f"Best: **{best.name}** (β = {best.beta:g} in {best.beta_units} units, "
                  f"mean {reward} = {best.mean_reward:.4f})."]
    return data, "\n".join(lines) + "\n"
