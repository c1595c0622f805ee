"""The reference pass, once (`train.reference: cached`).

The DPO losses use the frozen reference model through one number per image: the ε-MSE
||ε - ε_ref(x_t, c, t)||² of its prediction. Every draw that number depends on is a pure function of
(seed, step, slot) (training/data_order.py): the pair, t, the noise, the caption dropout, and the
dataset's per-epoch flip. So before training, one inference-only pass over every (step, slot) of the
run computes all of them — no autograd, `torch.inference_mode`, the denoiser `torch.compile`d when
train.compile is on — and training then runs only the policy rows (paired.policy_forward) and hands the stored MSEs to the loss
(`ref_mse=`).

The table (steps, pairs_per_step, 2) float64 [winner, loser] is stored as a small safetensors file in
`train.reference_dir` (default: `reference/` beside the run folder, so the runs of a sweep find it),
named and checked by a fingerprint of everything that determines it: the base weights (a hash of
every frozen tensor), the family, the noise schedule, the empty caption's conditioning, the data
(the dataset's own fingerprint, or a hash of its items for every epoch the run visits), the seed,
pairs per step, number of steps, caption-dropout probability, mixed precision and device type. Not
beta, the loss, its options, the learning rate or personalization: a β sweep, every loss variant,
PPD and its non-personalized baseline, and a resumed run share one file. Anything else recomputes.
The user embeddings never enter (the reference is the base with the user branch off).
The file's metadata carries the sha256 of the table; a table that does not match it (flipped
bytes) is recomputed with a warning naming the file, as an unreadable one is.

Not valid, and then the trainer runs the reference online (with a log line saying why): the
`stacked` paired strategy (its point is to batch the reference with the policy), losses that read
the reference prediction itself (dspo), and a base with active dropout (its reference output is
random, so no stored value can stand for the online one). A dataset whose items are not a pure
function of (index, epoch) cannot be detected here; the cache dataset and the toy world's are.

Batch size (`train.reference_batch`, default the training micro-batch): with the micro-batch the
pass feeds the UNet exactly the online reference's batches, and on this CPU its MSEs are bit-identical
to the online ones (measured: a 2-pair micro-batch, batches of 2 and 4 give equal losses, 12 and 16
differ by 1.7e-5 in a loss of 0.69 at beta=5000 — oneDNN picks other blockings for larger batches,
and beta/2 = 2500 magnifies the ~1e-8 MSE rounding). A larger batch (inference holds no activations,
so it fits) may pay on a GPU; its MSEs then equal the online ones to float32 rounding of the UNet.
tests/test_reference_cache.py checks both.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
import torch
from torch import nn

from ppd_engine.files import save_safetensors_atomic
from ppd_engine.integrity import TENSORS_SHA256, tensors_sha256
from ppd_engine.training.data_order import DataOrder, PairDraws, draw_pairs

logger = logging.getLogger(__name__)

FORMAT = 1
_KEY = "ref_mse"


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def tensor_digest(tensors: list[tuple[str, torch.Tensor | None]]) -> str:
    """blake2b of named tensors (dtype, shape and bytes; None entries hashed as such)."""
    h = hashlib.blake2b(digest_size=20)
    for name, t in tensors:
        h.update(name.encode())
        if t is None:
            h.update(b"none")
        else:
            _hash_tensor(h, t)
    return h.hexdigest()


def base_weights_digest(unet: nn.Module, exclude: set[int]) -> str:
    """Hash of every parameter and buffer of `unet` except those whose id is in `exclude` (the
    adapters, which training changes)."""
    named = [(n, p) for n, p in unet.named_parameters() if id(p) not in exclude]
    named += [(n, b) for n, b in unet.named_buffers() if id(b) not in exclude]
    return tensor_digest(named)


def dataset_digest(dataset, epochs: list[int]) -> str:
    """The dataset's own `fingerprint()` when it has one (the latent cache), else a hash of every
    item's tensors and ids for each epoch in `epochs` (items may depend on the epoch: flips)."""
    own = getattr(dataset, "fingerprint", None)
    if callable(own):
        return f"own:{own()}"
    h = hashlib.blake2b(digest_size=20)
    set_epoch = getattr(dataset, "set_epoch", None)
    for epoch in epochs if callable(set_epoch) else [0]:
        if callable(set_epoch):
            set_epoch(epoch)
        for i in range(len(dataset)):
            for k, v in sorted(dataset[i].items()):
                h.update(k.encode())
                if isinstance(v, torch.Tensor):
                    _hash_tensor(h, v)
                else:
                    h.update(repr(v).encode())
    return h.hexdigest()


def invalid_reason(strategy: str, loss_name: str | list[str], unet: nn.Module, adapters) -> str | None:
    """Why a cached reference cannot stand for the online one in this run, or None when it can."""
    from ppd_engine.losses import needs_reference_prediction

    if strategy == "stacked":
        return "train.paired_strategy=stacked batches the reference with the policy"
    if needs_reference_prediction(loss_name):
        return f"loss.name={loss_name!r} reads the reference prediction itself, not only its MSEs"
    own = {id(m) for part in (adapters.projection, *adapters.processors.values()) for m in part.modules()}
    if unet.training and any(isinstance(m, nn.Dropout) and m.p > 0 and id(m) not in own for m in unet.modules()):
        return "the base has active dropout, so its reference output is random"
    return None


class ReferenceTable:
    """The stored reference MSEs of a run: `lookup(step, slots)` gives (2B,) float64, winners first."""

    def __init__(self, table: torch.Tensor, device: torch.device):
        self.table = table.to(device)

    def lookup(self, step: int, slots: list[int]) -> torch.Tensor:
        rows = self.table[step, slots]
        return torch.cat([rows[:, 0], rows[:, 1]])


def _cat_draws(parts: list[PairDraws]) -> PairDraws:
    return PairDraws(*(torch.cat([getattr(p, f) for p in parts]) for f in
                       ("timesteps", "noise", "drop_caption", "drop_user", "embed_choice")))


def reference_mse(model, x, autocast_dtype: torch.dtype | None, inference_mode: bool = True) -> torch.Tensor:
    """(2B,) float64 reference ε-MSEs of one micro-batch's NoisedPairs `x`: the base (user branch off)
    under inference_mode (no_grad when `inference_mode` is False: FSDP-sharded adapters all-gather
    into buffers that later steps update in place, which inference tensors refuse) and the run's
    autocast, then ppd::paired_mse of its prediction in float32 (what the online step feeds the loss)."""
    from ppd_engine.adapters.families import call_model
    from ppd_engine.adapters.handle import user_conditioning
    from ppd_engine.ops.dpo_loss import paired_mse

    device = x.noisy.device
    grad_off = torch.inference_mode() if inference_mode else torch.no_grad()
    with grad_off, user_conditioning(model.unet, None), torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        pred = call_model(model.unet, x.noisy, x.timesteps, x.text, **x.cond)
        return paired_mse(pred.float(), None, x.target.float())[0]


def compute_reference_mse(model, dataset, order: DataOrder, total_steps: int, *, seed: int,
                          empty_caption_prob: float, empty_text: torch.Tensor, empty_pooled: torch.Tensor | None,
                          autocast_dtype: torch.dtype | None, device: torch.device, batch_pairs: int,
                          slot_groups: list[list[int]] | None = None, inference_mode: bool = True) -> torch.Tensor:
    """(total_steps, pairs_per_step, 2) float64: the reference ε-MSE of the winner and the loser of
    every (step, slot) in `slot_groups` (this rank's micro-batches, data_order.rank_slots; default all
    slots; other rows stay 0), from the same inputs the training step builds
    (training.step.noised_pairs) for the same draws. Jobs run in training order, `batch_pairs` at a
    time, so with batch_pairs = micro_batch each forward is exactly one of the online reference's
    micro-batches. On CUDA a batch that does not fit is halved and retried."""
    from ppd_engine.training.step import collate, noised_pairs

    pps = order.pairs_per_step
    out = torch.zeros(total_steps, pps, 2, dtype=torch.float64)
    groups = slot_groups if slot_groups is not None else [list(range(pps))]
    jobs = [(step, slot) for step in range(total_steps) for group in groups for slot in group]

    def run(chunk: list[tuple[int, int]]) -> None:
        items, draws = [], []
        for step in dict.fromkeys(s for s, _ in chunk):  # steps in job order
            slots = [slot for s, slot in chunk if s == step]
            set_epoch = getattr(dataset, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(order.cursor(step)["epoch"])
            indices = order.step_indices(step)
            items += [dataset[indices[slot]] for slot in slots]
            draws.append(draw_pairs(seed, step, slots, tuple(torch.as_tensor(items[-1]["latents_w"]).shape),
                                    model.num_train_timesteps, empty_caption_prob, 0.0, device))
        batch = collate(items, device)
        x = noised_pairs(model, batch, _cat_draws(draws), empty_text, empty_pooled)
        mse = reference_mse(model, x, autocast_dtype, inference_mode).cpu()
        b = len(chunk)
        # Rows of `items` follow `chunk`: steps appear in job order and each step's jobs are contiguous.
        for j, (step, slot) in enumerate(chunk):
            out[step, slot, 0], out[step, slot, 1] = mse[j], mse[b + j]

    i, bs = 0, max(1, batch_pairs)
    while i < len(jobs):
        chunk = jobs[i:i + bs]
        try:
            run(chunk)
        except torch.cuda.OutOfMemoryError:
            if bs == 1:
                raise
            bs //= 2
            torch.cuda.empty_cache()
            logger.info("reference pass: batch of %d pairs did not fit; retrying with %d", len(chunk), bs)
            continue
        i += len(chunk)
    return out


def schedule_identity(sched) -> dict:
    """The noise schedule as the reference depends on it: the class and its config without diffusers'
    bookkeeping keys (`_class_name`, `_diffusers_version`, `_use_default_values` — the last a list
    built from a set, whose order changes with every process's string hashing, which made every
    process fingerprint the same schedule differently and never reuse a stored pass)."""
    config = {k: v for k, v in dict(sched.config).items() if not k.startswith("_")}
    return {"class": type(sched).__name__, "config": json.loads(json.dumps(config, sort_keys=True, default=str))}


def reference_meta(*, model, adapters, dataset, order: DataOrder, total_steps: int, seed: int,
                   empty_caption_prob: float, empty_text: torch.Tensor, empty_pooled: torch.Tensor | None,
                   mixed_precision: str, device: torch.device) -> dict:
    """Everything the stored reference MSEs depend on (see the module docstring)."""
    sched = model.noise_scheduler
    epochs = sorted({order.cursor(s)["epoch"] for s in range(total_steps)})
    exclude = {id(p) for p in adapters.parameters()}
    return {
        "format": FORMAT, "family": str(getattr(model, "family", "")),
        "base_weights": base_weights_digest(model.unet, exclude),
        # The whole noise-schedule config: timesteps, betas, prediction type (Stage C's included).
        "scheduler": schedule_identity(sched),
        "empty_caption": tensor_digest([("text", empty_text), ("pooled", empty_pooled)]),
        "data": dataset_digest(dataset, epochs), "n_items": len(dataset),
        "seed": int(seed), "pairs_per_step": order.pairs_per_step, "steps": int(total_steps),
        "empty_caption_prob": float(empty_caption_prob),
        "mixed_precision": "no" if mixed_precision == "fp32" else mixed_precision,  # two spellings, one mode
        "device": device.type,
    }


def fingerprint(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def reference_path(folder: str | Path, fp: str) -> Path:
    return Path(folder) / f"reference-{fp[:24]}.safetensors"


def load_reference(path: Path, fp: str, shape: tuple[int, int, int]) -> torch.Tensor | None:
    """The stored table when `path` holds one for fingerprint `fp` and `shape`, else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fp:
                logger.info("reference pass: %s has another fingerprint; recomputing", path)
                return None
            table = f.get_tensor(_KEY)
    except Exception as exc:  # a truncated or foreign file: recompute rather than fail the run
        logger.warning("reference pass: cannot read %s (%s); recomputing", path, exc)
        return None
    recorded = meta.get(TENSORS_SHA256)
    if recorded is None:
        logger.warning("reference pass: %s records no '%s' (written by an older ppd_engine); not verified", path,
                       TENSORS_SHA256)
    elif tensors_sha256({_KEY: table}) != recorded:
        # Flipped bytes inside the table would shift every reference loss: never train on them.
        logger.warning("reference pass: %s: tensor data does not match its sha256 (corrupted file); recomputing",
                       path)
        return None
    if tuple(table.shape) != shape or table.dtype != torch.float64:
        logger.warning("reference pass: %s holds %s %s, expected %s float64; recomputing", path,
                       tuple(table.shape), table.dtype, shape)
        return None
    return table


def save_reference(path: Path, table: torch.Tensor, fp: str, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {_KEY: table.contiguous()}
    save_safetensors_atomic(tensors, path, metadata={"fingerprint": fp, "meta": json.dumps(meta, sort_keys=True),
                                                     TENSORS_SHA256: tensors_sha256(tensors)})


def load_or_compute(*, model, adapters, dataset, order: DataOrder, total_steps: int, seed: int,
                    empty_caption_prob: float, empty_text: torch.Tensor, empty_pooled: torch.Tensor | None,
                    mixed_precision: str, autocast_dtype: torch.dtype | None, env, folder: str | Path,
                    batch_pairs: int, slot_groups: list[list[int]], inference_mode: bool = True) -> ReferenceTable:
    """The run's reference table: read from `folder` when a file with this run's fingerprint is
    there on every rank, else computed (each rank the slots it trains, `slot_groups`, summed across
    ranks) and written by rank 0."""
    import time

    from ppd_engine.training.distributed import all_reduce_sum, barrier

    device = env.device
    meta = reference_meta(model=model, adapters=adapters, dataset=dataset, order=order, total_steps=total_steps,
                          seed=seed, empty_caption_prob=empty_caption_prob, empty_text=empty_text,
                          empty_pooled=empty_pooled, mixed_precision=mixed_precision, device=device)
    fp = fingerprint(meta)
    path = reference_path(folder, fp)
    shape = (total_steps, order.pairs_per_step, 2)
    table = load_reference(path, fp, shape)
    found = all_reduce_sum(torch.tensor([float(table is not None)], device=device), env)
    if int(found.item()) == env.world_size:
        logger.info("reference pass: reusing %s (%d steps x %d pairs)", path, total_steps, order.pairs_per_step)
        return ReferenceTable(table, device)
    start = time.perf_counter()
    table = compute_reference_mse(model, dataset, order, total_steps, seed=seed,
                                  empty_caption_prob=empty_caption_prob, empty_text=empty_text,
                                  empty_pooled=empty_pooled, autocast_dtype=autocast_dtype, device=device,
                                  batch_pairs=batch_pairs, slot_groups=slot_groups, inference_mode=inference_mode)
    table = all_reduce_sum(table.to(device), env).cpu()
    if env.is_main:
        save_reference(path, table, fp, meta)
    barrier(env)
    logger.info("reference pass: %d steps x %d pairs in %.1f s (%d pairs per batch) -> %s", total_steps,
                order.pairs_per_step, time.perf_counter() - start, batch_pairs, path)
    return ReferenceTable(table, device)
