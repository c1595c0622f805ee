"""The toy report's figures, drawn with the engine's plotting helpers (ppd_engine.eval.plots):

    RUN/figures/win_rates.png           per user and per split average: win rates with 95% intervals,
                                        unseen users hatched, each user's goal line, the 0.5 line
    RUN/figures/rewards/<user>.png      that user's own-reward distribution per model
    RUN/figures/interpolation_<A>__<B>.png  mean reward of both users against the mixing weight
    RUN/figures/training.png            loss, implicit accuracy and reward margin per step of every
                                        trained run (PPD, DPO, oracle PPD), from their metrics.jsonl
    RUN/figures/heldout.png             the same on the held-out pairs (log.eval_every): seen users'
                                        unused pairs (solid) and unseen users' pairs (dashed)
    RUN/report.md                       the goals, the identification numbers and links to all of them
"""

from __future__ import annotations

import os
from pathlib import Path

from ppd_engine.eval import plots
from ppd_engine.files import atomic_path
from ppd_engine.worlds.toy.report import EXTRA_MODELS, GOALS

SPLITS = ("seen", "unseen")


def win_rate_figure(report: dict, path: Path) -> str:
    users, summary = report["users"], report["summary"]
    keys = ["ppd_vs_base", "ppd_vs_dpo", *(f"{m}_vs_base" for m in report["models"] if m in EXTRA_MODELS)]
    bars = {}
    for k in keys:
        bars[k] = {n: (u["win"][k]["rate"], tuple(u["win"][k]["ci95"])) for n, u in users.items()}
        bars[k].update({f"average {s}": (summary[s][k]["rate"], tuple(summary[s][k]["ci95"]))
                        for s in SPLITS if s in summary})
    roles = {n: u["split"] for n, u in users.items()} | {f"average {s}": s for s in SPLITS}
    target = {split: t for key, split, t in GOALS if key == "ppd_vs_base"}  # the headline's goal per split
    goals = {n: target[r] for n, r in roles.items() if r in target}
    return plots.win_rate_bars(path, bars, roles, goals,
                               title="Win rates, 95% bootstrap intervals; ppd = generic encoder, no user guidance; "
                                     "line = goal of ppd vs base")


def write_figures(run_dir: str | os.PathLike, report: dict) -> Path:
    """Every figure into RUN/figures and RUN/report.md linking them; returns report.md's path."""
    run_dir = Path(run_dir)
    fig = run_dir / "figures"
    (fig / "rewards").mkdir(parents=True, exist_ok=True)
    made = [("Win rates", win_rate_figure(report, fig / "win_rates.png"))]
    for a_b, r in report["interpolation"].items():
        made.append((f"Interpolation {a_b}", plots.reward_vs_lambda(
            fig / f"interpolation_{r['first']}__{r['second']}.png", r["lambdas"],
            {f"reward of {r['first']}": r["mean_reward_first"], f"reward of {r['second']}": r["mean_reward_second"]},
            rho={f"reward of {r['first']}": r["spearman_rho"]}, ylabel="mean own reward",
            title=f"lambda * {r['first']} + (1 - lambda) * {r['second']}")))
    runs = {"ppd": run_dir, "dpo": run_dir / "dpo", "ppd_oracle": run_dir / "oracle"}
    runs = {n: d for n, d in runs.items() if (d / "metrics.jsonl").is_file()}
    made.append(("Training curves", plots.training_curves(fig / "training.png", runs)))
    sets = [s for s in SPLITS if any(f"eval/{s}/loss" in r for d in runs.values() for r in plots.read_metrics(d))]
    if sets:
        made.append(("Held-out curves (seen users' unused pairs, unseen users' pairs)",
                     plots.training_curves(fig / "heldout.png", runs, sets=sets)))
    for name, u in report["users"].items():
        made.append((f"Own reward of {name} ({u['split']})", plots.reward_distributions(
            fig / "rewards" / f"{name}.png", u["rewards"], f"own reward of {name}")))
    lines = ["# Toy world report", "", "Numbers: `report.json` (recomputable from `eval/`). Samples: `report.png`.", "",
             "## Goals (MET only when the 95% interval's lower bound clears the target)", "",
             "| goal | value | 95% interval | target | status |", "|---|---|---|---|---|"]
    for g in report["summary"]["goals"]:
        lines.append(f"| {g['name']} | {g['value']:.3f} | [{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}] | "
                     f"{g['target']} | {g['status']} |")
    for enc, r in report.get("identification", {}).items():
        lines += ["", f"Identification ({enc} encoder): Spearman rho between embedding and reward distances "
                  f"{r['distance_spearman']:.2f}; top-1 retrieval from a new 4-shot draw {r['top1_retrieval']:.2f} "
                  f"(chance {r['chance']:.2f})."]
    for title, p in made:
        lines += ["", f"## {title}", "", f"![{title}]({Path(p).relative_to(run_dir).as_posix()})"]
    md = run_dir / "report.md"
    with atomic_path(md) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return md
