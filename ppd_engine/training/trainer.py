"""The training loop: adapters on a frozen base, gradient accumulation to `train.pairs_per_step`,
NaN/Inf step skipping, distributed adapters, checkpoints that resume exactly.

    trainer = Trainer(cfg, model, dataset, user_embeddings, run_dir, personalized=True)
    result = trainer.fit()      # TrainResult(run_dir, steps, last_checkpoint, final_metrics)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ppd_engine.config import Config, config_to_dict, save_config
from ppd_engine.integrity import CorruptFileError
from ppd_engine.training import checkpoint as ckpt
from ppd_engine.training import reference
from ppd_engine.training.activation_checkpointing import enable_checkpointing, unsave_frozen_conv_inputs
from ppd_engine.training.data_order import DataOrder, draw_pairs, rank_slots
from ppd_engine.training.input import StepLoader
from ppd_engine.training.distributed import (
    DistEnv, LocalShardParams, ReplicatedGradSync, all_reduce_sum, barrier, global_grad_norm, init_distributed,
    scale_grads_, shard_adapters)
from ppd_engine.training.finite import StepSnapshot, all_finite
from ppd_engine.training.heldout import HeldOutEvaluator, HeldOutSet
from ppd_engine.training.precision import LossScaler, autocast_dtype, set_tf32
from ppd_engine.training.metrics import MetricsLogger, peak_memory_mb, save_grid_png, truncate_metrics
from ppd_engine.training.optim import (
    ELEMENTWISE, build_optimizer, load_optimizer_state, lr_at, save_optimizer_state, set_lr)
from ppd_engine.training.run_folder import continues_run, take_run_folder
from ppd_engine.training.step import micro_step_loss, pick_user_embeds
from ppd_engine.losses import official_beta

logger = logging.getLogger(__name__)



class BadStepsError(RuntimeError):
    """More than train.max_bad_steps consecutive steps had a NaN/Inf loss, gradient or update, or no
    step of the run made a finite update."""


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    last_checkpoint: str | None
    final_metrics: dict = field(default_factory=dict)


def _embedding_shape(user_embeddings: Mapping[str, torch.Tensor] | None) -> tuple[int, int] | None:
    """(T_in, Du) of the store's embeddings (all users must agree)."""
    if not user_embeddings:
        return None
    shapes = set()
    for uid, e in user_embeddings.items():
        t = torch.as_tensor(e)
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if t.dim() != 3:
            raise ValueError(f"user embedding of {uid!r} must be (K, T_in, Du); got {tuple(t.shape)}")
        shapes.add(tuple(t.shape[1:]))
    if len(shapes) != 1:
        raise ValueError(f"user embeddings disagree in (T_in, Du): {sorted(shapes)}")
    return shapes.pop()


class Trainer:
    """Trains the user adapters of `model.unet` on `dataset` with the loss of `cfg.loss`.

    Args:
        cfg: the resolved run config.
        model: a DiffusionModel (frozen; its unet gets the adapters added in place).
        dataset: items with latents_w/_l (C, h, w), text (T, D), [pooled, time_ids_w/_l], user_id.
        user_embeddings: user_id -> (K, T_in, Du) few-shot embeddings (one of the K is drawn per pair);
            may be None only when personalized=False (then adapters.user_dim must be set).
        run_dir: the run folder (config.yaml, metrics.jsonl, checkpoints/, samples/, tb/).
        personalized: False = the non-personalized Diffusion-DPO baseline: the same adapters, but the
            user input is always the zero embedding.
        eval_sets: name -> held-out pairs (a HeldOutSet, or items alone to use `user_embeddings`),
            evaluated every log.eval_every steps and at step 0 (training/heldout.py).
    """

    def __init__(self, cfg: Config, model, dataset, user_embeddings: Mapping[str, torch.Tensor] | None,
                 run_dir: str, personalized: bool = True, env: DistEnv | None = None,
                 eval_sets: Mapping[str, HeldOutSet | list] | None = None):
        self.cfg, self.model, self.dataset = cfg, model, dataset
        self.run_dir = Path(run_dir)
        self.personalized = personalized
        self.user_embeddings = user_embeddings
        # The caller (the CLI, a world) joins the process group once; a library caller may let the
        # trainer do it from train.device / dist.*.
        self.env = env if env is not None else init_distributed(cfg.train.device, cfg.dist.backend,
                                                                cfg.dist.timeout_s, cfg.dist.heartbeat_s)
        self._check_inputs()
        self._plan_data()
        self._add_adapters()
        state = self._read_resume_state()
        self._distribute()
        self._build_optimizer()
        self._restore(state)
        self._prepare_conditioning()
        self._prepare_run_folder()
        self._prepare_reference()
        self.heldout = None if not (eval_sets and cfg.log.eval_every) else HeldOutEvaluator(
            eval_sets, model=model, cfg=cfg, user_embeddings=user_embeddings, embed_shape=self.embed_shape,
            personalized=personalized, empty_text=self.empty_text, empty_pooled=self.empty_pooled,
            autocast_dtype=self.autocast, device=self.env.device)

    # -- setup, one named step each -------------------------------------------------------------
    def _check_inputs(self) -> None:
        """What the config cannot check alone: the embeddings against the personalized flag and user_dim."""
        if self.personalized and not self.user_embeddings:
            raise ValueError("personalized training needs user embeddings (data.embeddings)")
        shape = _embedding_shape(self.user_embeddings)
        a = self.cfg.adapters
        if shape and a.user_dim and a.user_dim != shape[1]:
            raise ValueError(f"adapters.user_dim={a.user_dim} but the embeddings have Du={shape[1]}")
        user_dim = a.user_dim or (shape[1] if shape else 0)
        if user_dim <= 0:
            raise ValueError("adapters.user_dim: set it (no user embeddings to read it from)")
        self.embed_shape = (shape[0] if shape else 1, user_dim)

    def _plan_data(self) -> None:
        """The deterministic data order and this rank's micro-batch slots of every step."""
        t, env = self.cfg.train, self.env
        self.sharded = self.cfg.dist.adapters == "shard" and env.distributed
        self.accum = t.pairs_per_step // (t.micro_batch * env.world_size)
        self.slots = rank_slots(t.pairs_per_step, t.micro_batch, env.rank, env.world_size)
        self.order = DataOrder(len(self.dataset), t.pairs_per_step, t.seed)
        self.total_steps = t.max_steps or t.epochs * self.order.steps_per_epoch
        self.input = StepLoader(self.dataset, self.order, self.slots, self.total_steps, env.device,
                                workers=self.cfg.data.workers, prefetch=self.cfg.data.prefetch)

    def _add_adapters(self) -> None:
        from ppd_engine.adapters import add_user_adapters, warn_if_not_exportable

        t, a = self.cfg.train, self.cfg.adapters
        # Same seed on every rank: identical adapter initialisation, which FSDP's sharding relies on
        # (each rank keeps its own slice of its own copy); replicas also get rank 0's copy broadcast.
        torch.manual_seed(t.seed)
        unet = self.model.unet
        unet.to(self.env.device)
        unet.requires_grad_(False)
        self.adapters = add_user_adapters(unet, user_dim=self.embed_shape[1], num_tokens=a.num_tokens,
                                          projection=a.projection, scale=a.scale, dropout=0.0,
                                          in_tokens=self.embed_shape[0], attention=a.attention,
                                          # fp32 masters whatever the base dtype; autocast does the
                                          # low-precision compute. Passing it here (not .float()
                                          # afterwards) keeps the saved adapter config truthful.
                                          dtype=torch.float32)
        if self.env.is_main:
            warn_if_not_exportable(unet)
        unsave_frozen_conv_inputs(unet)
        if t.gradient_checkpointing:
            enable_checkpointing(unet, t.checkpoint_policy)
        if t.compile:
            unet.compile()  # in place: the policy steps and the reference pass both call the compiled module

    def _read_resume_state(self) -> dict | None:
        """The checkpoint to resume from (checkpoint.resume) and its adapters; None for a fresh run."""
        from ppd_engine.adapters import load_user_adapters

        self.resume_from = ckpt.resolve_resume(self.cfg.checkpoint.resume, self.run_dir)
        if self.resume_from is None:
            return None
        state = ckpt.read_json(self.resume_from / "state.json")
        self._check_resumable(state)
        load_user_adapters(self.model.unet, self.resume_from / "adapters.safetensors")
        return state

    def _distribute(self) -> None:
        """Shard the adapters with FSDP2, or replicate them (rank 0's copy) with a gradient all-reduce."""
        env = self.env
        params = list(self.adapters.parameters())
        self.fsdp_modules: list[nn.Module] = []
        self.grad_sync = None
        if self.sharded:
            self.fsdp_modules = shard_adapters(self.model.unet, params, env)
            params = list(self.adapters.parameters())  # now DTensors
        elif env.distributed:
            with torch.no_grad():
                for p in params:
                    torch.distributed.broadcast(p.data, src=0)
            self.grad_sync = ReplicatedGradSync(params, env)
        self.params = params

    def _build_optimizer(self) -> None:
        o = self.cfg.optim
        t = self.cfg.train
        self.scaler = LossScaler(enabled=t.mixed_precision == "fp16", init_scale=t.loss_scale_init)
        self.views = None
        if self.sharded:
            if o.name not in ELEMENTWISE:
                raise ValueError(f"optim.name={o.name!r} cannot step local shards; use dist.adapters=replicate")
            self.views = LocalShardParams(self.params)
            self.optimizer = build_optimizer(self.views.views, o)
        else:
            self.optimizer = build_optimizer(self.params, o)

    def _restore(self, state: dict | None) -> None:
        """Counters, optimizer state and this rank's RNG from the resume checkpoint."""
        self.step = 0
        self.updates = 0
        self.bad_total = 0
        self.bad_run = 0
        if state is None:
            return
        env = self.env
        self.step, self.updates = state["step"], state["updates"]
        self.bad_total, self.bad_run = state["bad_steps_total"], state["consecutive_bad"]
        self.scaler.load_state_dict(state.get("loss_scaler"))
        rank_file = env.rank if self.sharded else 0
        load_optimizer_state(self.optimizer, str(self.resume_from / f"optimizer-rank{rank_file}"))
        rng = self.resume_from / f"rng-rank{env.rank}.safetensors"
        if rng.is_file():
            ckpt.restore_rng_state(rng)
        elif env.rank < state["world_size"]:
            raise CorruptFileError(f"{rng} is missing: rank {env.rank} cannot resume its random state")
        else:
            logger.warning("rank %d: %s saved %d rank(s); this rank starts from fresh RNG state (the data "
                           "draws do not depend on it)", env.rank, self.resume_from, state["world_size"])

    def _prepare_conditioning(self) -> None:
        """The empty caption's conditioning (caption dropout) and the autocast dtype."""
        enc = self.model.encode_text([""])
        device = self.env.device
        self.empty_text = enc.states.detach().to(device, torch.float32)
        self.empty_pooled = None if enc.pooled is None else enc.pooled.detach().to(device, torch.float32)
        t = self.cfg.train
        self.autocast = autocast_dtype(t.mixed_precision)
        set_tf32(t.allow_tf32)
        self.last_checkpoint: str | None = str(self.resume_from) if self.resume_from else None

    def _prepare_run_folder(self) -> None:
        """config.yaml and a metrics.jsonl that matches the step we start from (rank 0 only)."""
        env, t, o = self.env, self.cfg.train, self.cfg.optim
        if not env.is_main:
            return
        moved = take_run_folder(self.run_dir, resuming=continues_run(self.cfg.checkpoint.resume, self.run_dir),
                                overwrite=self.cfg.log.overwrite)
        if moved is not None:
            logger.warning("log.overwrite=true: the run that was in %s is now in %s", self.run_dir, moved)
        save_config(self.cfg, self.run_dir / "config.yaml")
        if self.resume_from is None:
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        else:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        n = sum(p.numel() for p in self.params) * (env.world_size if self.sharded else 1)
        logger.info("training %s adapter params (%s, %d rank(s), %s adapters), %d steps x %d pairs "
                    "(%d micro-batches of %d per rank)", f"{n:,}", o.name, env.world_size,
                    "sharded" if self.sharded else "replicated", self.total_steps, t.pairs_per_step,
                    self.accum, t.micro_batch)

    def _prepare_reference(self) -> None:
        """train.reference=cached: every step's reference MSEs, read or computed once, before the first
        step (training/reference.py); None = the reference runs online in each step."""
        t = self.cfg.train
        self.reference: reference.ReferenceTable | None = None
        if t.reference != "cached":
            return
        why = reference.invalid_reason(t.paired_strategy, self.cfg.loss.name, self.model.unet, self.adapters)
        if why:
            logger.info("train.reference=cached is not valid for this run (%s); running the reference online", why)
            return
        self.reference = reference.load_or_compute(
            model=self.model, adapters=self.adapters, dataset=self.dataset, order=self.order,
            total_steps=self.total_steps, seed=t.seed, empty_caption_prob=t.empty_caption_prob,
            empty_text=self.empty_text, empty_pooled=self.empty_pooled, mixed_precision=t.mixed_precision,
            autocast_dtype=self.autocast, env=self.env, folder=t.reference_dir or self.run_dir.parent / "reference",
            batch_pairs=t.reference_batch or t.micro_batch, slot_groups=self.slots, inference_mode=not self.sharded)

    def _check_resumable(self, state: dict) -> None:
        t = self.cfg.train
        if state.get("data_items") != len(self.dataset):
            raise ValueError(f"cannot resume from {self.resume_from}: it saw {state.get('data_items')} training "
                             f"pairs, this dataset has {len(self.dataset)}")
        if state["cursor"] != self.order.cursor(state["step"]) or state.get("pairs_per_step") != t.pairs_per_step:
            raise ValueError(f"cannot resume from {self.resume_from}: train.seed or train.pairs_per_step changed "
                             "(the data order would differ)")
        sharded = self.cfg.dist.adapters == "shard" and self.env.distributed
        if (sharded or state.get("sharded")) and state.get("world_size") != self.env.world_size:
            raise ValueError(f"cannot resume from {self.resume_from}: sharded optimizer state of "
                             f"{state.get('world_size')} rank(s), this run has {self.env.world_size}")

    # -- the step -----------------------------------------------------------------------------
    def _zero_grads(self) -> None:
        for p in self.params:
            p.grad = None
        if self.views is not None:
            self.views.detach_grads()

    def train_step(self) -> dict:
        """One optimizer step (or a skipped one) over train.pairs_per_step pairs; returns its metrics."""
        cfg, env = self.cfg, self.env
        t = cfg.train
        start = time.perf_counter()
        sums = None
        for slots, batch in zip(self.slots, self.input.batches(self.step)):
            draws = draw_pairs(t.seed, self.step, slots, tuple(batch["latents_w"].shape[1:]),
                               self.model.num_train_timesteps, t.empty_caption_prob, t.user_dropout, env.device)
            embeds = pick_user_embeds(batch["user_id"], draws.embed_choice, self.user_embeddings, self.embed_shape,
                                      env.device, zero=not self.personalized)
            embeds = embeds * (~draws.drop_user).to(embeds.dtype).view(-1, 1, 1)
            loss, st = micro_step_loss(
                self.model, batch, draws, embeds, self.empty_text, self.empty_pooled, loss_name=cfg.loss.name,
                beta=official_beta(cfg.loss.beta, cfg.loss.beta_units, self.model.num_train_timesteps),
                weighting=cfg.loss.weighting, snr_gamma=cfg.loss.snr_gamma,
                loss_options=cfg.loss.options, loss_weights=cfg.loss.weights or None, strategy=t.paired_strategy,
                autocast_dtype=self.autocast,
                ref_mse=None if self.reference is None else self.reference.lookup(self.step, slots))
            (loss * (self.scaler.scale / self.accum)).backward()
            stat_names = [f.name for f in dataclasses.fields(st)]
            row = torch.stack([getattr(st, n).detach().reshape(()).double() for n in stat_names])
            sums = row if sums is None else sums + row
        if self.grad_sync is not None:
            self.grad_sync()
        # Means over every pair of the step (each rank holds the same number of micro-batches).
        means = all_reduce_sum(sums, env) / (self.accum * env.world_size)
        stats = dict(zip(stat_names, means.tolist()))
        if self.scaler.enabled:
            scale_grads_(self.params, 1.0 / self.scaler.scale)
        grad_norm = global_grad_norm(self.params, env, self.sharded)
        bad = torch.tensor([0.0 if (math.isfinite(stats["loss"]) and math.isfinite(grad_norm.item())) else 1.0],
                           device=env.device)
        bad = bool(all_reduce_sum(bad, env).item() > 0)
        # fp16: a finite loss with overflowing gradients is the loss scale's doing, not the run's; the
        # step is skipped, the scale halved, and it does not count towards train.max_bad_steps.
        overflow = self.scaler.enabled and bad and math.isfinite(stats["loss"])
        lr = lr_at(self.updates, cfg.optim, self.total_steps)
        if not bad:
            if t.grad_clip > 0 and grad_norm.item() > t.grad_clip:
                scale_grads_(self.params, t.grad_clip / (grad_norm.item() + 1e-6))
            set_lr(self.optimizer, lr)
            if self.views is not None:
                self.views.attach_grads()
            bad = not self._finite_step()
        self.scaler.update(overflow)
        if overflow:
            pass  # nothing applied; the next step runs at half the scale
        elif bad:
            # Nothing is applied: parameters and optimizer state stay those of the last good step.
            self.bad_total += 1
            self.bad_run += 1
        else:
            self.bad_run = 0
            self.updates += 1
        self._zero_grads()
        self.step += 1
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        elapsed = time.perf_counter() - start
        return {
            "step": self.step, "epoch": self.order.cursor(self.step - 1)["epoch"],
            **stats, "grad_norm": grad_norm.item(),
            "lr": lr, "pairs_per_s": t.pairs_per_step / max(elapsed, 1e-9),
            "peak_mem_mb": peak_memory_mb(env.device), "skipped": int(bad), "bad_steps_total": self.bad_total,
            **({"loss_scale": self.scaler.scale, "overflow": int(overflow)} if self.scaler.enabled else {}),
        }

    def _finite_step(self) -> bool:
        """optimizer.step(), undone on every rank when any rank's parameters or optimizer state
        came out NaN/Inf (training/finite.py). True when the update was kept."""
        snapshot = StepSnapshot(self.optimizer)
        self.optimizer.step()
        broken = (~all_finite(self.optimizer)).to(self.env.device, torch.float64).reshape(1)
        if all_reduce_sum(broken, self.env).item() == 0:
            return True
        snapshot.restore()
        return False

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write RUN/checkpoints/step-N/ (every rank takes part; rank 0 renames it into place)."""
        from ppd_engine.adapters import save_user_adapters

        env = self.env
        tmp = ckpt.temp_checkpoint_dir(self.run_dir, self.step)
        final = ckpt.checkpoint_dir(self.run_dir, self.step)
        if env.is_main:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier(env)
        for m in self.fsdp_modules:  # full adapter tensors for the file (collective)
            m.unshard()
        if env.is_main:
            save_user_adapters(self.model.unet, tmp / "adapters.safetensors")
        for m in self.fsdp_modules:
            m.reshard()
        if self.sharded or env.is_main:
            save_optimizer_state(self.optimizer, str(tmp / f"optimizer-rank{env.rank}"))
        ckpt.save_rng_state(tmp / f"rng-rank{env.rank}.safetensors")
        barrier(env)  # every rank's files are in: rank 0 hashes them all into state.json
        if env.is_main:
            save_config(self.cfg, tmp / "config.yaml")
            ckpt.write_state(tmp, {
                "step": self.step, "updates": self.updates, "bad_steps_total": self.bad_total,
                "consecutive_bad": self.bad_run, "world_size": env.world_size, "sharded": self.sharded,
                "optimizer": self.cfg.optim.name, "data_items": len(self.dataset),
                "pairs_per_step": self.cfg.train.pairs_per_step, "cursor": self.order.cursor(self.step),
                # Lets eval tell the non-personalized baseline from a PPD run without being told.
                "personalized": self.personalized,
                "loss_scaler": self.scaler.state_dict(),
            })
        barrier(env)
        if env.is_main:
            ckpt.publish_checkpoint(tmp, final, self.cfg.checkpoint.keep_last)
        barrier(env)
        self.last_checkpoint = str(final)
        return final

    # -- samples -------------------------------------------------------------------------------
    def write_samples(self, metrics: MetricsLogger) -> Path | None:
        """A grid (rows: the base model, fixed users, the zero embedding; columns: log.sample_prompts) at
        this step; latent models decode through their VAE at the latent resolution.

        Needs `ppd_engine.sampling.generate`; without it the grid is skipped with a warning."""
        try:
            from ppd_engine.sampling import generate
        except ImportError as exc:
            logger.warning("log.sample_every is set but ppd_engine.sampling is unavailable (%s); no sample grid", exc)
            return None
        if not self.sharded and not self.env.is_main:
            return None  # replicas are identical: rank 0 samples alone (sharded ranks must all join)
        lc = self.cfg.log
        users = sorted(self.user_embeddings)[: lc.sample_users] if (self.user_embeddings and self.personalized) else []
        rows = []
        for uid in users:
            e = torch.as_tensor(self.user_embeddings[uid])
            rows.append(e[0] if e.dim() == 3 else e)
        rows.append(torch.zeros(self.embed_shape))
        prompts = list(lc.sample_prompts)
        embeds = torch.stack([r for r in rows for _ in prompts]).to(self.env.device, torch.float32)
        seeds = [lc.sample_seed + j for _ in rows for j in range(len(prompts))]
        was_training = self.model.unet.training
        self.model.unet.eval()
        with torch.no_grad():
            # The base model's row first (user branch off, same seeds): each column shows what the adapters add.
            base = generate(self.model, prompts, None, seeds[:len(prompts)], steps=lc.sample_steps,
                            guidance=lc.sample_guidance)
            images = torch.cat([base, generate(self.model, prompts * len(rows), embeds, seeds, steps=lc.sample_steps,
                                               guidance=lc.sample_guidance)])
        self.model.unet.train(was_training)
        if not self.env.is_main:
            return None
        path = self.run_dir / "samples" / f"step-{self.step}.png"
        grid = save_grid_png(images, nrow=len(prompts), path=path)
        metrics.image("samples", grid, self.step)
        return path

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train until train.max_steps (or the epochs) are done; checkpoint every checkpoint.every
        steps and at the end. Raises BadStepsError (after checkpointing the last finite state) when
        more than train.max_bad_steps consecutive steps are non-finite, and (saving nothing) when
        no step at all made a finite update."""
        cfg, env = self.cfg, self.env
        metrics = MetricsLogger(self.run_dir, self.total_steps, self.step, env.is_main, cfg.log.report_to,
                                cfg.log.progress, hparams=config_to_dict(cfg), project=cfg.log.project)
        row: dict = {}
        saved_at = self.step if self.resume_from is not None else -1
        try:
            if self.heldout is not None and self.step == 0:
                metrics.log({"step": 0, **self.heldout.evaluate()})
            while self.step < self.total_steps:
                row = self.train_step()
                if self.heldout is not None and self.step % cfg.log.eval_every == 0:
                    row.update(self.heldout.evaluate())
                metrics.log(row)
                if row.get("overflow"):
                    logger.info("step %d: fp16 gradients overflowed; step skipped, loss scale now %g", self.step,
                                self.scaler.scale)
                elif row["skipped"]:
                    logger.warning("step %d: non-finite loss (%s), gradient norm (%s) or update; step skipped "
                                   "(%d in a row, %d total)", self.step, row["loss"], row["grad_norm"],
                                   self.bad_run, self.bad_total)
                if self.bad_run > cfg.train.max_bad_steps:
                    # Parameters and optimizer state are those of the last good step (a non-finite
                    # update was rolled back); resuming from this checkpoint gets a fresh budget.
                    self.bad_run = 0
                    path = self.save_checkpoint()
                    raise BadStepsError(
                        f"{cfg.train.max_bad_steps + 1} consecutive steps had a NaN/Inf loss or gradient, or a "
                        f"non-finite update (last at step {self.step}); stopped. The last finite state is in {path}. "
                        f"Lower optim.lr, check the data, or raise train.max_bad_steps.")
                if cfg.log.sample_every and self.step % cfg.log.sample_every == 0:
                    self.write_samples(metrics)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
                    saved_at = self.step
            if self.updates == 0 and self.step > 0:
                # Nothing was learnt: a checkpoint of the untouched adapters would pass for a result.
                raise BadStepsError(
                    f"no step of this run made a finite update ({self.bad_total} of {self.step} skipped); "
                    f"nothing was trained. Last finite checkpoint: {self.last_checkpoint or 'none'}. "
                    "Check the data and user embeddings for NaN/Inf, and optim.lr.")
            if saved_at != self.step:
                self.save_checkpoint()
        finally:
            metrics.close()
            self.input.close()
        return TrainResult(run_dir=str(self.run_dir), steps=self.step, last_checkpoint=self.last_checkpoint,
                           final_metrics=row)
