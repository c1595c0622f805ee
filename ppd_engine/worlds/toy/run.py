"""`run_toy(cfg)`: the embedded default run, end to end on a CPU.

    world (users, labelled pairs, held-out shots) -> few-shot embeddings
    -> PPD (user-conditioned adapters, personalized=True)          RUN/checkpoints, RUN/metrics.jsonl
    -> non-personalized Diffusion-DPO baseline, same cfg and budget RUN/dpo/
    -> samples of base / dpo / ppd for every user, same prompts and seeds  RUN/eval/<model>/<user>/<i>.png
    -> interpolation strips                                         RUN/eval/interpolation/<A>__<B>/<lambda>/
    -> RUN/report.json, RUN/report.png, the table on stdout

RUN itself is the PPD run folder, so `python -m ppd_engine.sample --run RUN` samples the
personalized model; every user's evaluation embedding (from its 4 held-out pairs) is in
RUN/embeddings.safetensors (also recorded as data.embeddings in RUN/config.yaml).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ppd_engine.files import save_image_atomic
from ppd_engine.worlds.toy.dataset import ToyPairDataset, build_world, few_shot_embeddings
from ppd_engine.worlds.toy.fewshot import FEATURE_NAMES, FewShotEncoder
from ppd_engine.worlds.toy.model import load_toy_model
from ppd_engine.worlds.toy.report import (
    compute_report, format_table, lambda_folder, render_report_png, write_json)
from ppd_engine.worlds.toy.scenes import CAPTIONS

log = logging.getLogger("ppd_engine.worlds.toy")

EMBEDDINGS_FILE = "embeddings.safetensors"
TRAIN_EMBEDDINGS_FILE = "train_embeddings.safetensors"


@dataclass
class ToyRunResult:
    run_dir: str
    report: dict
    ppd: object      # TrainResult of PPD
    dpo: object      # TrainResult of the DPO baseline
    timing: dict
    lines: list      # the report table and where the files are, for the CLI to print


def eval_prompts_and_seeds(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Index i -> (caption, seed), shared by every model and every user."""
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    seeds = [seed * 100_003 + 10_007 + i for i in range(n)]
    return prompts, seeds


def parse_pairs(specs: list[str], known: list[str]) -> list[tuple[str, str]]:
    """'A:B' strings -> (A, B), each a configured user."""
    out = []
    for s in specs:
        parts = s.split(":")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"toy.interpolation_pairs: {s!r} must look like 'userA:userB'")
        for u in parts:
            if u not in known:
                raise ValueError(f"toy.interpolation_pairs: {u!r} is not one of the configured users {known}")
        out.append((parts[0], parts[1]))
    return out


def _save_store(path: Path, embeds: dict[str, torch.Tensor], meta: dict[str, dict]) -> None:
    from ppd_engine.embed.store import EmbeddingStore

    path.unlink(missing_ok=True)
    EmbeddingStore(str(path)).append_many([(u, e, meta[u]) for u, e in embeds.items()])


def _sample_to(folder_of, model, prompts, embeds, seeds, tc, desc: str) -> None:
    """Generate len(prompts) images and save image i to folder_of(i) / f"{index}.png".

    User guidance applies only where there is a user (embeds given): base has no user branch and
    the DPO baseline's zero embedding is the user-agnostic branch itself."""
    from ppd_engine.sampling import generate

    user_guidance = tc.user_guidance if embeds is not None and embeds.abs().sum() > 0 else 0.0
    images = generate(model, prompts, embeds, seeds, steps=tc.sample_steps, guidance=tc.guidance,
                      user_guidance=user_guidance, batch_size=tc.eval_batch, progress=True)
    for i, img in enumerate(tqdm(images, desc=desc, leave=False)):
        folder, index = folder_of(i)
        save_image_atomic(img, folder / f"{index}.png")


def evaluate(run_dir: Path, base, dpo, ppd, eval_embeds: dict[str, torch.Tensor], embed_shape, tc,
             interp_pairs: list[tuple[str, str]]) -> None:
    """Write RUN/eval: base and dpo ignore the user, so their samples are made once and saved for
    every user; ppd is sampled per user with its evaluation embedding."""
    users = list(eval_embeds)
    s = tc.eval_samples_per_user
    prompts, seeds = eval_prompts_and_seeds(s, tc.seed)
    ev = run_dir / "eval"
    zeros = torch.zeros((s, *embed_shape))
    for name, model, embeds in (("base", base, None), ("dpo", dpo, zeros)):
        log.info("sampling %s (%d images, shared by all users)", name, s)
        _sample_to(lambda i, n=name: (ev / n / users[0], i), model, prompts, embeds, seeds, tc, f"save {name}")
        for u in users[1:]:
            for i in range(s):
                (ev / name / u).mkdir(parents=True, exist_ok=True)
                (ev / name / u / f"{i}.png").write_bytes((ev / name / users[0] / f"{i}.png").read_bytes())
    log.info("sampling ppd (%d users x %d images)", len(users), s)
    all_embeds = torch.cat([eval_embeds[u][0:1].expand(s, -1, -1) for u in users])
    _sample_to(lambda i: (ev / "ppd" / users[i // s], i % s), ppd, prompts * len(users), all_embeds,
               seeds * len(users), tc, "save ppd")
    k = tc.interpolation_samples
    ip, iseeds = eval_prompts_and_seeds(k, tc.seed)
    for a, b in interp_pairs:
        lams = list(tc.interpolation_lambdas)
        mixed = torch.cat([(lam * eval_embeds[a][0] + (1 - lam) * eval_embeds[b][0])[None].expand(k, -1, -1)
                           for lam in lams])
        folder = ev / "interpolation" / f"{a}__{b}"
        log.info("interpolation %s -> %s (%d lambdas x %d images)", a, b, len(lams), k)
        _sample_to(lambda i: (folder / lambda_folder(lams[i // k]), i % k), ppd, ip * len(lams), mixed,
                   iseeds * len(lams), tc, "save interpolation")


def run_toy(cfg, env=None) -> ToyRunResult | None:
    """Run the toy world end to end with `cfg` (root Config, world == "toy"); prints the report table.

    Under torchrun every rank trains (`env`, a DistEnv; None = a single process) and rank 0 alone
    writes the stores, samples, evaluates and reports; the other ranks return None."""
    from ppd_engine.training import Trainer
    from ppd_engine.training.distributed import DistEnv
    from ppd_engine.training.run_folder import claim_run_folder, continues_run

    env = env or DistEnv()
    tc = cfg.toy
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    t0 = time.perf_counter()
    if not cfg.log.run_dir:
        raise ValueError("run_toy needs cfg.log.run_dir (the CLI names one)")
    run_dir = Path(cfg.log.run_dir)

    log.info("toy world: %d seen + %d unseen users, %d pairs per seen user", len(tc.seen_users),
             len(tc.unseen_users), tc.pairs_per_user)
    world = build_world(tc)
    encoder = FewShotEncoder(tc.image_size, seed=tc.seed)
    train_embeds, eval_embeds = few_shot_embeddings(world, encoder, tc)
    users_meta = {n: {"split": d.split, "weights": dict(d.user.weights)} for n, d in world.items()}
    interp_pairs = parse_pairs(list(tc.interpolation_pairs), list(world))
    if env.is_main:
        # Before the first write: the stores must not land in another run's folder either.
        claim_run_folder(run_dir, resuming=continues_run(cfg.checkpoint.resume, run_dir), overwrite=cfg.log.overwrite)
        _save_store(run_dir / EMBEDDINGS_FILE, eval_embeds, {
            n: {"split": d.split, "source": f"{tc.n_shots} held-out labelled pairs (toy few-shot encoder)",
                "features": list(FEATURE_NAMES), "shot_captions": d.shots.captions} for n, d in world.items()})
        _save_store(run_dir / TRAIN_EMBEDDINGS_FILE, train_embeds, {
            n: {"source": f"random {tc.n_shots}-subsets of the training pairs"} for n in train_embeds})
    cfg.data.embeddings = str((run_dir / EMBEDDINGS_FILE).resolve())

    base = load_toy_model(tc)
    dataset = ToyPairDataset(world, base.encode_text)
    label_agree = {n: d.train.agreement for n, d in world.items() if d.train is not None}
    log.info("training pairs: %d (labels agree with the reward order for %.0f%% on average)", len(dataset),
             100 * sum(label_agree.values()) / len(label_agree))
    t_setup = time.perf_counter() - t0

    t1 = time.perf_counter()
    ppd_model = load_toy_model(tc)
    log.info("training PPD (personalized adapters) -> %s", run_dir)
    ppd_result = Trainer(cfg, ppd_model, dataset, train_embeds, str(run_dir), personalized=True, env=env).fit()
    t_ppd = time.perf_counter() - t1

    t2 = time.perf_counter()
    dpo_model = load_toy_model(tc)
    dpo_cfg = copy.deepcopy(cfg)
    dpo_cfg.log.run_dir = str(run_dir / "dpo")
    log.info("training the non-personalized DPO baseline (same adapters, zero user input) -> %s", run_dir / "dpo")
    dpo_result = Trainer(dpo_cfg, dpo_model, dataset, train_embeds, str(run_dir / "dpo"), personalized=False,
                         env=env).fit()
    t_dpo = time.perf_counter() - t2
    if not env.is_main:
        # Replicas hold the same adapters; one process samples and writes the report.
        return None

    t3 = time.perf_counter()
    embed_shape = tuple(next(iter(eval_embeds.values())).shape[1:])
    with torch.no_grad():
        evaluate(run_dir, base, dpo_model, ppd_model, eval_embeds, embed_shape, tc, interp_pairs)
    report = compute_report(run_dir, users_meta, interp_pairs, list(tc.interpolation_lambdas))
    t_eval = time.perf_counter() - t3
    timing = {"setup_s": round(t_setup, 1), "ppd_train_s": round(t_ppd, 1), "dpo_train_s": round(t_dpo, 1),
              "eval_s": round(t_eval, 1), "total_s": round(time.perf_counter() - t0, 1)}
    report["summary"]["label_agreement"] = label_agree
    report["summary"]["budget"] = {"steps": ppd_result.steps, "dpo_steps": dpo_result.steps,
                                   "pairs_per_step": cfg.train.pairs_per_step}
    report["timing"] = timing
    write_json(report, run_dir / "report.json")
    png = render_report_png(run_dir, report, per_cell=tc.report_samples)
    lines = ["", format_table(report),
             f"time: {timing['total_s'] / 60:.1f} min (PPD {timing['ppd_train_s']:.0f} s, DPO "
             f"{timing['dpo_train_s']:.0f} s, eval {timing['eval_s']:.0f} s)",
             f"report: {run_dir / 'report.json'}  picture: {png}", f"run folder: {run_dir}"]
    return ToyRunResult(str(run_dir), report, ppd_result, dpo_result, timing, lines)
