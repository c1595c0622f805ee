"""The toy run's evaluation report, computed from the saved 8-bit PNGs so anyone can recompute it.

Layout read here (written by run.py):
    RUN/eval/<model>/<user>/<index>.png          model in base | dpo | ppd; same index = same prompt and seed
    RUN/eval/interpolation/<A>__<B>/<lambda>/<index>.png
A user's own reward is the weighted sum of REWARDS with its weights; a win rate of model X over
model Y for a user is the fraction of indices where X's image has the higher own reward (ties 0.5).
Interpolation: the mean own reward of A (and of B) at each mixing weight lambda of A, and
Spearman's rho between lambda and A's mean reward over the lambda grid.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ppd_engine.files import save_image_atomic, write_json_atomic
from ppd_engine.worlds.toy.rewards import weighted_reward

MODELS = ("base", "dpo", "ppd")
GOALS = (  # (summary key, split, target) — the goals for the default run
    ("ppd_vs_base", "seen", 0.75),
    ("ppd_vs_base", "unseen", 0.65),
    ("ppd_vs_dpo", "all", 0.65),
)
RHO_TARGET = 0.9


# -- files --------------------------------------------------------------------------------------

def load_png(path: str | os.PathLike) -> torch.Tensor:
    """8-bit PNG -> (3, H, W) float32 in [0, 1], as a reader of the report would load it."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_folder(folder: str | os.PathLike) -> torch.Tensor:
    """All <index>.png of a folder, in index order -> (S, 3, H, W); error if indices have gaps."""
    folder = Path(folder)
    files = sorted(folder.glob("*.png"), key=lambda p: int(p.stem))
    if not files:
        raise FileNotFoundError(f"no samples (<index>.png) in {folder}")
    if [int(p.stem) for p in files] != list(range(len(files))):
        raise ValueError(f"{folder}: sample indices are not 0..{len(files) - 1}")
    return torch.stack([load_png(p) for p in files])


# -- statistics ---------------------------------------------------------------------------------

def win_rate(first: torch.Tensor, second: torch.Tensor) -> float:
    """Fraction of same-index pairs where `first` is higher (ties count 0.5); (S,), (S,) -> float."""
    if first.shape != second.shape:
        raise ValueError(f"win_rate needs same-index samples: {tuple(first.shape)} vs {tuple(second.shape)}")
    return ((first > second).double() + 0.5 * (first == second).double()).mean().item()


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson of average ranks); nan when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"spearman needs two 1-D sequences of equal length >= 2; got {x.shape}, {y.shape}")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def lambda_folder(lam: float) -> str:
    return f"{lam:.2f}"


# -- the report ---------------------------------------------------------------------------------

def compute_report(run_dir: str | os.PathLike, users: dict[str, dict], interpolation: list[tuple[str, str]],
                   lambdas: list[float]) -> dict:
    """Recompute report.json's content from RUN/eval.

    users: name -> {"split": "seen"|"unseen", "weights": {reward: w}}.
    interpolation: (A, B) pairs whose strips exist under RUN/eval/interpolation.
    """
    ev = Path(run_dir) / "eval"
    out_users = {}
    for name, info in users.items():
        rewards = {m: weighted_reward(load_folder(ev / m / name), info["weights"]) for m in MODELS}
        n = {m: int(r.shape[0]) for m, r in rewards.items()}
        if len(set(n.values())) != 1:
            raise ValueError(f"user {name}: models have different sample counts {n}")
        out_users[name] = {
            "split": info["split"], "weights": dict(info["weights"]), "samples": n["ppd"],
            "mean_reward": {m: rewards[m].mean().item() for m in MODELS},
            "ppd_vs_base": win_rate(rewards["ppd"], rewards["base"]),
            "ppd_vs_dpo": win_rate(rewards["ppd"], rewards["dpo"]),
            "dpo_vs_base": win_rate(rewards["dpo"], rewards["base"]),
        }
    summary: dict = {}
    for split in ("seen", "unseen", "all"):
        names = [u for u, r in out_users.items() if split == "all" or r["split"] == split]
        if not names:
            continue
        summary[split] = {"users": len(names), **{
            k: float(np.mean([out_users[u][k] for u in names])) for k in ("ppd_vs_base", "ppd_vs_dpo", "dpo_vs_base")}}
    interp: dict = {}
    for a, b in interpolation:
        folder = ev / "interpolation" / f"{a}__{b}"
        first, second, per_sample_l, per_sample_r = [], [], [], []
        for lam in lambdas:
            imgs = load_folder(folder / lambda_folder(lam))
            ra = weighted_reward(imgs, users[a]["weights"])
            first.append(ra.mean().item())
            second.append(weighted_reward(imgs, users[b]["weights"]).mean().item())
            per_sample_l += [lam] * len(ra)
            per_sample_r += ra.tolist()
        interp[f"{a}:{b}"] = {
            "first": a, "second": b, "lambdas": list(lambdas),
            "mean_reward_first": first, "mean_reward_second": second,
            "spearman_rho": spearman(lambdas, first),
            "spearman_rho_per_sample": spearman(per_sample_l, per_sample_r),
        }
    goals = []
    for key, split, target in GOALS:
        if split in summary:
            v = summary[split][key]
            goals.append({"name": f"average {key} ({split} users)", "value": v, "target": target, "met": v >= target})
    for name, r in interp.items():
        v = r["spearman_rho"]
        goals.append({"name": f"interpolation rho ({name})", "value": v, "target": RHO_TARGET,
                      "met": bool(np.isfinite(v) and v >= RHO_TARGET)})
    summary["goals"] = goals
    summary["all_goals_met"] = all(g["met"] for g in goals)
    return {"users": out_users, "summary": summary, "interpolation": interp}


def write_json(data: dict, path: str | os.PathLike) -> None:
    write_json_atomic(path, data, indent=2)


def format_table(report: dict) -> str:
    """The table a person reads first: per user mean own reward of base/dpo/ppd and win rates, then goals."""
    lines = []
    head = f"{'user':<14} {'split':<6} {'base':>7} {'dpo':>7} {'ppd':>7}   {'ppd>base':>8} {'ppd>dpo':>8} {'dpo>base':>8}"
    lines += ["mean own reward per model (higher = more to the user's taste) and win rates", head, "-" * len(head)]
    for name, r in report["users"].items():
        m = r["mean_reward"]
        lines.append(f"{name:<14} {r['split']:<6} {m['base']:>7.3f} {m['dpo']:>7.3f} {m['ppd']:>7.3f}   "
                     f"{r['ppd_vs_base']:>8.2f} {r['ppd_vs_dpo']:>8.2f} {r['dpo_vs_base']:>8.2f}")
    lines.append("-" * len(head))
    for split in ("seen", "unseen", "all"):
        s = report["summary"].get(split)
        if s:
            lines.append(f"{'average ' + split:<29} {'':>15}   {s['ppd_vs_base']:>8.2f} {s['ppd_vs_dpo']:>8.2f} "
                         f"{s['dpo_vs_base']:>8.2f}")
    for name, r in report["interpolation"].items():
        vals = " ".join(f"{v:.3f}" for v in r["mean_reward_first"])
        lams = " ".join(f"{v:g}" for v in r["lambdas"])
        lines.append(f"interpolation {name}: lambda [{lams}] -> mean reward of {r['first']} [{vals}], "
                     f"Spearman rho {r['spearman_rho']:.2f}")
    lines.append("goals:")
    for g in report["summary"]["goals"]:
        lines.append(f"  [{'MET   ' if g['met'] else 'MISSED'}] {g['name']}: {g['value']:.3f} (target >= {g['target']})")
    lines.append("ALL GOALS MET" if report["summary"]["all_goals_met"]
                 else "SOME GOALS MISSED (see above; the numbers are what they are)")
    return "\n".join(lines)


# -- the picture --------------------------------------------------------------------------------

def _tile(images: list[torch.Tensor], zoom: int) -> Image.Image:
    """Images (3, h, w) side by side, upscaled by `zoom` (nearest: pixels stay pixels)."""
    row = torch.cat(images, dim=2)
    arr = (row.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    return im.resize((im.width * zoom, im.height * zoom), Image.NEAREST)


def render_report_png(run_dir: str | os.PathLike, report: dict, per_cell: int = 4, zoom: int = 4) -> Path:
    """RUN/report.png: rows = users, columns = base | dpo | ppd (same seeds), then interpolation strips."""
    ev = Path(run_dir) / "eval"
    users = list(report["users"])
    sample = load_png(ev / "base" / users[0] / "0.png")
    h, w = sample.shape[1:]
    cell_w, cell_h = per_cell * w * zoom, h * zoom
    label_w, gap, head_h = 190, 8, 22
    interp = report["interpolation"]
    n_lams = max((len(r["lambdas"]) for r in interp.values()), default=0)
    width = max(label_w + len(MODELS) * (cell_w + gap), label_w + n_lams * (w * zoom * 2 + gap))
    height = head_h + len(users) * (cell_h + gap) + (head_h + len(interp) * (cell_h + gap) if interp else 0) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, m in enumerate(MODELS):
        draw.text((label_w + j * (cell_w + gap), 4), m, fill=(0, 0, 0))
    y = head_h
    for name in users:
        r = report["users"][name]
        draw.text((4, y + 2), f"{name} ({r['split']})", fill=(0, 0, 0))
        draw.text((4, y + 16), f"ppd>base {r['ppd_vs_base']:.2f}", fill=(90, 90, 90))
        draw.text((4, y + 30), f"ppd>dpo  {r['ppd_vs_dpo']:.2f}", fill=(90, 90, 90))
        for j, m in enumerate(MODELS):
            imgs = [load_png(ev / m / name / f"{i}.png") for i in range(min(per_cell, r["samples"]))]
            canvas.paste(_tile(imgs, zoom), (label_w + j * (cell_w + gap), y))
        y += cell_h + gap
    if interp:
        draw.text((4, y + 4), "mix: lambda*A + (1-lambda)*B", fill=(0, 0, 0))
        for j, lam in enumerate(next(iter(interp.values()))["lambdas"]):
            draw.text((label_w + j * (w * zoom * 2 + gap), y + 4), f"lambda={lam:g}", fill=(0, 0, 0))
        y += head_h
        for name, r in interp.items():
            draw.text((4, y + 2), f"A={r['first']}", fill=(0, 0, 0))
            draw.text((4, y + 16), f"B={r['second']}", fill=(0, 0, 0))
            draw.text((4, y + 30), f"rho {r['spearman_rho']:.2f}", fill=(90, 90, 90))
            folder = ev / "interpolation" / f"{r['first']}__{r['second']}"
            for j, lam in enumerate(r["lambdas"]):
                imgs = [load_png(f) for f in sorted((folder / lambda_folder(lam)).glob("*.png"),
                                                    key=lambda f: int(f.stem))[:2]]
                canvas.paste(_tile(imgs, zoom), (label_w + j * (w * zoom * 2 + gap), y))
            y += cell_h + gap
    path = Path(run_dir) / "report.png"
    save_image_atomic(canvas, path)
    return path
