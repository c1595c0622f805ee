"""The toy report's figures, drawn with PIL (matplotlib is not among the engine's dependencies):

    RUN/figures/win_rates.png     per user and per split average: win rates with 95% intervals,
                                  seen / unseen marked, goal lines and the 0.5 line
    RUN/figures/rewards.png       each user's own-reward distribution per model (5/25/50/75/95%)
    RUN/figures/interpolation.png mean reward of both users against the mixing weight lambda
    RUN/figures/training.png      loss, implicit accuracy and reward margin per step of every trained
                                  run (PPD, DPO, oracle PPD), from their metrics.jsonl
    RUN/report.md                 the goals, the identification numbers and links to all of them
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ppd_engine.files import atomic_path, save_image_atomic
from ppd_engine.worlds.toy.report import GOALS

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
MODEL_COLOURS = {"base": (127, 127, 127), "dpo": (255, 127, 14), "ppd": (31, 119, 180),
                 "ppd_guided": (148, 103, 189), "ppd_oracle": (44, 160, 44)}
GREY, BLACK, GOAL = (200, 200, 200), (0, 0, 0), (230, 0, 230)


class Panel:
    """One plot area of a canvas: data coordinates -> pixels, axes with ticks, a title."""

    def __init__(self, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], xlim, ylim, title: str = "",
                 xlabel: str = "", ylabel: str = ""):
        self.d, (self.x0, self.y0, self.x1, self.y1) = draw, box
        self.xlim, self.ylim = xlim, ylim
        self.d.rectangle(box, outline=BLACK)
        self.d.text((self.x0, self.y0 - 14), title, fill=BLACK)
        self.d.text((self.x1 - 6 * len(xlabel), self.y1 + 16), xlabel, fill=BLACK)
        self.d.text((self.x0 + 4, self.y0 + 2), ylabel, fill=(90, 90, 90))

    def px(self, x: float, y: float) -> tuple[float, float]:
        (a, b), (c, e) = self.xlim, self.ylim
        fx = (x - a) / (b - a) if b != a else 0.5
        fy = (y - c) / (e - c) if e != c else 0.5
        return self.x0 + fx * (self.x1 - self.x0), self.y1 - fy * (self.y1 - self.y0)

    def yticks(self, values) -> None:
        for v in values:
            _, y = self.px(self.xlim[0], v)
            self.d.line([(self.x0 - 3, y), (self.x0, y)], fill=BLACK)
            self.d.text((self.x0 - 34, y - 5), f"{v:.4g}", fill=BLACK)

    def xticks(self, values, labels=None) -> None:
        for i, v in enumerate(values):
            x, _ = self.px(v, self.ylim[0])
            self.d.line([(x, self.y1), (x, self.y1 + 3)], fill=BLACK)
            label = labels[i] if labels else f"{v:.4g}"
            self.d.text((x - 3 * len(label), self.y1 + 4), label, fill=BLACK)

    def hline(self, y: float, colour, label: str = "") -> None:
        _, py = self.px(self.xlim[0], y)
        for x in range(self.x0, self.x1, 8):  # dashed
            self.d.line([(x, py), (min(x + 4, self.x1), py)], fill=colour)
        if label:
            self.d.text((self.x1 - 6 * len(label) - 2, py - 12), label, fill=colour)

    def line(self, xs, ys, colour, width: int = 2, marks: bool = False) -> None:
        pts = [self.px(x, y) for x, y in zip(xs, ys) if np.isfinite(y)]
        if len(pts) > 1:
            self.d.line(pts, fill=colour, width=width)
        if marks:
            for x, y in pts:
                self.d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)


def _legend(draw, x: int, y: int, items) -> None:
    for i, (label, colour) in enumerate(items):
        draw.rectangle([x, y + 14 * i + 2, x + 10, y + 14 * i + 10], fill=colour)
        draw.text((x + 14, y + 14 * i), label, fill=BLACK)


def _save(canvas: Image.Image, path: Path) -> Path:
    save_image_atomic(canvas, path)
    return path


def win_rate_figure(report: dict, path: Path) -> Path:
    """Grouped bars: for every user, then the split averages, each comparison's rate and interval."""
    users = report["users"]
    keys = ["ppd_vs_base", "ppd_vs_dpo", *(f"{m}_vs_base" for m in report["models"] if m.startswith("ppd_"))]
    rows = [(n, users[n]["split"], users[n]["win"]) for n in users]
    rows += [(f"avg {s}", s, {k: report["summary"][s][k] for k in keys}) for s in ("seen", "unseen")
             if s in report["summary"]]
    group = 16 * len(keys) + 14
    legend_h = 14 * (len(keys) + 1) + 10
    w, h = 90 + group * len(rows) + 20, 360 + legend_h
    canvas = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(canvas)
    p = Panel(d, (60, 40, w - 20, h - legend_h - 40), (0, len(rows)), (0, 1), "win rates with 95% bootstrap intervals "
              "(ppd = the headline: generic encoder, no user guidance)")
    p.yticks([0, 0.25, 0.5, 0.75, 1.0])
    p.hline(0.5, GREY, "0.5")
    targets = {(k, s): t for k, s, t in GOALS}
    for i, (name, split, win) in enumerate(rows):
        gx = p.px(i, 0)[0] + 7
        if split == "unseen":
            d.rectangle([gx - 5, p.y0 + 1, gx + group - 9, p.y1 - 1], fill=(245, 240, 225))
        for j, k in enumerate(keys):
            colour = PALETTE[j % len(PALETTE)]
            x = gx + 16 * j
            _, ytop = p.px(0, win[k]["rate"])
            d.rectangle([x, ytop, x + 11, p.y1], fill=colour)
            lo, hi = (p.px(0, v)[1] for v in win[k]["ci95"])
            d.line([(x + 5, lo), (x + 5, hi)], fill=BLACK, width=2)
            d.line([(x + 2, lo), (x + 9, lo)], fill=BLACK)
            d.line([(x + 2, hi), (x + 9, hi)], fill=BLACK)
        for j, k in enumerate(keys):  # goal ticks over this group's bars
            t = targets.get((k, split)) or targets.get((k, "all"))
            if t is not None:
                _, ty = p.px(0, t)
                x = gx + 16 * j
                d.line([(x - 2, ty), (x + 13, ty)], fill=GOAL, width=3)
        label = f"{name} ({split[0]})"
        d.text((gx - 4, p.y1 + 4 + 12 * (i % 2)), label, fill=BLACK)
    _legend(d, 70, h - legend_h, [(k.replace("_vs_", " beats "), PALETTE[j % len(PALETTE)]) for j, k in enumerate(keys)]
            + [("goal of the split average (tick); shaded = unseen users", GOAL)])
    return _save(canvas, path)


def reward_figure(report: dict, path: Path) -> Path:
    """Per user, per model: box 25-75%, whiskers 5-95%, a tick at the median of the own reward."""
    users, models = report["users"], report["models"]
    cols, cw, ch = 4, 300, 170
    nrow = -(-len(users) // cols)
    canvas = Image.new("RGB", (cols * cw + 20, nrow * ch + 60), "white")
    d = ImageDraw.Draw(canvas)
    d.text((10, 8), "own reward per model (box 25-75%, whiskers 5-95%, line = median)", fill=BLACK)
    for u, (name, r) in enumerate(users.items()):
        vals = {m: np.asarray(r["rewards"][m]) for m in models}
        lo = min(np.percentile(v, 5) for v in vals.values())
        hi = max(np.percentile(v, 95) for v in vals.values())
        x0, y0 = 50 + (u % cols) * cw, 50 + (u // cols) * ch
        p = Panel(d, (x0, y0, x0 + cw - 70, y0 + ch - 50), (0, len(models)), (lo, hi), f"{name} ({r['split']})")
        p.yticks([lo, hi])
        p.xticks([i + 0.5 for i in range(len(models))], [m.replace("ppd_", "") for m in models])
        for i, m in enumerate(models):
            q5, q25, q50, q75, q95 = np.percentile(vals[m], [5, 25, 50, 75, 95])
            xa, xb = p.px(i + 0.25, 0)[0], p.px(i + 0.75, 0)[0]
            xm = (xa + xb) / 2
            c = MODEL_COLOURS.get(m, BLACK)
            d.line([(xm, p.px(0, q5)[1]), (xm, p.px(0, q95)[1])], fill=c)
            d.rectangle([xa, p.px(0, q75)[1], xb, p.px(0, q25)[1]], outline=c, width=2)
            d.line([(xa, p.px(0, q50)[1]), (xb, p.px(0, q50)[1])], fill=BLACK, width=2)
    return _save(canvas, path)


def interpolation_figure(report: dict, path: Path) -> Path:
    interp = report["interpolation"]
    canvas = Image.new("RGB", (max(1, len(interp)) * 360 + 20, 300), "white")
    d = ImageDraw.Draw(canvas)
    for i, r in enumerate(interp.values()):
        lams = r["lambdas"]
        ys = r["mean_reward_first"] + r["mean_reward_second"]
        lo, hi = min(ys), max(ys)
        x0 = 60 + 360 * i
        lo_ci, hi_ci = r["spearman_rho_ci95"]
        p = Panel(d, (x0, 40, x0 + 280, 230), (0, 1), (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)),
                  f"{r['first']} <-> {r['second']}: rho {r['spearman_rho']:.2f} [{lo_ci:.2f},{hi_ci:.2f}]", "lambda")
        p.yticks([lo, hi])
        p.xticks(lams)
        p.line(lams, r["mean_reward_first"], PALETTE[0], marks=True)
        p.line(lams, r["mean_reward_second"], PALETTE[1], marks=True)
        _legend(d, x0, 250, [(f"mean reward of {r['first']}", PALETTE[0]),
                             (f"mean reward of {r['second']}", PALETTE[1])])
    return _save(canvas, path)


def _read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def training_figure(runs: dict[str, Path], path: Path) -> Path:
    """Three panels, every run overlaid; a 10-step moving average keeps per-step noise readable."""
    rows = {name: _read_metrics(p) for name, p in runs.items() if p.is_file()}
    keys = [("loss", "DPO loss"), ("implicit_acc", "implicit accuracy"), ("reward_margin", "reward margin")]
    canvas = Image.new("RGB", (3 * 330 + 40, 300), "white")
    d = ImageDraw.Draw(canvas)
    for i, (k, title) in enumerate(keys):
        series = {}
        for name, rs in rows.items():
            st = np.asarray([r["step"] for r in rs if k in r], dtype=float)
            v = np.asarray([r[k] for r in rs if k in r], dtype=float)
            if len(v):
                win = min(10, len(v))
                series[name] = (st[win - 1:], np.convolve(v, np.ones(win) / win, mode="valid"))
        allv = np.concatenate([v for _, v in series.values()]) if series else np.zeros(1)
        allst = np.concatenate([s for s, _ in series.values()]) if series else np.ones(1)
        lo, hi = float(allv.min()), float(allv.max())
        x0 = 60 + 330 * i
        p = Panel(d, (x0, 40, x0 + 260, 230), (0, float(allst.max())), (lo, hi + 1e-9), title + " (10-step mean)",
                  "step")
        p.yticks([lo, hi])
        p.xticks([0, float(allst.max())])
        for name, (st, v) in series.items():
            p.line(st, v, MODEL_COLOURS.get(name, BLACK))
    _legend(d, 60, 250, [(n, MODEL_COLOURS.get(n, BLACK)) for n in rows])
    return _save(canvas, path)


def write_figures(run_dir: str | os.PathLike, report: dict) -> Path:
    """Every figure into RUN/figures and RUN/report.md linking them; returns report.md's path."""
    run_dir = Path(run_dir)
    fig = run_dir / "figures"
    fig.mkdir(parents=True, exist_ok=True)
    runs = {"ppd": run_dir / "metrics.jsonl", "dpo": run_dir / "dpo" / "metrics.jsonl",
            "ppd_oracle": run_dir / "oracle" / "metrics.jsonl"}
    made = [("Win rates", win_rate_figure(report, fig / "win_rates.png")),
            ("Own-reward distributions", reward_figure(report, fig / "rewards.png")),
            ("Interpolation", interpolation_figure(report, fig / "interpolation.png")),
            ("Training curves", training_figure(runs, fig / "training.png"))]
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
        lines += ["", f"## {title}", "", f"![{title}]({p.relative_to(run_dir).as_posix()})"]
    md = run_dir / "report.md"
    with atomic_path(md) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return md
