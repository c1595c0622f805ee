"""Optimizers (adamw8bit, adamw, adafactor), learning-rate schedules (diffusers.optimization's), and
optimizer state as safetensors + JSON (no pickle).
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ppd_engine.config import OptimConfig
from ppd_engine.integrity import CorruptFileError

# Optimizers whose update of an element depends only on that element's own state: they give the
# same result stepping each rank's local shard (needed for bitsandbytes, which rejects DTensors).
ELEMENTWISE = ("adamw8bit", "adamw")


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.name` over `params` (fp32 masters)."""
    betas = tuple(cfg.betas)
    if cfg.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                   min_8bit_size=cfg.min_8bit_size)
    if cfg.name == "adamw":
        # foreach=False keeps the update elementwise-identical between a full tensor and its shards.
        return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 foreach=False)
    if cfg.name == "adafactor":
        if hasattr(torch.optim, "Adafactor"):
            return torch.optim.Adafactor(params, lr=cfg.lr, beta2_decay=-0.8, eps=(None, 1e-3),
                                         weight_decay=cfg.weight_decay, foreach=False)
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name: {cfg.name!r} is not one of adamw8bit, adamw, adafactor")


def lr_at(update: int, cfg: OptimConfig, total_updates: int) -> float:
    """The learning rate of optimizer update `update` (0-based, counting applied updates only) in a
    run of `total_updates`: cfg.lr x the multiplier of diffusers' `get_scheduler(cfg.scheduler)`
    after update + 1 schedule steps. A pure function of the count (no scheduler state), so a resumed
    run continues the schedule bit for bit. The "+ 1" spends no update at lr 0: warmup's first
    update has lr / warmup_steps (a LambdaLR stepped after each update would start at 0)."""
    return cfg.lr * _multiplier(cfg.scheduler, cfg.lr, cfg.warmup_steps, max(1, total_updates), cfg.num_cycles,
                                cfg.power)(update + 1)


@functools.lru_cache(maxsize=8)
def _multiplier(name: str, lr: float, warmup: int, total: int, num_cycles: int, power: float
                ) -> Callable[[int], float]:
    """The schedule's step -> multiplier function, read out of the LambdaLR that get_scheduler builds
    (on a throw-away optimizer: polynomial's multiplier depends on the initial lr)."""
    from diffusers.optimization import get_scheduler

    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(name, dummy, num_warmup_steps=warmup, num_training_steps=total, num_cycles=num_cycles,
                          power=power)
    return sched.lr_lambdas[0]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_state_dtypes(optimizer: torch.optim.Optimizer) -> dict[str, set[torch.dtype]]:
    """Dtypes of every state tensor by state key (e.g. {'state1': {torch.uint8}, ...})."""
    out: dict[str, set[torch.dtype]] = {}
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out.setdefault(k, set()).add(v.dtype)
    return out


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor], seen: dict[tuple, str]) -> Any:
    """JSON-able tree of `obj` with every tensor moved into `tensors` and replaced by a reference.

    Aliased tensors (bitsandbytes shares one quantisation map among all parameters) are stored once
    and referenced from every place (safetensors refuses shared storage)."""
    if isinstance(obj, torch.Tensor):
        t = obj._local_tensor if hasattr(obj, "_local_tensor") else obj
        alias = (t.device.type, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and alias in seen:
            return {"__tensor__": seen[alias]}
        seen[alias] = prefix
        tensors[prefix] = t.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_split(k, f"{prefix}/k{i}", tensors, seen), _split(v, f"{prefix}/{k}", tensors, seen)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}/{i}", tensors, seen) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"optimizer state entry {prefix} has unsupported type {type(obj).__name__}")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        return {_join(k, tensors): _join(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_optimizer_state(optimizer: torch.optim.Optimizer, path_stem: str) -> None:
    """Write `path_stem`.safetensors (every state tensor, incl. bnb's uint8 state and absmax) and
    `path_stem`.json (scalars and structure). Plain writes: they go into a checkpoint's temp folder,
    which is renamed into place whole (training/checkpoint.py)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(optimizer.state_dict(), "opt", tensors, {})
    save_file(tensors, path_stem + ".safetensors")
    with open(path_stem + ".json", "w", encoding="utf-8") as fh:
        json.dump(tree, fh)


def load_optimizer_state(optimizer: torch.optim.Optimizer, path_stem: str) -> None:
    """Inverse of `save_optimizer_state` (safetensors + JSON only); CorruptFileError naming the file
    that cannot be read."""
    try:
        tensors = load_file(path_stem + ".safetensors")
    except SafetensorError as exc:
        raise CorruptFileError(f"{path_stem}.safetensors: not a readable optimizer state file ({exc})") from None
    try:
        with open(path_stem + ".json", encoding="utf-8") as fh:
            tree = json.load(fh)
        state = _join(tree, tensors)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"{path_stem}.json: not a readable optimizer state file ({exc})") from None
    # JSON keys of optimizer.state are param indices (ints).
    state["state"] = {int(k): v for k, v in state["state"].items()}
    optimizer.load_state_dict(state)
