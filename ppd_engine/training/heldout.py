"""Held-out evaluation while training (`log.eval_every`): the preference loss and its statistics
(StepStats: loss, implicit_acc, reward_margin, TRL's rewards_*) on fixed sets of pairs the run
never trains on, typically seen users' held-out pairs and unseen users' pairs.

    sets = {"seen": HeldOutSet(seen_pairs, eval_embeddings), "unseen": HeldOutSet(unseen_pairs, eval_embeddings)}
    Trainer(cfg, model, dataset, embeddings, run_dir, eval_sets=sets)   # logs eval/seen/loss, ...

The numbers are comparable across steps because everything but the adapters is fixed: each pair's
timestep, noise and embedding choice are drawn once from its own generator (data_order.draw_pairs
under a seed of the set's own, never the training stream), with no caption or user dropout; the
base runs in eval mode (no dropout, so no draw from the global RNG either); the reference MSEs
(the frozen base, user branch off) are computed at the first evaluation and kept. Nothing here
takes a gradient, writes a parameter or advances an RNG that training reads, so a run with
evaluation on trains bitwise as one with it off (tests/test_heldout.py).

Every rank evaluates the whole set (replicas get the same numbers; sharded adapters need every
rank in each forward); only rank 0 logs.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ppd_engine.training.data_order import PairDraws, draw_pairs, mix_seed
from ppd_engine.training.step import StepStats, collate, micro_step_loss, noised_pairs, pick_user_embeds

_HELDOUT = 4  # a stream id beside data_order's (_PERM, _PAIR, _NOISE): held-out draws never equal training ones


@dataclass
class HeldOutSet:
    """Pairs shaped like training items (latents_w/_l, text, [pooled, time_ids_w/_l], user_id) and
    the embeddings of their users (user_id -> (K, T_in, Du)); None = the trainer's own."""

    items: Sequence[dict]
    embeddings: Mapping[str, torch.Tensor] | None = None


@dataclass
class _Chunk:
    items: list[dict]
    draws: PairDraws
    embeds: torch.Tensor
    ref_mse: torch.Tensor | None = None  # (2B,) float64, filled at the first evaluation


class HeldOutEvaluator:
    """`evaluate()` -> {"eval/<set>/<stat>": mean over the set's pairs} for every StepStats field."""

    def __init__(self, sets: Mapping[str, HeldOutSet | Sequence[dict]], *, model, cfg, user_embeddings,
                 embed_shape: tuple[int, int], personalized: bool, empty_text: torch.Tensor,
                 empty_pooled: torch.Tensor | None, autocast_dtype: torch.dtype | None, device: torch.device):
        from ppd_engine.losses import needs_reference_prediction, official_beta

        self.model, self.cfg = model, cfg
        self.empty_text, self.empty_pooled, self.autocast = empty_text, empty_pooled, autocast_dtype
        self.beta = official_beta(cfg.loss.beta, cfg.loss.beta_units, model.num_train_timesteps)
        # dspo reads the reference prediction itself: its reference runs with every evaluation.
        self.cache_reference = not needs_reference_prediction(cfg.loss.name)
        self.sets: dict[str, list[_Chunk]] = {}
        mb = cfg.train.micro_batch
        for name, s in sets.items():
            s = s if isinstance(s, HeldOutSet) else HeldOutSet(s)
            n = len(s.items)
            if n == 0:
                raise ValueError(f"eval_sets[{name!r}] has no pairs")
            seed = mix_seed(cfg.train.seed, _HELDOUT, zlib.crc32(name.encode()))
            chunks = []
            for start in range(0, n, mb):
                items = [s.items[i] for i in range(start, min(n, start + mb))]
                draws = draw_pairs(seed, 0, list(range(start, start + len(items))),
                                   tuple(torch.as_tensor(items[0]["latents_w"]).shape), model.num_train_timesteps,
                                   0.0, 0.0, device)
                try:
                    embeds = pick_user_embeds([it["user_id"] for it in items], draws.embed_choice,
                                              s.embeddings if s.embeddings is not None else user_embeddings,
                                              embed_shape, device, zero=not personalized)
                except KeyError as exc:
                    raise KeyError(f"eval_sets[{name!r}]: {exc.args[0]}") from None
                chunks.append(_Chunk(items, draws, embeds))
            self.sets[name] = chunks

    def _reference(self, batch: dict, chunk: _Chunk) -> torch.Tensor:
        from ppd_engine.training.reference import reference_mse

        x = noised_pairs(self.model, batch, chunk.draws, self.empty_text, self.empty_pooled)
        # no_grad rather than inference_mode: FSDP-sharded adapters refuse inference tensors.
        return reference_mse(self.model, x, self.autocast, inference_mode=False)

    def evaluate(self) -> dict[str, float]:
        cfg, unet = self.cfg, self.model.unet
        names = [f.name for f in dataclasses.fields(StepStats)]
        out: dict[str, float] = {}
        was_training = unet.training
        unet.eval()
        try:
            with torch.no_grad():
                for set_name, chunks in self.sets.items():
                    total, pairs = None, 0
                    for chunk in chunks:
                        batch = collate(chunk.items, chunk.embeds.device)
                        if self.cache_reference and chunk.ref_mse is None:
                            chunk.ref_mse = self._reference(batch, chunk)
                        _, st = micro_step_loss(
                            self.model, batch, chunk.draws, chunk.embeds, self.empty_text, self.empty_pooled,
                            loss_name=cfg.loss.name, beta=self.beta, weighting=cfg.loss.weighting,
                            snr_gamma=cfg.loss.snr_gamma, loss_options=cfg.loss.options,
                            loss_weights=cfg.loss.weights or None, strategy=cfg.train.paired_strategy,
                            autocast_dtype=self.autocast, ref_mse=chunk.ref_mse)
                        b = len(chunk.items)
                        row = torch.stack([getattr(st, k).reshape(()).double() for k in names]) * b
                        total = row if total is None else total + row
                        pairs += b
                    out.update({f"eval/{set_name}/{k}": v for k, v in zip(names, (total / pairs).tolist())})
        finally:
            unet.train(was_training)
        return out
