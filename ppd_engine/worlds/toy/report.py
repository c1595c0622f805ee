"""The toy run's evaluation report, computed from the saved 8-bit PNGs so anyone can recompute it.

Layout read here (written by run.py):
    RUN/eval/<model>/<user>/<index>.png          model in base | dpo | ppd [| ppd_guided | ppd_oracle];
                                                 same index = same prompt and seed for every model and user
    RUN/eval/interpolation/<A>__<B>/<lambda>/<index>.png
A user's own reward is the weighted sum of REWARDS with its weights; a win rate of model X over
model Y for a user is the fraction of indices where X's image has the higher own reward (ties 0.5).
Interpolation: the mean own reward of A (and of B) at each mixing weight lambda of A, and
Spearman's rho between lambda and A's mean reward over the lambda grid.

Every number carries a 95% percentile-bootstrap interval over the sample indices. An index is one
(prompt, seed) shared by all users, so a split's average is bootstrapped by resampling the indices
once for all its users (their outcomes are correlated through the shared seeds). A goal is MET only
when the interval's lower bound clears the target; a point estimate above the target with a lower
bound below it is "not significant".
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ppd_engine.files import save_image_atomic, write_json_atomic
from ppd_engine.worlds.toy.rewards import weighted_reward

MODELS = ("base", "dpo", "ppd")  # always there; extra columns (ppd_guided, ppd_oracle) follow them
EXTRA_MODELS = ("ppd_guided", "ppd_oracle")
GOALS = (  # (comparison, split, target) — the goals for the default run, on the headline ppd
    ("ppd_vs_base", "seen", 0.75),
    ("ppd_vs_base", "unseen", 0.65),
    ("ppd_vs_dpo", "all", 0.65),
)
RHO_TARGET = 0.9
CONFIDENCE = 0.95


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

def outcomes(first: torch.Tensor, second: torch.Tensor) -> np.ndarray:
    """Per index: 1 where `first` is higher, 0.5 on a tie, 0 else; (S,), (S,) -> (S,) float64."""
    if first.shape != second.shape:
        raise ValueError(f"win_rate needs same-index samples: {tuple(first.shape)} vs {tuple(second.shape)}")
    return ((first > second).double() + 0.5 * (first == second).double()).numpy()


def win_rate(first: torch.Tensor, second: torch.Tensor) -> float:
    """Fraction of same-index pairs where `first` is higher (ties count 0.5); (S,), (S,) -> float."""
    return float(outcomes(first, second).mean())


def bootstrap_indices(samples: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, samples) indices drawn with replacement, seeded."""
    return np.random.default_rng(seed).integers(0, samples, size=(resamples, samples))


def interval(boot: np.ndarray) -> list[float]:
    """The central CONFIDENCE percentile interval of bootstrap replicates (B,)."""
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return [float(lo), float(hi)]


def goal_status(value: float, lower: float, target: float) -> str:
    if lower >= target:
        return "MET"
    return "not significant" if value >= target else "MISSED"


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

def comparisons(models) -> list[tuple[str, str]]:
    """(X, Y) pairs reported as X_vs_Y: the headline three, then each extra column against base and dpo."""
    out = [("ppd", "base"), ("ppd", "dpo"), ("dpo", "base")]
    return out + [(m, ref) for m in models if m in EXTRA_MODELS for ref in ("base", "dpo")]


def compute_report(run_dir: str | os.PathLike, users: dict[str, dict], interpolation: list[tuple[str, str]],
                   lambdas: list[float], models=MODELS, resamples: int = 2000, seed: int = 0) -> dict:
    """Recompute report.json's content from RUN/eval.

    users: name -> {"split": "seen"|"unseen", "weights": {reward: w}}.
    interpolation: (A, B) pairs whose strips exist under RUN/eval/interpolation.
    models: the model folders under RUN/eval (MODELS first, then any EXTRA_MODELS).
    """
    ev = Path(run_dir) / "eval"
    models = list(models)
    pairs = comparisons(models)
    out_users, outs = {}, {}
    for name, info in users.items():
        rewards = {m: weighted_reward(load_folder(ev / m / name), info["weights"]) for m in models}
        n = {m: int(r.shape[0]) for m, r in rewards.items()}
        if len(set(n.values())) != 1:
            raise ValueError(f"user {name}: models have different sample counts {n}")
        outs[name] = {f"{a}_vs_{b}": outcomes(rewards[a], rewards[b]) for a, b in pairs}
        out_users[name] = {
            "split": info["split"], "weights": dict(info["weights"]), "samples": n["ppd"],
            "mean_reward": {m: rewards[m].mean().item() for m in models},
            "rewards": {m: [round(v, 6) for v in rewards[m].tolist()] for m in models},
        }
    samples = {u["samples"] for u in out_users.values()}
    if len(samples) != 1:
        raise ValueError(f"users have different sample counts {sorted(samples)}")
    idx = bootstrap_indices(samples.pop(), resamples, seed)
    for name, o in outs.items():
        out_users[name]["win"] = {k: {"rate": float(v.mean()), "ci95": interval(v[idx].mean(1))}
                                  for k, v in o.items()}
    summary: dict = {"confidence": CONFIDENCE, "bootstrap_resamples": resamples}
    for split in ("seen", "unseen", "all"):
        names = [u for u, r in out_users.items() if split == "all" or r["split"] == split]
        if not names:
            continue
        summary[split] = {"users": len(names)}
        for a, b in pairs:
            k = f"{a}_vs_{b}"
            o = np.stack([outs[u][k] for u in names])  # (U, S)
            summary[split][k] = {"rate": float(o.mean()), "ci95": interval(o[:, idx].mean(axis=(0, 2)))}
    interp: dict = {}
    for a, b in interpolation:
        folder = ev / "interpolation" / f"{a}__{b}"
        ra = [weighted_reward(load_folder(folder / lambda_folder(lam)), users[a]["weights"]).double().numpy()
              for lam in lambdas]
        rb = [weighted_reward(load_folder(folder / lambda_folder(lam)), users[b]["weights"]).mean().item()
              for lam in lambdas]
        if len({len(r) for r in ra}) != 1:
            raise ValueError(f"interpolation {a}:{b}: lambdas have different sample counts")
        ra = np.stack(ra)  # (L, K), same index = same prompt and seed at every lambda
        iidx = bootstrap_indices(ra.shape[1], resamples, seed + 1)
        boot = [spearman(lambdas, m) for m in ra[:, iidx].mean(2).T]
        interp[f"{a}:{b}"] = {
            "first": a, "second": b, "lambdas": list(lambdas),
            "mean_reward_first": ra.mean(1).tolist(), "mean_reward_second": rb,
            "spearman_rho": spearman(lambdas, ra.mean(1)),
            "spearman_rho_ci95": interval(np.nan_to_num(np.asarray(boot), nan=0.0)),
            "spearman_rho_per_sample": spearman(np.repeat(lambdas, ra.shape[1]), ra.reshape(-1)),
        }
    goals = []
    for key, split, target in GOALS:
        if split in summary:
            v = summary[split][key]
            goals.append({"name": f"average {key} ({split} users)", "value": v["rate"], "ci95": v["ci95"],
                          "target": target, "status": goal_status(v["rate"], v["ci95"][0], target)})
    for name, r in interp.items():
        v = r["spearman_rho"] if np.isfinite(r["spearman_rho"]) else 0.0
        goals.append({"name": f"interpolation rho ({name})", "value": v, "ci95": r["spearman_rho_ci95"],
                      "target": RHO_TARGET, "status": goal_status(v, r["spearman_rho_ci95"][0], RHO_TARGET)})
    for g in goals:
        g["met"] = g["status"] == "MET"
    summary["goals"] = goals
    summary["all_goals_met"] = all(g["met"] for g in goals)
    return {"models": models, "users": out_users, "summary": summary, "interpolation": interp}


def write_json(data: dict, path: str | os.PathLike) -> None:
    write_json_atomic(path, data, indent=2)


def _ci(w: dict) -> str:
    return f"{w['rate']:.2f} [{w['ci95'][0]:.2f},{w['ci95'][1]:.2f}]"


def format_table(report: dict) -> str:
    """The table a person reads first: per user mean own reward per model and win rates with 95%
    intervals (the headline ppd, then the extra columns), then the identification numbers and goals."""
    models = report.get("models", list(MODELS))
    extra = [f"{m}_vs_base" for m in models if m in EXTRA_MODELS]
    cols = ["ppd_vs_base", "ppd_vs_dpo", "dpo_vs_base", *extra]
    head = (f"{'user':<13} {'split':<6} " + " ".join(f"{m:>10}" for m in models) + "   "
            + " ".join(f"{c.replace('_vs_', '>'):>17}" for c in cols))
    lines = ["mean own reward per model (higher = more to the user's taste); win rates with 95% bootstrap "
             "intervals; the headline is ppd (extra columns: " + (", ".join(extra) or "none") + ")",
             head, "-" * len(head)]
    for name, r in report["users"].items():
        m = r["mean_reward"]
        lines.append(f"{name:<13} {r['split']:<6} " + " ".join(f"{m[k]:>10.3f}" for k in models) + "   "
                     + " ".join(f"{_ci(r['win'][c]):>17}" for c in cols))
    lines.append("-" * len(head))
    for split in ("seen", "unseen", "all"):
        s = report["summary"].get(split)
        if s:
            label = f"average {split} ({s['users']})"
            lines.append(f"{label:<20} " + " " * (11 * len(models)) + "  "
                         + " ".join(f"{_ci(s[c]):>17}" for c in cols))
    for name, r in report["interpolation"].items():
        vals = " ".join(f"{v:.3f}" for v in r["mean_reward_first"])
        lams = " ".join(f"{v:g}" for v in r["lambdas"])
        lo, hi = r["spearman_rho_ci95"]
        lines.append(f"interpolation {name}: lambda [{lams}] -> mean reward of {r['first']} [{vals}], "
                     f"Spearman rho {r['spearman_rho']:.2f} [{lo:.2f},{hi:.2f}]")
    for enc, r in report.get("identification", {}).items():
        lines.append(f"identification ({enc} encoder): rho(embedding distance, reward distance) "
                     f"{r['distance_spearman']:.2f} over {r['user_pairs']} user pairs; top-1 retrieval from a new "
                     f"4-shot draw {r['top1_retrieval']:.2f} (chance {r['chance']:.2f})")
    lines.append("goals (MET only when the 95% interval's lower bound clears the target):")
    for g in report["summary"]["goals"]:
        lo, hi = g["ci95"]
        lines.append(f"  [{g['status'].upper():<15}] {g['name']}: {g['value']:.3f} [{lo:.3f}, {hi:.3f}] "
                     f"(target >= {g['target']})")
    lines.append("ALL GOALS MET" if report["summary"]["all_goals_met"]
                 else "SOME GOALS NOT MET (see above; the numbers are what they are)")
    return "\n".join(lines)


# -- the picture --------------------------------------------------------------------------------

def _tile(images: list[torch.Tensor], zoom: int) -> Image.Image:
    """Images (3, h, w) side by side, upscaled by `zoom` (nearest: pixels stay pixels)."""
    row = torch.cat(images, dim=2)
    arr = (row.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    return im.resize((im.width * zoom, im.height * zoom), Image.NEAREST)


def render_report_png(run_dir: str | os.PathLike, report: dict, per_cell: int = 4, zoom: int = 4) -> Path:
    """RUN/report.png: rows = users, columns = the models (same seeds), then interpolation strips."""
    ev = Path(run_dir) / "eval"
    models = report.get("models", list(MODELS))
    users = list(report["users"])
    sample = load_png(ev / "base" / users[0] / "0.png")
    h, w = sample.shape[1:]
    cell_w, cell_h = per_cell * w * zoom, h * zoom
    label_w, gap, head_h = 190, 8, 22
    interp = report["interpolation"]
    n_lams = max((len(r["lambdas"]) for r in interp.values()), default=0)
    width = max(label_w + len(models) * (cell_w + gap), label_w + n_lams * (w * zoom * 2 + gap))
    height = head_h + len(users) * (cell_h + gap) + (head_h + len(interp) * (cell_h + gap) if interp else 0) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, m in enumerate(models):
        draw.text((label_w + j * (cell_w + gap), 4), m, fill=(0, 0, 0))
    y = head_h
    for name in users:
        r = report["users"][name]
        draw.text((4, y + 2), f"{name} ({r['split']})", fill=(0, 0, 0))
        draw.text((4, y + 16), f"ppd>base {r['win']['ppd_vs_base']['rate']:.2f}", fill=(90, 90, 90))
        draw.text((4, y + 30), f"ppd>dpo  {r['win']['ppd_vs_dpo']['rate']:.2f}", fill=(90, 90, 90))
        for j, m in enumerate(models):
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
