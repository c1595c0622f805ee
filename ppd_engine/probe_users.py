"""python -m ppd_engine.probe_users: can a small classifier tell users apart from their embeddings?

Paper Fig. 2: an MLP trained on frozen user embeddings identifies users far above chance (about
90% top-16 over 300 users). For every user with at least two stored few-shot embeddings, the last
`--test-per-user` embeddings are held out; an MLP is trained on the rest (features standardised
with training statistics) and top-1/4/16 accuracy on the held-out ones is reported beside chance
(k / number of users). With a `layers=all` store, each requested layer is probed separately.

Example:
  python -m ppd_engine.probe_users --store runs/users.safetensors --layers 0,8,16,-1 --out probe.json
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ppd_engine.cli.common import DefaultsFormatter, add_debug, add_progress, cli_errors
from ppd_engine.files import write_json_atomic

TOPK = (1, 4, 16)


@dataclass
class ProbeConfig:
    hidden: int = 256
    epochs: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-2
    dropout: float = 0.1
    test_per_user: int = 1
    seed: int = 0


def split_users(mapping: Mapping[str, torch.Tensor], test_per_user: int):
    """(train_x (N, T, D), train_y, test_x, test_y, users, skipped) holding out each user's last
    `test_per_user` embeddings; users without at least one training embedding are skipped."""
    users = [u for u in sorted(mapping) if mapping[u].shape[0] > test_per_user]
    skipped = len(mapping) - len(users)
    if len(users) < 2:
        raise ValueError(f"the probe needs >= 2 users with more than {test_per_user} embeddings each "
                         f"(found {len(users)}); embed with --chunks {test_per_user + 1} or more")
    tr_x, tr_y, te_x, te_y = [], [], [], []
    for label, u in enumerate(users):
        e = mapping[u].float()
        k = e.shape[0]
        tr_x.append(e[: k - test_per_user])
        te_x.append(e[k - test_per_user:])
        tr_y += [label] * (k - test_per_user)
        te_y += [label] * test_per_user
    return (torch.cat(tr_x), torch.tensor(tr_y), torch.cat(te_x), torch.tensor(te_y), users, skipped)


def train_probe(train_x: torch.Tensor, train_y: torch.Tensor, n_classes: int, cfg: ProbeConfig) -> nn.Module:
    """MLP classifier (standardisation folded in) fitted full-batch on (N, D) features."""
    g = torch.Generator().manual_seed(cfg.seed)
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False).clamp_min(1e-6)
    D = train_x.shape[1]
    torch.manual_seed(cfg.seed)
    mlp = nn.Sequential(nn.Linear(D, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, n_classes))
    opt = torch.optim.AdamW(mlp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x = (train_x - mean) / std
    mlp.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        loss = nn.functional.cross_entropy(mlp(x[perm]), train_y[perm])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    mlp.eval()
    return nn.Sequential(_Standardize(mean, std), mlp)


class _Standardize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x):
        return (x - self.mean) / self.std


def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, ks=TOPK) -> dict[int, float]:
    """Share of rows whose label is among the k highest logits, for each k (capped at #classes)."""
    out = {}
    for k in ks:
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices
        out[k] = (top == y[:, None]).any(1).float().mean().item()
    return out


def resolve_layers(spec: str | None, n_layers: int) -> list[int]:
    """Layer indices into a store's T_in axis: None/"all" = every one; else comma-separated ints
    (negative counts from the end)."""
    if spec is None or spec == "all":
        return list(range(n_layers))
    out = []
    for part in spec.split(","):
        try:
            i = int(part)
        except ValueError:
            raise ValueError(f"--layers must be 'all' or comma-separated integers, got {spec!r}") from None
        if not -n_layers <= i < n_layers:
            raise ValueError(f"--layers index {i} is out of range for a store with {n_layers} layer(s)")
        out.append(i % n_layers)
    return out


@torch.no_grad()
def _evaluate(model, x, y):
    return topk_accuracy(model(x), y)


def probe(mapping: Mapping[str, torch.Tensor], layers: str | None = None, cfg: ProbeConfig | None = None,
          progress: bool = True) -> dict:
    """Probe every requested layer of a user -> (K, T_in, D) mapping. Returns
    {"users", "train", "test", "skipped_users", "chance": {k: ...}, "layers": {layer: {k: acc}}}."""
    from tqdm.auto import tqdm

    cfg = cfg or ProbeConfig()
    tr_x, tr_y, te_x, te_y, users, skipped = split_users(mapping, cfg.test_per_user)
    n = len(users)
    result = {"users": n, "train": int(tr_x.shape[0]), "test": int(te_x.shape[0]), "skipped_users": skipped,
              "chance": {k: min(k, n) / n for k in TOPK}, "layers": {}}
    for layer in tqdm(resolve_layers(layers, tr_x.shape[1]), desc="probe", unit="layer", disable=not progress):
        with torch.enable_grad():
            model = train_probe(tr_x[:, layer], tr_y, n, cfg)
        result["layers"][layer] = _evaluate(model, te_x[:, layer], te_y)
    return result


def format_result(r: dict) -> str:
    head = f"{r['users']} users, {r['train']} train / {r['test']} held-out embeddings"
    if r["skipped_users"]:
        head += f" ({r['skipped_users']} users with too few embeddings skipped)"
    lines = [head, "| layer | " + " | ".join(f"top-{k}" for k in TOPK) + " |", "|---|" + "---|" * len(TOPK)]
    for layer, acc in r["layers"].items():
        lines.append(f"| {layer} | " + " | ".join(f"{acc[k]:.3f}" for k in TOPK) + " |")
    lines.append("| chance | " + " | ".join(f"{r['chance'][k]:.3f}" for k in TOPK) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ppd_engine.probe_users", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--store", required=True, help="user-embedding store (.safetensors from python -m ppd_engine.embed)")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layer indices of a layers=all store "
                                                   "(0 = embedding output, -1 = last layer)")
    p.add_argument("--test-per-user", type=int, default=1, help="held-out embeddings per user")
    p.add_argument("--hidden", type=int, default=256, help="MLP hidden width")
    p.add_argument("--epochs", type=int, default=300, help="full-batch training steps")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    p.add_argument("--out", default=None, help="write the results JSON here (atomically)")
    add_progress(p)
    add_debug(p)
    return p


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    from ppd_engine.embed.store import EmbeddingStore

    args = build_parser().parse_args(argv)
    store = EmbeddingStore(args.store)
    if not len(store):
        raise FileNotFoundError(f"{args.store} does not exist or holds no users")
    cfg = ProbeConfig(hidden=args.hidden, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                      test_per_user=args.test_per_user, seed=args.seed)
    result = probe(store.as_mapping(), args.layers, cfg, progress=args.progress)
    result["store"] = args.store
    if args.out:
        write_json_atomic(args.out, result)
    print(format_result(result))
    return result


if __name__ == "__main__":
    out = main()
    sys.exit(out if isinstance(out, int) else 0)
