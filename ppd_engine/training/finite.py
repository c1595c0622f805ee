"""Only finite states survive an optimizer step.

The loss and gradient norm are checked before the step; a finite gradient can still produce a
non-finite update (a huge learning rate overflows float32 inside AdamW's `lr / bias_correction`).
So the trainer keeps a copy of the adapter parameters and optimizer state from before each step —
the adapters are small next to the frozen base — checks them after the step, and puts the copy back
when anything became NaN/Inf. The state a checkpoint saves is therefore always finite.
"""
from __future__ import annotations

import copy

import torch


class StepSnapshot:
    """The optimizer's parameters (plain tensors or local-shard aliases) and its per-parameter state."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        with torch.no_grad():
            self.values = [p.detach().clone() for p in self.params]
        self.state = {i: _clone(optimizer.state[p]) for i, p in enumerate(self.params) if p in optimizer.state}

    def restore(self) -> None:
        """Put parameters and optimizer state back as they were (in place: aliases stay aliases)."""
        with torch.no_grad():
            for p, v in zip(self.params, self.values):
                p.copy_(v)
        for i, p in enumerate(self.params):
            if i not in self.state:
                self.optimizer.state.pop(p, None)  # the step created it: back to "never stepped"
                continue
            live, saved = self.optimizer.state[p], self.state[i]
            for key in list(live):
                if key not in saved:
                    del live[key]
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and isinstance(live.get(key), torch.Tensor) \
                        and live[key].shape == value.shape:
                    live[key].copy_(value)  # bitsandbytes shares some state tensors between params
                else:
                    live[key] = value


def _clone(state: dict) -> dict:
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in state.items()}


def all_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Whether every parameter and floating optimizer-state value is finite (0-dim bool, no sync).

    One max-|x| pass per tensor (NaN propagates through it): measured ~2x faster on the CPU than
    counting `~isfinite` elements, which takes three passes and a bool temporary."""
    norms = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            for t in (p.detach(), *(v for v in optimizer.state.get(p, {}).values()
                                    if isinstance(v, torch.Tensor) and v.is_floating_point())):
                if t.numel():
                    norms.append(torch.linalg.vector_norm(t, float("inf")).float().reshape(1))
    return torch.isfinite(torch.cat(norms)).all() if norms else torch.ones((), dtype=torch.bool)
