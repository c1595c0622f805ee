"""Pick-a-Pic v2 as a `World`: the pair index of data.split (locations, not JPEG bytes) -> few-shot
split (the shots build the embeddings and are held out of training) -> seen users' training pairs ->
latent cache (every rank encodes its slice; rank 0 merges) -> one Trainer, which with log.eval_every
evaluates the seen and the unseen users' shot pairs as held-out sets. The run records the
parquet files it read in RUN/data.json. Evaluation is its own command (`python -m ppd_engine.eval`).

data.folder may be parquet files, a `datasets` folder, a URL or a hub id (data/sources.py).
data.format=columns reads a user's own columns through the same path (data/columns.py); one whose
data.columns maps no user_id trains every pair on the non-personalized objective, with no
embeddings, shots or user split."""

from __future__ import annotations

import logging

from ppd_engine.config.schema import ConfigError
from ppd_engine.world import World, WorldParts, register_world

log = logging.getLogger("ppd_engine.worlds.pickapic")


class PickapicWorld(World):
    name = "pickapic"
    description = "Pick-a-Pic v2 parquet pairs, VLM user embeddings, a diffusers base (sd15 / sdxl / cascade)"

    def validate(self, cfg) -> None:
        if not cfg.data.folder:
            raise ConfigError("data.folder: world=pickapic needs the Pick-a-Pic parquet folder")
        if not cfg.data.embeddings and _has_user_ids(cfg.data):
            raise ConfigError("data.embeddings: world=pickapic needs the user-embedding store "
                              "(python -m ppd_engine.embed writes one)")
        if cfg.model.family == "toy":
            raise ConfigError("model.family: toy is the toy world's model; world=pickapic needs a diffusers "
                              "family (sd15, sdxl, cascade; e.g. --config sd15_pickapic)")

    def build(self, cfg, env) -> WorldParts:
        from ppd_engine.cache import PairCacheDataset
        from ppd_engine.data.columns import ColumnMap
        from ppd_engine.data.pickapic import load_pairs
        from ppd_engine.embed.store import EmbeddingStore
        from ppd_engine.training.heldout import HeldOutSet

        d = cfg.data
        columns = ColumnMap.parse(d.columns) if d.format == "columns" else None
        pairs = load_pairs(d.folder, min_pairs_per_user=d.min_pairs_per_user, max_users=d.max_users or None,
                           split=d.split, load_images=False, progress=env.is_main, columns=columns,
                           streaming=d.streaming)
        self.data_record = {"folder": d.folder, "format": d.format, "split": d.split, "streaming": d.streaming,
                            "files": pairs.sources, "stats": pairs.stats}
        if not _has_user_ids(d):
            return self._build_unpersonalized(cfg, env, pairs)
        shots, train_records = pairs.few_shot_split(n_shots=d.n_shots, seed=d.split_seed)
        seen, unseen = pairs.user_split(unseen_fraction=d.unseen_fraction, seed=d.split_seed)
        seen_set = set(seen)
        if env.is_main and cfg.log.run_dir:
            write_users_json(cfg, shots, seen, unseen)
        store = EmbeddingStore(d.embeddings)
        if len(store) == 0:
            raise ValueError(f"data.embeddings={d.embeddings!r} holds no user embeddings; build them first "
                             "(python -m ppd_engine.embed)")
        trained = {r.user_id for r in train_records if r.user_id in seen_set}
        # Only the users this run trains are read from the store (and checked finite as they are).
        embeddings = store.lazy_mapping(trained)
        missing = sorted(trained - set(embeddings))
        if missing:
            log.warning("%d seen user(s) have no embedding in %s and are not trained on (e.g. %s)",
                        len(missing), d.embeddings, missing[:5])
        records = [r for r in train_records if r.user_id in seen_set and r.user_id in embeddings]
        if not records:
            raise ValueError("no training pairs left after the few-shot/seen-user split and the embedding store")
        log.info("training pairs: %d from %d seen users (%d unseen users held out)", len(records),
                 len({r.user_id for r in records}), len(unseen))

        # Held-out sets of log.eval_every: the shot pairs of seen and of unseen users (held out of
        # training; they are what each user's embedding was built from).
        eval_embeds = store.lazy_mapping(set(embeddings) | set(unseen))
        held = {role: [r for u in sorted(users & set(eval_embeds)) for r in shots.get(u, [])]
                for role, users in (("seen", set(embeddings)), ("unseen", set(unseen)))} if cfg.log.eval_every else {}
        held = {role: recs for role, recs in held.items() if recs}
        model, dataset = self._cached(cfg, env, pairs, records, also=[r for recs in held.values() for r in recs])
        eval_sets = {role: HeldOutSet(PairCacheDataset(cfg.cache.dir, recs, flip=False, seed=cfg.train.seed,
                                                       verify=False), eval_embeds)   # verified in _cached
                     for role, recs in held.items()}
        return WorldParts(model, dataset, embeddings, personalized=cfg.train.personalized, eval_sets=eval_sets)

    def _build_unpersonalized(self, cfg, env, pairs) -> WorldParts:
        """A dataset without user ids: every pair trains, with no shots and no user split, on the
        non-personalized objective (the user input is the zero embedding of adapters.user_dim)."""
        log.info("data.columns maps no user_id: training the non-personalized Diffusion-DPO objective on all "
                 "%d pairs (train.personalized=false)", len(pairs.records))
        if not pairs.records:
            raise ValueError(f"no training pairs left in {cfg.data.folder} after filtering")
        cfg.train.personalized = False   # so the run's config.yaml says what was trained
        model, dataset = self._cached(cfg, env, pairs, pairs.records)
        return WorldParts(model, dataset, None, personalized=False)

    def _cached(self, cfg, env, pairs, records, also=()):
        """The model, and the cached dataset of `records` (the cache built for what it lacks of them and
        of the records `also` needs cached: the held-out sets')."""
        from ppd_engine.cache import PairCacheDataset, build_cache
        from ppd_engine.cache.store import verify_cache
        from ppd_engine.models import build_model
        from ppd_engine.training.distributed import all_gather_str, key_barrier

        model = build_model(cfg, env.device)
        # Every rank encodes its slice of what the cache lacks, so no rank idles while one rank does
        # all the work; the build's barriers wait on store keys, not on a timed collective.
        build_cache(model, [*records, *also], cfg.cache.dir, resolution=cfg.model.resolution or None,
                    flip=cfg.cache.flip, dtype=cfg.cache.dtype, batch_size=cfg.cache.batch_size, progress=env.is_main,
                    images=pairs.image_reader(), num_workers=cfg.data.workers, rank=env.rank,
                    world_size=env.world_size, barrier=key_barrier(env, "cache"))
        if cfg.cache.verify:
            # Each rank hashes its share of the shards; all refuse a corrupt one (cache/store.py).
            verify_cache(cfg.cache.dir, env.rank, env.world_size,
                         exchange=lambda text: all_gather_str(text, env, "cache-verify"))
        dataset = PairCacheDataset(cfg.cache.dir, records, flip=cfg.cache.flip, seed=cfg.train.seed, verify=False)
        # The cache holds everything the step needs. The VAE stays only to decode sample grids
        # (log.sample_every); text encoders stay for the empty caption.
        if not cfg.log.sample_every:
            model.vae = None
        return model, dataset

    def run(self, cfg, env):
        result = super().run(cfg, env)
        if env.is_main:
            from pathlib import Path

            from ppd_engine.files import write_json_atomic

            write_json_atomic(Path(result.train.run_dir) / "data.json", self.data_record, indent=1)
        return result


def _has_user_ids(d) -> bool:
    """Pick-a-Pic always has user ids; a user's own columns have them when data.columns maps user_id."""
    return d.format != "columns" or "user_id" in d.columns


def write_users_json(cfg, shots, seen, unseen) -> None:
    """RUN/users.json: each user's role (seen = trained on, unseen = held out) and the shot pairs
    its embedding is built from (never trained on), so eval can select users by role."""
    from pathlib import Path

    from ppd_engine.files import write_json_atomic

    def shot_rows(uid):
        return [{"uid_w": r.uid_w, "uid_l": r.uid_l, "caption": r.caption, "ranking_id": r.ranking_id}
                for r in shots.get(uid, [])]

    d = cfg.data
    users = {u: {"role": role, "shots": shot_rows(u)}
             for role, ids in (("seen", seen), ("unseen", unseen)) for u in ids}
    write_json_atomic(Path(cfg.log.run_dir) / "users.json",
                      {"split": {"n_shots": d.n_shots, "unseen_fraction": d.unseen_fraction, "seed": d.split_seed},
                       "users": users}, indent=1)


register_world(PickapicWorld())
