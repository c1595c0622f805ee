"""Process groups and the two ways of holding the trainable adapters across ranks.

The frozen base is replicated on every rank: sharding it would all-gather the whole UNet for each of
the forward passes of a step just to train a small adapter. Only the adapters are distributed:

- ``shard``: FSDP2 ``fully_shard`` on the modules that own adapter parameters. Parameters,
  gradients and optimizer state live as dim-0 shards (DTensors); FSDP all-gathers a module's
  weights before its forward and reduce-scatters its gradients in backward.
- ``replicate``: every rank holds the full adapters and its own optimizer copy; gradients are
  averaged with one flat all-reduce per step (DDP without the bucketing machinery, because a
  step's gradient is all-reduced once after gradient accumulation).

docs/DISTRIBUTED.md has the measurement that picks the default.
"""

from __future__ import annotations

import contextlib
import collections
import datetime
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


EXIT_PEER_LOST = 4  # the exit status of a rank ended by the heartbeat watchdog


class Heartbeat:
    """Each rank bumps a counter in the process group's store every `timeout_s / 6` seconds and
    watches its peers' counters; when a peer's counter has not moved for `timeout_s` (a stopped or
    hung process — a dead one also breaks the collectives themselves), this rank prints one line
    naming it and exits with EXIT_PEER_LOST instead of waiting out the collective timeout.

    Counters, not clocks: each rank measures silence on its own monotonic clock, so clock skew
    between hosts does not matter. The store ops run in one thread and the check in another, so a
    store that stops answering (its host stopped) is caught as well. `stop()` marks this rank done:
    peers stop watching a rank that finished (e.g. while rank 0 evaluates alone)."""

    def __init__(self, store, rank: int, world_size: int, timeout_s: float):
        import threading

        self.store, self.rank, self.timeout_s = store, rank, timeout_s
        self.peers = [r for r in range(world_size) if r != rank]
        now = time.monotonic()
        self._seen = {r: (-1, now) for r in self.peers}
        self._round_done = now
        self._done: set[int] = set()
        self._stop = threading.Event()
        self._interval = max(0.2, timeout_s / 6)
        for target in (self._beat, self._watch):
            threading.Thread(target=target, name=f"ppd-heartbeat-{target.__name__}", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.add(f"ppd_heartbeat/{self.rank}", 1)
                now = time.monotonic()
                for r in self.peers:
                    if r in self._done:
                        continue
                    if self.store.check([f"ppd_heartbeat_done/{r}"]):
                        self._done.add(r)
                        continue
                    count = self.store.add(f"ppd_heartbeat/{r}", 0)
                    if count != self._seen[r][0]:
                        self._seen[r] = (count, now)
                self._round_done = time.monotonic()
            except Exception:  # noqa: BLE001  the store's host is gone: the collectives fail by themselves
                self._stop.set()
                return
            self._stop.wait(self._interval)

    def _watch(self) -> None:
        while not self._stop.wait(self._interval / 2):
            now = time.monotonic()
            if now - self._round_done > self.timeout_s:
                self._lost(f"the process group's store (MASTER_ADDR) has not answered a heartbeat for "
                           f"{now - self._round_done:.0f} s")
            for r, (_, seen) in self._seen.items():
                if r not in self._done and now - seen > self.timeout_s:
                    self._lost(f"rank {r} has sent no heartbeat for {now - seen:.0f} s (stopped or hung)")

    def _lost(self, why: str) -> None:
        if self._stop.is_set():
            return
        print(f"error: {why}; ending rank {self.rank} now rather than at the collective timeout "
              "(dist.heartbeat_s / dist.timeout_s); continue with --resume RUN", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(Exception):  # the store's host is gone: nobody left to tell
            self.store.set(f"ppd_heartbeat_done/{self.rank}", "1")


_heartbeat: Heartbeat | None = None


def shutdown_distributed(env: DistEnv) -> None:
    """Stop this rank's heartbeat (peers stop watching it) and leave a process group joined here."""
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop()
        _heartbeat = None
    if env.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 600,
                     heartbeat_s: float = 60.0) -> DistEnv:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU).

    `device`: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu", "cuda" or "cuda:N".
    A process group that already exists (e.g. a test harness made it) is reused. A group created
    here gets a Heartbeat watchdog of `heartbeat_s` seconds (0 = none).
    """
    global _heartbeat
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    created = False
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    elif world > 1:
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if backend == "nccl" and dev.type != "cuda":
            raise ValueError("dist.backend=nccl needs a CUDA device (train.device); use gloo on CPU")
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        created = True
        if heartbeat_s > 0:
            _heartbeat = Heartbeat(dist.distributed_c10d._get_default_store(), rank, world, heartbeat_s)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, initialized_here=created)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def wait_for_main(env: DistEnv, name: str) -> None:
    """A barrier for rank 0's long solo work (e.g. building the latent cache: hours), which the
    collective timeout (minutes) must not cut short. The other ranks wait on a store key with no
    deadline; the heartbeat still ends them if rank 0 stops answering."""
    if not env.distributed:
        return
    store = dist.distributed_c10d._get_default_store()
    key = f"ppd_main_done/{name}"
    if env.is_main:
        store.set(key, "1")
    else:
        store.wait([key], datetime.timedelta(days=7))
    dist.barrier()


def key_barrier(env: DistEnv, name: str):
    """A barrier callable for work every rank does at its own pace (each rank's slice of the latent
    cache): each call waits until all ranks reached it, on store keys with no collective deadline
    (the heartbeat still ends the ranks if a peer stops answering): an all_gather_str of nothing,
    whose call count keeps successive barriers apart."""

    def wait() -> None:
        all_gather_str("", env, f"barrier/{name}")

    return wait


_GATHERS: collections.Counter = collections.Counter()


def all_gather_str(text: str, env: DistEnv, name: str) -> list[str]:
    """Every rank's `text`, in rank order, through the c10d store (no collective on the device, so it
    works before and beside NCCL). Every rank calls it in the same order, like a collective; `name`
    and a per-name call count keep the exchanges apart."""
    if not env.distributed:
        return [text]
    store = dist.distributed_c10d._get_default_store()
    _GATHERS[name] += 1
    keys = [f"ppd_gather/{name}/{_GATHERS[name]}/{r}" for r in range(env.world_size)]
    store.set(keys[env.rank], text)
    store.wait(keys, datetime.timedelta(days=7))
    return [store.get(k).decode("utf-8") for k in keys]


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks (in place, returned); identity on one process."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_str(text: str, env: DistEnv) -> str:
    """Rank 0's string on every rank (sent as UTF-8 bytes in a tensor; no pickling)."""
    if not env.distributed:
        return text
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8, device=env.device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=env.device)
    dist.broadcast(size, src=0)
    buf = data if env.is_main else torch.empty(int(size.item()), dtype=torch.uint8, device=env.device)
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist()).decode("utf-8")


def local(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor this rank holds: a DTensor's local shard, or the tensor itself."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def adapter_groups(root: nn.Module, params: list[nn.Parameter]) -> list[nn.Module]:
    """The highest submodules of `root` made only of trainable adapter parameters.

    FSDP2 shards whole modules; wrapping only these keeps the frozen base out of every FSDP group.
    Raises if an adapter parameter shares a module with frozen weights (FSDP would shard those too).
    """
    wanted = {id(p) for p in params}
    groups: list[nn.Module] = []

    def visit(mod: nn.Module) -> None:
        ps = list(mod.parameters())
        if mod is not root and ps and all(id(p) in wanted for p in ps):
            groups.append(mod)
            return
        for child in mod.children():
            visit(child)

    visit(root)
    covered = {id(p) for g in groups for p in g.parameters()}
    if covered != wanted:
        raise ValueError("some adapter parameters share a module with frozen base weights; "
                         "they cannot be sharded without sharding the base (use dist.adapters=replicate)")
    return groups


def shard_adapters(root: nn.Module, params: list[nn.Parameter], env: DistEnv) -> list[nn.Module]:
    """Apply FSDP2 `fully_shard` to the adapter modules of `root` (a 1-D mesh over all ranks).

    Returns the sharded modules. Afterwards the adapter parameters are DTensors sharded on dim 0;
    fp32 params and fp32 gradient reduction (no MixedPrecisionPolicy: autocast does the bf16 compute).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    groups = adapter_groups(root, params)
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for mod in groups:
        fully_shard(mod, mesh=mesh, reshard_after_forward=True)
    return groups


class ReplicatedGradSync:
    """Average gradients of replicated parameters over ranks with one flat all-reduce."""

    def __init__(self, params: list[nn.Parameter], env: DistEnv):
        self.params = params
        self.env = env

    def __call__(self) -> None:
        if not self.env.distributed:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.env.world_size)
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n


class LocalShardParams:
    """Plain-tensor views of each (possibly DTensor) parameter's local shard, for the optimizer.

    bitsandbytes' 8-bit AdamW calls fused kernels on raw tensors and fails on FSDP2's DTensors
    ("got mixed torch.Tensor and DTensor"). Elementwise optimizers give the same result when they
    step each rank's local shard, so the optimizer is handed these aliases of the shards' storage:
    an update written through the alias is the update of the DTensor. `attach_grads()` points the
    aliases' `.grad` at the local shards of the DTensor gradients before each step.
    """

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.views: list[nn.Parameter] = []
        for p in params:
            shard = local(p.data)
            # _make_subclass aliases the shard's storage (no copy), so in-place optimizer updates land
            # in FSDP's sharded parameter.
            view = nn.Parameter(shard, requires_grad=True)
            if view.data_ptr() != shard.data_ptr():
                raise RuntimeError("local shard view does not alias the parameter storage")
            self.views.append(view)

    def attach_grads(self) -> None:
        for p, v in zip(self.params, self.views):
            shard = local(p.data)
            if v.data_ptr() != shard.data_ptr():
                # FSDP re-allocated the shard: re-alias it (the optimizer state is keyed by `v`, kept).
                v.data = shard
            v.grad = None if p.grad is None else local(p.grad)

    def detach_grads(self) -> None:
        for v in self.views:
            v.grad = None


def local_grad_sq_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """Sum of squared gradient entries this rank holds (float64; 0-dim tensor).

    float64 because a sharded run sums the same squares in another order (per shard, then over
    ranks) than a single process: in fp32 the two norms, and so the clipping factor, differed in
    the last bits and the runs drifted apart; fp32 squares are exact in float64."""
    total = torch.zeros((), dtype=torch.float64, device=params[0].device if params else "cpu")
    for p in params:
        if p.grad is not None:
            g = local(p.grad)
            total = total + g.double().pow(2).sum().to(total.device)
    return total


def global_grad_norm(params: list[nn.Parameter], env: DistEnv, sharded: bool) -> torch.Tensor:
    """L2 norm of the full gradient: shards' squared norms summed over ranks; replicas are identical."""
    sq = local_grad_sq_norm(params)
    if sharded and env.distributed:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    return sq.sqrt()


def scale_grads_(params: list[nn.Parameter], factor: float) -> None:
    for p in params:
        if p.grad is not None:
            local(p.grad).mul_(factor)
