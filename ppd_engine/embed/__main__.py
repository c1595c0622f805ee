"""python -m ppd_engine.embed: user embeddings from a VLM's chain-of-thought user profiles.

Example (real model, 8 GPUs; each rank embeds a disjoint set of users into shards of its own, and a
rerun after a kill resumes):
  torchrun --nproc-per-node 8 -m ppd_engine.embed --data /data/pickapic_v2 --split train \\
      --model llava-hf/llava-onevision-qwen2-7b-ov-hf --out runs/users --layers all --chunks 4 \\
      --batch-users 8 --compile --dtype bf16
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

from ppd_engine.cli.common import (
    DefaultsFormatter, UsageError, add_data, add_debug, add_device, add_dtype, add_progress, cli_errors, data_columns,
    device_dtype, resolve_device)


def build_parser() -> argparse.ArgumentParser:
    from .vlm import DEFAULT_MODEL, SMALL_MODEL

    p = argparse.ArgumentParser(
        prog="python -m ppd_engine.embed",
        description="Embed Pick-a-Pic users: for each user, a VLM reads N few-shot preference pairs, writes a "
                    "chain-of-thought user profile, and the hidden state(s) of its final generated token are "
                    "stored as the user's embedding. Rerunning with the same --out resumes.",
        formatter_class=DefaultsFormatter)
    add_data(p, "the pairs whose users are embedded", "train", "the split whose users are embedded")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"LLaVA-OneVision hub id or local folder (e.g. {SMALL_MODEL} on small machines)")
    p.add_argument("--out", required=True, help="store folder (ppd_engine.embed.store); appended to, one writer per rank")
    p.add_argument("--layers", choices=("last", "all"), default="last",
                   help="last: final-layer state (1, D); all: one state per layer incl. the embedding output "
                        "(num_layers + 1, D)")
    p.add_argument("--shots", type=int, default=4, help="preference pairs per prompt (paper: 4)")
    p.add_argument("--chunks", type=int, default=1,
                   help="embeddings per user (K): disjoint groups of --shots pairs; the first group is the "
                        "user's held-out few-shot split")
    p.add_argument("--max-users", type=int, default=None, help="only the users with the most pairs")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (paper: 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus truncation (paper: 1.0 = none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot split, chunking and sampling")
    p.add_argument("--batch-users", type=int, default=4, help="prompts (user chunks) decoded together")
    p.add_argument("--save-every", type=int, default=8,
                   help="batches between store writes (each write adds one shard; a crash loses at most this many "
                        "batches, which a rerun redoes)")
    p.add_argument("--compile", action="store_true",
                   help="static KV cache + torch.compile of the decode step (fastest on GPU; first batch compiles)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="generation budget per profile")
    p.add_argument("--template", default=None, help="prompt template file (default: the packaged profile_prompt.txt)")
    p.add_argument("--keep-without-profile", action="store_true",
                   help="store generations that have no 'User Profile' section (counted) instead of retrying them "
                        "and recording them as failed")
    p.add_argument("--retries", type=int, default=2,
                   help="new tries (other seeds) for a generation without a 'User Profile' section")
    add_device(p, "where the VLM runs")
    add_dtype(p, None, "VLM dtype")
    add_progress(p)
    add_debug(p)
    return p


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    from ppd_engine.data.pickapic import load_pairs

    from .generate import GenerationSettings, VLMGenerator
    from .pipeline import embed_users, plan
    from .prompt import ProfileTemplate
    from .store import EmbeddingStore
    from .vlm import load_vlm

    args = build_parser().parse_args(argv)
    for name, v in (("--shots", args.shots), ("--chunks", args.chunks), ("--batch-users", args.batch_users)):
        if v < 1:
            raise UsageError(f"{name} must be >= 1, got {v}")
    from ppd_engine.training.distributed import init_distributed, key_barrier

    # Under torchrun every rank embeds users[rank::world] into its own shards (writer r<rank>).
    env = init_distributed(resolve_device(args.device), "auto")
    device = str(env.device)
    dtype = device_dtype(args.dtype, device)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                                  temperature=args.temperature, top_p=args.top_p, compile=args.compile,
                                  layers=args.layers)
    template = ProfileTemplate(args.template)
    store = EmbeddingStore(args.out, writer=f"r{env.rank}")
    store.remove_uncommitted()   # what a killed run of this rank left half-written

    # The index only; the images of the few-shot pairs this rank embeds are read below.
    pairs = load_pairs(args.data, min_pairs_per_user=args.shots, max_users=args.max_users, split=args.split,
                       streaming=args.streaming,
                       columns=data_columns(args), load_images=False, progress=args.progress and env.is_main)
    shots, _ = pairs.few_shot_split(n_shots=args.shots, seed=args.seed)
    mine = sorted(shots)[env.rank::env.world_size]
    by_user = pairs.by_user()
    items, plan_stats = plan({u: by_user[u] for u in mine}, {u: shots[u] for u in mine}, args.shots, args.chunks,
                             args.seed, store)
    print(f"rank {env.rank}/{env.world_size}: {len(mine)} of {len(shots)} users with >= {args.shots} pairs; "
          f"{len(items)} chunk(s) to embed ({plan_stats['users_already_done']} users already in {args.out})")
    stats = {"users_with_shots": len(shots), "users_this_rank": len(mine), **plan_stats, "data": pairs.stats}
    if items:
        with tempfile.TemporaryDirectory(prefix="ppd-embed-") as tmp:
            # The shots' bytes, read in one pass over the data into a local file (not RAM: ~10 MB a
            # user with 4 chunks); each batch then reads its own from there.
            staged = pairs.stage_images([r for it in items for r in it.shots], os.path.join(tmp, "shots.arrow"))
            located = iter(staged.records)
            for it in items:
                it.shots = [next(located) for _ in it.shots]

            def with_images(batch):
                filled = iter(staged.with_images([r for it in batch for r in it.shots]))
                return [dataclasses.replace(it, shots=[next(filled) for _ in it.shots]) for it in batch]

            model, processor = load_vlm(args.model, device=device, dtype=dtype)
            generator = VLMGenerator(model, processor, settings)
            t0 = time.perf_counter()
            stats.update(embed_users(items, generator, template, store, batch_users=args.batch_users,
                                     seed=args.seed, model_id=args.model, save_every=args.save_every,
                                     progress=args.progress, require_profile=not args.keep_without_profile,
                                     retries=args.retries, images=with_images))
            stats["wall_seconds"] = time.perf_counter() - t0
    key_barrier(env, "embed")()   # ranks finish hours apart: wait on store keys, not a timed collective
    print(summary(stats, EmbeddingStore(args.out), args))
    if env.initialized_here:
        import torch.distributed as dist

        dist.destroy_process_group()
    return stats


def summary(stats: dict, store, args) -> str:
    lines = [f"store {store.path}: {len(store)} users, embedding shape (T_in, Du) = {store.shape}"]
    if "chunks_embedded" in stats:
        lines.append(f"embedded {stats['chunks_embedded']} chunk(s) of {stats['users_embedded']} user(s) in "
                     f"{stats['wall_seconds']:.1f} s; {stats['tokens_generated']} tokens generated, "
                     f"{stats['tokens_per_s']:.1f} tokens/s, {stats['chunks_per_s']:.3f} chunks/s "
                     f"({'compiled' if args.compile else 'eager'}, batch {args.batch_users})")
        if stats["without_profile"]:
            lines.append(f"{stats['without_profile']} generation(s) have no 'User Profile' section "
                         "(the prompted baseline gets the bare caption for them)")
        if stats["chunks_bad_images"]:
            lines.append(f"skipped {stats['chunks_bad_images']} chunk(s) with undecodable images")
        if stats["chunks_no_profile"] or stats["chunks_retried"]:
            lines.append(f"{stats['chunks_retried']} generation(s) retried, {stats['chunks_no_profile']} chunk(s) "
                         "failed: no 'User Profile' section in the generation")
    lines.append("data: " + json.dumps({k: v for k, v in stats["data"].items() if v}, sort_keys=True))
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    import torch

    torch.set_grad_enabled(False)
    out = main()
    sys.exit(out if isinstance(out, int) else 0)
