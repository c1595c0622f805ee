"""python -m ppd_engine.judge: predict which image a user prefers, with order consistency.

Modes:
  agreement  on held-out labelled Pick-a-Pic pairs: how often the judge's consistent answers agree
             with the user's real choice (paper: 83% with GPT-4o-mini).
  winrate    between two sets of images per user listed in a JSONL manifest, one line per pair:
             {"user_id": ..., "caption": ..., "image_a": PATH, "image_b": PATH} (paths relative to
             the manifest's folder).

Examples:
  PPD_JUDGE_API_KEY=... python -m ppd_engine.judge agreement --data /data/pickapic_v2 --split validation \\
      --judge http --judge-model gpt-4o-mini --max-users 100 --out judge_agreement.json
  python -m ppd_engine.judge winrate --data /data/pickapic_v2 --manifest eval/pairs.jsonl \\
      --judge local --judge-model llava-hf/llava-onevision-qwen2-7b-ov-hf --judge-dtype bf16

The judge's flags (--judge, --judge-model, --judge-shots, ...) are the same in `ppd eval`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile

from ppd_engine.cli.common import (
    DefaultsFormatter, UsageError, add_data, add_debug, add_device, add_judge, add_progress, cli_errors, data_columns,
    make_judge_backend, resolve_device)
from ppd_engine.files import write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ppd_engine.judge", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("mode", choices=("agreement", "winrate"), help="see the module docstring / README")
    add_data(p, "the pairs holding each user's few-shot pairs", None)
    p.add_argument("--manifest", default=None, help="winrate: JSONL of {user_id, caption, image_a, image_b}")
    p.add_argument("--max-users", type=int, default=None, help="agreement: only the users with the most pairs")
    p.add_argument("--queries-per-user", type=int, default=4, help="agreement: held-out pairs judged per user")
    add_judge(p, required=True)
    add_device(p, "local judge: where the VLM runs")
    p.add_argument("--out", default=None, help="write the results JSON here (atomically)")
    add_progress(p)
    add_debug(p)
    return p


def _filled_by_user(pairs, records_of: dict[str, list]):
    """(user, {id(record): the record with its image bytes}) for each user of `records_of`, in
    order. The bytes of all of them are first staged in one pass over the data into a local file
    (PickAPicPairs.stage_images), so memory holds one user's images, and no row group is read twice."""
    recs = [r for u in records_of for r in records_of[u]]
    with tempfile.TemporaryDirectory(prefix="ppd-judge-") as tmp:
        staged = pairs.stage_images(recs, os.path.join(tmp, "pairs.arrow"))
        at = {id(r): s for r, s in zip(recs, staged.records)}
        for user, rs in records_of.items():
            yield user, {id(r): f for r, f in zip(rs, staged.with_images([at[id(r)] for r in rs]))}


def run_agreement(judge, pairs, args) -> dict:
    from tqdm.auto import tqdm

    shots, _ = pairs.few_shot_split(n_shots=args.judge_shots, seed=args.judge_seed)
    by_user = pairs.by_user()
    rng = random.Random(args.judge_seed)
    queries: dict[str, list] = {}  # user -> [(held-out record, winner shown as A)]
    for user in sorted(shots):
        held = {id(r) for r in shots[user]}
        rest = [r for r in by_user[user] if id(r) not in held]
        for r in rng.sample(rest, min(args.queries_per_user, len(rest))):
            # the winner's position is random, so position bias cannot score
            queries.setdefault(user, []).append((r, rng.random() < 0.5))
    totals = {"queries": 0, "consistent": 0, "dropped": 0, "correct": 0, "skipped_bad_images": 0}
    per_user: dict[str, dict] = {}
    needed = {u: [*shots[u], *(r for r, _ in qs)] for u, qs in queries.items()}
    with tqdm(total=sum(map(len, queries.values())), desc="judge", unit="pair", disable=not args.progress) as bar:
        for user, filled in _filled_by_user(pairs, needed):
            sh = [filled[id(r)] for r in shots[user]]
            for r, a_wins in queries[user]:
                bar.update(1)
                f = filled[id(r)]
                a, b = (f.image_w, f.image_l) if a_wins else (f.image_l, f.image_w)
                try:
                    res = judge.compare(sh, a, b, r.caption)
                except ValueError as e:  # undecodable image in this query or its shots: skip it, keep going
                    logging.warning("skipping a query of user %s: %s", user, e)
                    totals["skipped_bad_images"] += 1
                    continue
                u = per_user.setdefault(user, {"queries": 0, "consistent": 0, "correct": 0})
                for d in (totals, u):
                    d["queries"] += 1
                    if res.consistent:
                        d["consistent"] += 1
                        d["correct"] += int((res.choice == 0) == a_wins)
                totals["dropped"] += int(not res.consistent)
    totals["agreement"] = totals["correct"] / totals["consistent"] if totals["consistent"] else None
    return {"mode": "agreement", **totals, "users": len(per_user), "per_user": per_user}


def run_winrate(judge, pairs, args) -> dict:
    from tqdm.auto import tqdm

    from ppd_engine.embed.prompt import as_pil

    if not args.manifest:
        raise UsageError("winrate needs --manifest FILE.jsonl")
    root = os.path.dirname(os.path.abspath(args.manifest))
    rows, bad = [], 0
    with open(args.manifest, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((str(row["user_id"]), row["caption"], row["image_a"], row["image_b"]))
            except (ValueError, KeyError) as e:
                bad += 1
                logging.warning("%s line %d skipped (need user_id, caption, image_a, image_b): %s", args.manifest, n, e)
    shots, _ = pairs.few_shot_split(n_shots=args.judge_shots, seed=args.judge_seed)
    per_user: dict[str, dict] = {}
    totals = {"wins_a": 0, "wins_b": 0, "dropped": 0, "skipped_no_shots": 0, "skipped_bad_rows": bad}
    rows_of: dict[str, list] = {}
    for row in rows:
        if row[0] in shots:
            rows_of.setdefault(row[0], []).append(row)
        else:
            totals["skipped_no_shots"] += 1
    with tqdm(total=sum(map(len, rows_of.values())), desc="judge", unit="pair", disable=not args.progress) as bar:
        for user, filled in _filled_by_user(pairs, {u: shots[u] for u in rows_of}):
            sh = [filled[id(r)] for r in shots[user]]
            for _, caption, pa, pb in rows_of[user]:
                bar.update(1)
                try:
                    a, b = (as_pil(_read(os.path.join(root, x)), x) for x in (pa, pb))
                except (OSError, ValueError) as e:
                    logging.warning("skipping a pair of user %s: %s", user, e)
                    totals["skipped_bad_rows"] += 1
                    continue
                wr = judge.winrate(sh, [a], [b], [caption])
                u = per_user.setdefault(user, {"wins_a": 0, "wins_b": 0, "dropped": 0})
                for d in (totals, u):
                    d["wins_a"] += wr.wins_a
                    d["wins_b"] += wr.wins_b
                    d["dropped"] += wr.dropped
    judged = totals["wins_a"] + totals["wins_b"]
    totals["win_rate_a"] = totals["wins_a"] / judged if judged else None
    return {"mode": "winrate", **totals, "users": len(per_user), "per_user": per_user}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    from ppd_engine.data.pickapic import load_pairs

    from .core import Judge

    args = build_parser().parse_args(argv)
    # The index only: the bytes of the pairs judged and their users' shots are staged when needed.
    pairs = load_pairs(args.data, min_pairs_per_user=args.judge_shots, max_users=args.max_users,
                       load_images=False, split=args.split, streaming=args.streaming,
                       columns=data_columns(args), progress=args.progress)
    backend = make_judge_backend(args, resolve_device(args.device) if args.judge == "local" else "cpu")
    judge = Judge(backend, template=args.judge_template, seed=args.judge_seed)
    result = run_agreement(judge, pairs, args) if args.mode == "agreement" else run_winrate(judge, pairs, args)
    result.update(backend=args.judge, model=args.judge_model, prompt_sha256=judge.template.sha256,
                  temperature=args.judge_temperature, top_p=args.judge_top_p, seed=args.judge_seed)
    if hasattr(backend, "stats"):
        result["http"] = dict(backend.stats)
    if args.out:
        write_json_atomic(args.out, result)
    print(summary(result))
    return result


def summary(r: dict) -> str:
    if r["mode"] == "agreement":
        agr = "n/a" if r["agreement"] is None else f"{r['agreement']:.3f}"
        return (f"agreement {agr} over {r['consistent']} consistent judgements of {r['queries']} pairs "
                f"({r['users']} users); dropped {r['dropped']} inconsistent/malformed, skipped "
                f"{r.get('skipped_bad_images', 0)} with an undecodable image")
    wr = "n/a" if r["win_rate_a"] is None else f"{r['win_rate_a']:.3f}"
    return (f"win rate of A {wr}: A {r['wins_a']} / B {r['wins_b']} over {r['users']} users; dropped "
            f"{r['dropped']} inconsistent/malformed, skipped {r['skipped_no_shots']} (user without shots) + "
            f"{r['skipped_bad_rows']} (bad rows)")


if __name__ == "__main__":
    out = main()
    sys.exit(out if isinstance(out, int) else 0)
