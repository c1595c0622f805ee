"""The training input pipeline: a torch DataLoader that reads each step's micro-batches ahead of the step.

One loader item is one step of this rank: the micro-batches of `rank_slots`, each collated on the
CPU from the dataset items `DataOrder.step_indices(step)` names. Because the item is a pure function
of the step (the order and the per-epoch flips derive from the seed), workers may read ahead in any
interleaving and a resumed run starts the loader at its step: the batches, and so the training, are
bitwise those of an uninterrupted run. Workers read the memory-mapped cache in parallel with the
step; on CUDA the batches come in pinned memory and are copied without blocking.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset

from ppd_engine.training.data_order import DataOrder
from ppd_engine.training.step import collate

_CPU = torch.device("cpu")


@runtime_checkable
class EpochAware(Protocol):
    """A dataset whose items depend on the epoch (e.g. the latent cache's per-epoch random flips)."""

    def set_epoch(self, epoch: int) -> None: ...


class _Steps(Dataset):
    """step -> this rank's micro-batches of that step, collated on the CPU."""

    def __init__(self, dataset, order: DataOrder, slots: list[list[int]]):
        self.dataset, self.order, self.slots = dataset, order, slots

    def __len__(self) -> int:
        return 1 << 62   # indexed by global step; the sampler says which steps are read

    def __getitem__(self, step: int) -> list[dict]:
        if isinstance(self.dataset, EpochAware):  # set in whichever process reads the step
            self.dataset.set_epoch(self.order.cursor(step)["epoch"])
        indices = self.order.step_indices(step)
        return [collate([self.dataset[indices[s]] for s in slot], _CPU) for slot in self.slots]


def _as_is(item):
    return item


class StepLoader:
    """`batches(step)`: the micro-batches of `step` on `device`, read by `workers` processes ahead
    of time (`prefetch` steps each). Asking for a step other than the next one restarts the loader there."""

    def __init__(self, dataset, order: DataOrder, slots: list[list[int]], total_steps: int, device: torch.device,
                 workers: int = 0, prefetch: int = 2):
        if workers < 0 or prefetch < 1:
            raise ValueError(f"data.workers must be >= 0 and data.prefetch >= 1; got {workers}, {prefetch}")
        self.steps = _Steps(dataset, order, slots)
        self.total, self.device = total_steps, device
        self.workers, self.prefetch = workers, prefetch
        self._it = None
        self._next = None

    def _start(self, step: int) -> None:
        self.close()
        loader = DataLoader(self.steps, sampler=range(step, self.total), batch_size=None, collate_fn=_as_is,
                            num_workers=self.workers, prefetch_factor=self.prefetch if self.workers else None,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        self._it, self._next = iter(loader), step

    def batches(self, step: int) -> list[dict]:
        if self._it is None or step != self._next or step >= self.total:
            if step >= self.total:   # a caller stepping past the planned end (tests, extra steps)
                self.total = step + 1
            self._start(step)
        out = next(self._it)
        self._next = step + 1
        non_blocking = self.device.type == "cuda"
        return [{k: v.to(self.device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in b.items()}
                for b in out]

    def close(self) -> None:
        """Stop the workers (they also stop when the loader is garbage collected)."""
        self._it = None
        self._next = None
