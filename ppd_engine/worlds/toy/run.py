"""`run_toy(cfg)`: the embedded default run, end to end on a CPU.

    world (users, labelled pairs, held-out shots) -> few-shot embeddings
    -> PPD (user-conditioned adapters, personalized=True)          RUN/checkpoints, RUN/metrics.jsonl
    -> non-personalized Diffusion-DPO baseline, same cfg and budget RUN/dpo/
    -> [PPD with the oracle encoder, same cfg and budget]           RUN/oracle/
    -> samples of base / dpo / ppd [/ ppd_guided / ppd_oracle] for every user, same prompts and seeds
                                                                    RUN/eval/<model>/<user>/<i>.png
    -> interpolation strips                                         RUN/eval/interpolation/<A>__<B>/<lambda>/
    -> RUN/report.json, RUN/report.png, RUN/report.md + figures, the table on stdout

The headline ppd reads users through the generic encoder (toy.encoder) and samples with
toy.user_guidance (0 by default); ppd_guided is the same model with toy.guided_column user guidance,
ppd_oracle a second PPD trained on the oracle encoder's embeddings: extra columns, not the headline.

RUN itself is the PPD run folder, so `python -m ppd_engine.sample --run RUN` samples the
personalized model; every user's evaluation embedding (from its 4 held-out pairs) is in
RUN/embeddings.safetensors (also recorded as data.embeddings in RUN/config.yaml).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ppd_engine.files import save_image_atomic
from ppd_engine.worlds.toy.dataset import ToyPairDataset, build_world, few_shot_embeddings, heldout_sets
from ppd_engine.worlds.toy.fewshot import FewShotEncoder
from ppd_engine.worlds.toy.figures import write_figures
from ppd_engine.worlds.toy.identify import identification
from ppd_engine.worlds.toy.model import load_toy_model
from ppd_engine.worlds.toy.report import (
    MODELS, compute_report, format_table, lambda_folder, render_report_png, write_json)
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


def make_encoder(tc, kind: str):
    """The few-shot encoder `kind` ('generic' or 'oracle') for the toy section `tc`."""
    if kind == "oracle":
        from ppd_engine.worlds.toy.oracle import OracleEncoder

        return OracleEncoder(tc.image_size, seed=tc.seed)
    return FewShotEncoder(tc.image_size, components=tc.encoder_components, seed=tc.seed, features_path=tc.features)


def _sample_to(folder_of, model, prompts, embeds, seeds, tc, desc: str, user_guidance: float = 0.0) -> None:
    """Generate len(prompts) images and save image i to folder_of(i) / f"{index}.png".

    `user_guidance` only applies to a user-conditioned call (embeds given): base has no user branch
    and the DPO baseline's zero embedding is the user-agnostic branch itself."""
    from ppd_engine.sampling import generate

    images = generate(model, prompts, embeds, seeds, steps=tc.sample_steps, guidance=tc.guidance,
                      user_guidance=user_guidance, batch_size=tc.eval_batch, progress=True)
    for i, img in enumerate(tqdm(images, desc=desc, leave=False)):
        folder, index = folder_of(i)
        save_image_atomic(img, folder / f"{index}.png")


def evaluate(run_dir: Path, base, dpo, ppd: dict, embed_shape, tc, interp_pairs: list[tuple[str, str]]) -> None:
    """Write RUN/eval: base and dpo ignore the user, so their samples are made once and saved for
    every user; each personalized column of `ppd` (name -> (model, user -> embedding, user
    guidance)) is sampled per user with that user's evaluation embedding; the interpolation strips
    come from the headline ppd."""
    users = list(ppd["ppd"][1])
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
    for name, (model, embeds, guidance) in ppd.items():
        log.info("sampling %s (%d users x %d images, user guidance %g)", name, len(users), s, guidance)
        all_embeds = torch.cat([embeds[u][0:1].expand(s, -1, -1) for u in users])
        _sample_to(lambda i, n=name: (ev / n / users[i // s], i % s), model, prompts * len(users), all_embeds,
                   seeds * len(users), tc, f"save {name}", guidance)
    model, eval_embeds, guidance = ppd["ppd"]
    k = tc.interpolation_samples
    ip, iseeds = eval_prompts_and_seeds(k, tc.seed)
    for a, b in interp_pairs:
        lams = list(tc.interpolation_lambdas)
        mixed = torch.cat([(lam * eval_embeds[a][0] + (1 - lam) * eval_embeds[b][0])[None].expand(k, -1, -1)
                           for lam in lams])
        folder = ev / "interpolation" / f"{a}__{b}"
        log.info("interpolation %s -> %s (%d lambdas x %d images)", a, b, len(lams), k)
        _sample_to(lambda i: (folder / lambda_folder(lams[i // k]), i % k), model, ip * len(lams), mixed,
                   iseeds * len(lams), tc, "save interpolation", guidance)


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
    t0, cpu0 = time.perf_counter(), time.process_time()
    if not cfg.log.run_dir:
        raise ValueError("run_toy needs cfg.log.run_dir (the CLI names one)")
    run_dir = Path(cfg.log.run_dir)

    log.info("toy world: %d seen + %d unseen users, %d pairs per seen user", len(tc.seen_users),
             len(tc.unseen_users), tc.pairs_per_user)
    world = build_world(tc)
    load0 = os.getloadavg()[0]
    encoders = {"ppd": make_encoder(tc, tc.encoder)}
    if tc.oracle_column and tc.encoder != "oracle":
        encoders["ppd_oracle"] = make_encoder(tc, "oracle")
    embeds = {name: few_shot_embeddings(world, enc, tc) for name, enc in encoders.items()}
    train_embeds, eval_embeds = embeds["ppd"]
    users_meta = {n: {"split": d.split, "weights": dict(d.user.weights)} for n, d in world.items()}
    interp_pairs = parse_pairs(list(tc.interpolation_pairs), list(world))
    if env.is_main:
        # Before the first write: the stores must not land in another run's folder either.
        claim_run_folder(run_dir, resuming=continues_run(cfg.checkpoint.resume, run_dir), overwrite=cfg.log.overwrite)
        _save_store(run_dir / EMBEDDINGS_FILE, eval_embeds, {
            n: {"split": d.split, "source": f"{tc.n_shots} held-out labelled pairs ({tc.encoder} toy few-shot encoder)",
                "shot_captions": d.shots.captions} for n, d in world.items()})
        _save_store(run_dir / TRAIN_EMBEDDINGS_FILE, train_embeds, {
            n: {"source": f"random {tc.n_shots}-subsets of the training pairs"} for n in train_embeds})
    cfg.data.embeddings = str((run_dir / EMBEDDINGS_FILE).resolve())
    if not cfg.train.reference_dir:
        # PPD, its DPO baseline and the oracle run share base, data, seed and draws: one reference
        # pass serves all three (the default RUN/../reference would give RUN/dpo another folder).
        cfg.train.reference_dir = str(run_dir / "reference")

    base = load_toy_model(tc)
    dataset = ToyPairDataset(world, base.encode_text)
    label_agree = {n: d.train.agreement for n, d in world.items() if d.train is not None}
    log.info("training pairs: %d (labels agree with the reward order for %.0f%% on average)", len(dataset),
             100 * sum(label_agree.values()) / len(label_agree))
    t_setup = time.perf_counter() - t0

    def train(folder: Path, personalized: bool, train_embeds, eval_embeds, what: str):
        t = time.perf_counter()
        model = load_toy_model(tc)
        sub = copy.deepcopy(cfg)
        sub.log.run_dir = str(folder)
        log.info("training %s -> %s", what, folder)
        # Held-out curves (log.eval_every): seen users' unused pairs and unseen users' pairs, each user
        # through its evaluation embedding (the DPO baseline reads none).
        result = Trainer(sub, model, dataset, train_embeds, str(folder), personalized=personalized, env=env,
                         eval_sets=heldout_sets(world, base.encode_text, eval_embeds)).fit()
        return model, result, time.perf_counter() - t

    ppd_model, ppd_result, t_ppd = train(run_dir, True, train_embeds, eval_embeds,
                                         f"PPD (personalized adapters, {tc.encoder} encoder)")
    dpo_model, dpo_result, t_dpo = train(run_dir / "dpo", False, train_embeds, eval_embeds,
                                         "the non-personalized DPO baseline (same adapters, zero user input)")
    columns = {"ppd": (ppd_model, eval_embeds, tc.user_guidance)}
    if tc.guided_column > 0 and tc.guided_column != tc.user_guidance:
        columns["ppd_guided"] = (ppd_model, eval_embeds, tc.guided_column)
    t_oracle = 0.0
    if "ppd_oracle" in encoders:
        o_train, o_eval = embeds["ppd_oracle"]
        oracle_model, _, t_oracle = train(run_dir / "oracle", True, o_train, o_eval,
                                          "PPD with the oracle encoder (upper bound)")
        columns["ppd_oracle"] = (oracle_model, o_eval, tc.user_guidance)
    if not env.is_main:
        # Replicas hold the same adapters; one process samples and writes the report.
        return None

    t3 = time.perf_counter()
    embed_shape = tuple(eval_embeds[next(iter(eval_embeds))].shape[1:])
    with torch.no_grad():
        evaluate(run_dir, base, dpo_model, columns, embed_shape, tc, interp_pairs)
    models = [*MODELS, *(c for c in columns if c != "ppd")]
    report = compute_report(run_dir, users_meta, interp_pairs, list(tc.interpolation_lambdas), models=models,
                            resamples=tc.bootstrap, seed=tc.seed)
    kinds = {"ppd": tc.encoder, "ppd_oracle": "oracle"}
    report["identification"] = {kinds[name]: identification(world, enc, embeds[name][1], tc)
                                 for name, enc in encoders.items()}
    for name, enc in encoders.items():
        report["identification"][kinds[name]]["feature_variance_kept"] = enc.explained
    t_eval = time.perf_counter() - t3
    timing = {"setup_s": round(t_setup, 1), "ppd_train_s": round(t_ppd, 1), "dpo_train_s": round(t_dpo, 1),
              "oracle_train_s": round(t_oracle, 1), "eval_s": round(t_eval, 1),
              "total_s": round(time.perf_counter() - t0, 1),
              # CPU seconds of this process: with one thread, the wall time the run takes on an idle core.
              "cpu_s": round(time.process_time() - cpu0, 1), "threads": torch.get_num_threads(),
              "cpus": os.cpu_count(),
              # The machine may be shared: 1-minute load averages at the start and the end of the run.
              "load_avg_start": round(load0, 2), "load_avg_end": round(os.getloadavg()[0], 2)}
    report["summary"]["label_agreement"] = label_agree
    report["summary"]["budget"] = {"steps": ppd_result.steps, "dpo_steps": dpo_result.steps,
                                   "pairs_per_step": cfg.train.pairs_per_step}
    report["config"] = {"encoder": tc.encoder, "user_guidance": tc.user_guidance,
                        "guided_column": tc.guided_column if "ppd_guided" in columns else None,
                        "eval_samples_per_user": tc.eval_samples_per_user}
    report["timing"] = timing
    write_json(report, run_dir / "report.json")
    png = render_report_png(run_dir, report, per_cell=tc.report_samples)
    md = write_figures(run_dir, report)
    lines = ["", format_table(report),
             f"time: {timing['total_s'] / 60:.1f} min wall, {timing['cpu_s'] / 60:.1f} min CPU (PPD {timing['ppd_train_s']:.0f} s, DPO "
             f"{timing['dpo_train_s']:.0f} s, oracle PPD {timing['oracle_train_s']:.0f} s, eval "
             f"{timing['eval_s']:.0f} s; load average {timing['load_avg_start']:.1f} -> {timing['load_avg_end']:.1f} "
             f"on {timing['cpus']} CPUs)",
             f"report: {run_dir / 'report.json'}  picture: {png}  figures: {md}", f"run folder: {run_dir}"]
    return ToyRunResult(str(run_dir), report, ppd_result, dpo_result, timing, lines)
