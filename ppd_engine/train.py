"""`python -m ppd_engine.train [--config X.yaml] [key.sub=value ...] [--resume RUN]`

world=toy       the embedded toy world end to end (`ppd_engine.toyworld.run.run_toy`)
world=pickapic  Pick-a-Pic pairs -> few-shot split -> user embeddings -> latent cache -> Trainer.fit

Multi-GPU: `torchrun --nproc_per_node=N -m ppd_engine.train --config configs/sd15_pickapic.yaml ...`
(see docs/DISTRIBUTED.md). Every config key is listed by `--help`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from ppd_engine.config import Config, ConfigError, config_help, load_config, save_config

log = logging.getLogger("ppd_engine.train")

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toy.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ppd_engine.train",
        description="Personalized preference fine-tuning (PPD) of a diffusion model: Diffusion-DPO on "
                    "user-conditioned adapters. With no arguments, runs the embedded toy world "
                    f"({DEFAULT_CONFIG.name}) on the CPU.",
        epilog="Overrides are key.sub=value (e.g. train.max_steps=100 optim.name=adamw loss.beta=2500);\n"
               "values are converted by the key's type; lists and mappings use YAML ([a, b], {k: v}).\n\n"
               "CONFIG KEYS\n" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="X.yaml", default=None,
                        help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parent.parent)})")
    parser.add_argument("--resume", metavar="RUN", default=None,
                        help="continue the run in folder RUN from its newest checkpoint, with its saved "
                             "config (plus any overrides, e.g. a larger train.max_steps)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    """The run's config from --config / --resume and the overrides (ConfigError on bad input)."""
    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the run's saved config.yaml; give overrides instead of --config")
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise ConfigError(f"--resume {run}: not a run folder (no config.yaml)")
        return load_config(run / "config.yaml",
                           [*args.overrides, f"log.run_dir={run}", "checkpoint.resume=latest"])
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    return load_config(path, args.overrides)


def default_run_dir(cfg: Config) -> str:
    return str(Path("runs") / f"{cfg.world}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")


def run_pickapic(cfg: Config):
    """Pick-a-Pic pairs -> few-shot split (shots build embeddings; held out of training) -> seen users'
    training pairs -> latent cache (rank 0 builds, the others wait) -> Trainer.fit."""
    from ppd_engine.cache import PairCacheDataset, build_cache
    from ppd_engine.data.pickapic import load_pairs
    from ppd_engine.embed.store import EmbeddingStore
    from ppd_engine.training import Trainer, build_model
    from ppd_engine.training.distributed import barrier, init_distributed

    env = init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s)
    d = cfg.data
    pairs = load_pairs(d.folder, min_pairs_per_user=d.min_pairs_per_user, max_users=d.max_users or None,
                       decode_images=False, progress=env.is_main)
    _, train_records = pairs.few_shot_split(n_shots=d.n_shots, seed=d.split_seed)
    seen, unseen = pairs.user_split(unseen_fraction=d.unseen_fraction, seed=d.split_seed)
    seen_set = set(seen)
    store = EmbeddingStore(d.embeddings)
    if len(store) == 0:
        raise ValueError(f"data.embeddings={d.embeddings!r} holds no user embeddings; build them first "
                         "(python -m ppd_engine.embed)")
    embeddings = store.as_mapping()
    missing = sorted({r.user_id for r in train_records if r.user_id in seen_set} - set(embeddings))
    if missing:
        log.warning("%d seen user(s) have no embedding in %s and are not trained on (e.g. %s)",
                    len(missing), d.embeddings, missing[:5])
    records = [r for r in train_records if r.user_id in seen_set and r.user_id in embeddings]
    if not records:
        raise ValueError("no training pairs left after the few-shot/seen-user split and the embedding store")
    log.info("training pairs: %d from %d seen users (%d unseen users held out)", len(records),
             len({r.user_id for r in records}), len(unseen))

    model = build_model(cfg, env.device)
    cache_dir = cfg.cache.dir
    if env.is_main:
        build_cache(model, records, cache_dir, resolution=cfg.model.resolution or None, flip=cfg.cache.flip,
                    dtype=cfg.cache.dtype, batch_size=cfg.cache.batch_size, progress=True)
    barrier(env)
    dataset = PairCacheDataset(cache_dir, records, flip=cfg.cache.flip, seed=cfg.train.seed)
    # The cache holds everything the step needs: free the VAE (text encoders stay for the empty caption).
    model.vae = None
    return Trainer(cfg, model, dataset, embeddings, cfg.log.run_dir).fit()


def _summary(result, seconds: float) -> str:
    m = result.final_metrics or {}

    def fmt(key, spec):
        v = m.get(key)
        return format(v, spec) if isinstance(v, (int, float)) else "n/a"

    return (f"\nDone: {result.steps} steps in {seconds / 60:.1f} min -> {result.run_dir}\n"
            f"  last step: loss {fmt('loss', '.4f')}, implicit acc {fmt('implicit_acc', '.3f')}, "
            f"reward margin {fmt('reward_margin', '.4f')}, {fmt('pairs_per_s', '.1f')} pairs/s\n"
            f"  checkpoint: {result.last_checkpoint}\n"
            f"  metrics:    {Path(result.run_dir) / 'metrics.jsonl'}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = resolve_config(args)
    except ConfigError as exc:
        parser.exit(2, f"config error: {exc}\n")

    from ppd_engine.training import BadStepsError
    from ppd_engine.training.distributed import broadcast_str, init_distributed

    env = init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s)
    if not cfg.log.run_dir:
        # One name for every rank (their clocks may straddle a second).
        cfg.log.run_dir = broadcast_str(default_run_dir(cfg), env)
    if env.is_main:
        save_config(cfg, Path(cfg.log.run_dir) / "config.yaml")
        log.info("run folder: %s", cfg.log.run_dir)
    start = time.perf_counter()
    try:
        if cfg.world == "toy":
            from ppd_engine.toyworld.run import run_toy

            result = run_toy(cfg)
        else:
            result = run_pickapic(cfg)
    except BadStepsError as exc:
        print(f"training stopped: {exc}", file=sys.stderr)
        return 3
    finally:
        if env.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()
    if env.is_main and result is not None and hasattr(result, "final_metrics"):
        print(_summary(result, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
