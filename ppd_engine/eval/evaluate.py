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
from .report import compared_pairs, markdown_report, pair_key, summarize, write_json, write_text
from .rewards import RewardModel
from .users import select_users  # noqa: F401  (re-exported: the generate step's user selection)

MANIFEST = "manifest.json"
RESULTS = "results.json"
REPORT = "report.md"


def run_generation(checkpoints: Sequence[CheckpointSpec], prompt_set: PromptSet, users: Sequence[str],
                   store, out_dir: str, *, seed: int = 0, batch_size: int = 4, embed_index: int = 0,
                   device: str = "cpu", progress: bool = True, load_run: Callable | None = None,
                   generate_fn: Callable | None = None, load_base: Callable | None = None,
                   base_config: str | None = None, roles: dict | None = None,
                   profile_captions: Callable | None = None, **sample_kw) -> dict:
    """Generate all images for every checkpoint and write `OUT/manifest.json`; returns the manifest.

    `store` is an `EmbeddingStore` (or anything with `.get(user) -> (K, T_in, Du)`); a checkpoint
    listed as non-personalized is sampled with zeros shaped like its adapters' input, the base
    (`NAME=base`) without adapters, built by `load_base(config_path, device)` from `base_config` or
    the first listed run's config.yaml (same model, scheduler and guidance as the runs). `roles`:
    {user: {"role", "shots"}} recorded in the manifest. `profile_captions(tokenizer_source_cfg)` ->
    a `ProfileCaptions` for the checkpoints with caption_profile. `load_run` and `generate_fn`
    default to `ppd_engine.training.load_run` and `ppd_engine.sampling.generate`.
    """
    if load_run is None:
        from ppd_engine.training import load_run
    if generate_fn is None:
        from ppd_engine.sampling import generate as generate_fn
    if load_base is None:
        load_base = _load_base
    base_cfg = base_config or next((str(Path(c.run_dir) / "config.yaml") for c in checkpoints if not c.is_base), None)
    if any(c.is_base for c in checkpoints) and base_cfg is None:
        raise ValueError("--run NAME=base needs another listed run or --base-config (the base model's config)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = prompt_set.texts
    sampler = {"embed_index": embed_index, **{k: _jsonable(v) for k, v in sample_kw.items()}}
    this = {c.name: {"run_dir": str(c.run_dir), "personalized": c.personalized, "kind": c.kind,
                     "caption_profile": c.caption_profile} for c in checkpoints}
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
        "roles": {u: (roles or {}).get(u, {}).get("role") for u in users},
        "base_config": base_cfg,
        "counts": {},
        "captions": {},
    }
    # Written first too, so an interrupted run's images are still tied to how they were made.
    write_json(out / MANIFEST, manifest)
    for ck in checkpoints:
        if ck.is_base:
            model, shape = load_base(base_cfg, device), None
        else:
            _, model = load_run(ck.run_dir, checkpoint=ck.checkpoint, device=device)
            shape = adapter_input_shape(model)
            if shape is None:
                raise ValueError(f"{ck.run_dir}: the loaded unet has no user adapters")
        captions = None
        if ck.caption_profile:
            if profile_captions is None:
                raise ValueError(f"checkpoint {ck.name}: --caption-profile needs the base model's tokenizer")
            pc = profile_captions(base_cfg)
            captions = lambda u, pc=pc: pc(u, prompts)  # noqa: E731
        if ck.personalized:
            got = tuple(store.get(users[0]).shape[1:])
            if got != shape:
                raise ValueError(f"checkpoint {ck.name} takes user embeddings (T_in, Du) = {shape}, but the "
                                 f"store holds {got}: was it trained on another store?")
        manifest["counts"][ck.name] = generate_images(
            model, generate_fn, ck, prompts, users, store.get, str(out), seed=seed, batch_size=batch_size,
            embed_index=embed_index, zero_shape=shape, progress=progress, captions=captions, **sample_kw)
        if ck.caption_profile:
            manifest["captions"][ck.name] = {**pc.counts, "profiles": pc.suffixes}
        del model
        release_memory()
    write_json(out / MANIFEST, manifest)
    return manifest


def _load_base(config_path: str, device: str):
    """The frozen base of a run's config, without adapters (the `NAME=base` checkpoint)."""
    from ppd_engine.config import load_config
    from ppd_engine.models import build_model

    if not Path(config_path).is_file():
        raise FileNotFoundError(f"base model config {config_path} not found (--base-config or a run's config.yaml)")
    model = build_model(load_config(config_path), device)
    model.unet.eval()
    return model


def clip_tokenizer(config_path: str):
    """The base model's first CLIP tokenizer (its 77-token limit bounds the prompted captions)."""
    from transformers import CLIPTokenizer

    from ppd_engine.config import load_config

    cfg = load_config(config_path)
    if cfg.model.family not in ("sd15", "sdxl", "cascade"):
        raise ValueError(f"--caption-profile: model.family {cfg.model.family!r} has no CLIP tokenizer to count against")
    return CLIPTokenizer.from_pretrained(cfg.model.pretrained, subfolder="tokenizer")


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
        if prev is not None and (prev["run_dir"] != str(c.run_dir) or prev["personalized"] != c.personalized
                                 or prev.get("caption_profile", False) != c.caption_profile):
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
    prompts = manifest["prompts"]["texts"]
    users, ckpts = manifest["users"], list(manifest["checkpoints"])
    n = len(prompts)
    res = {}
    pairs = compared_pairs(ckpts, plain_bases(manifest))
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


def plain_bases(manifest: dict) -> list[str]:
    """The base checkpoints without a caption change: every comparison's second (the prompted base
    is a baseline compared against them)."""
    return [c for c, m in manifest["checkpoints"].items() if m.get("kind") == "base" and not m.get("caption_profile")]


def write_results(out_dir: str, manifest: dict, scores: dict, judge: dict | None = None,
                  title: str | None = None) -> dict:
    """Summaries + per-image scores -> `OUT/results.json` and `OUT/report.md` (both atomic)."""
    from .plots import evaluation_figures

    users, ckpts = manifest["users"], list(manifest["checkpoints"])
    cats = manifest["prompts"].get("categories")
    bases = plain_bases(manifest)
    roles = manifest.get("roles") or {}
    summary = summarize(scores, users, ckpts, cats, bases=bases, roles=roles)
    figures = evaluation_figures(out_dir, summary, scores, manifest) if scores else []
    results = {
        "prompts": {"source": manifest["prompts"]["source"], "count": len(manifest["prompts"]["texts"])},
        "users": users,
        "roles": roles,
        "checkpoints": manifest["checkpoints"],
        "captions": manifest.get("captions", {}),
        "rewards": summary,
        "judge": judge,
        "scores": scores,   # per image: scores[reward][checkpoint][user][prompt index]
        "figures": figures,
        "provenance": provenance(manifest),
    }
    write_json(Path(out_dir) / RESULTS, results)
    title = title or f"Evaluation on {manifest['prompts']['source']} ({len(manifest['prompts']['texts'])} " \
                     f"prompts, {len(users)} users)"
    extra = []
    for name, c in (manifest.get("captions") or {}).items():
        extra.append(f"\n{name}: caption + user profile for {c['captions']} captions; {c['truncated']} cut to "
                     f"the text encoder's token limit; {c['users_without_profile']} user(s) had no profile "
                     "section (bare caption).")
    write_text(Path(out_dir) / REPORT, markdown_report(summary, ckpts, judge, title, figures, extra))
    return results


def provenance(manifest: dict) -> dict:
    """What made these numbers: each run's resolved config, the code's git commit, library versions."""
    import importlib.metadata as md
    import subprocess

    configs = {}
    for name, m in manifest["checkpoints"].items():
        p = Path(m["run_dir"]) / "config.yaml"
        if m.get("kind") == "base" and manifest.get("base_config"):
            p = Path(manifest["base_config"])
        configs[name] = p.read_text(encoding="utf-8") if p.is_file() else None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {}
    for lib in ("torch", "diffusers", "transformers", "numpy", "open_clip_torch", "matplotlib"):
        try:
            versions[lib] = md.version(lib)
        except md.PackageNotFoundError:
            versions[lib] = None
    return {"git_commit": commit, "versions": versions, "configs": configs, "sampler": manifest.get("sampler")}

