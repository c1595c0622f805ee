"""`python -m ppd_engine.eval {generate,score,run,sweep}`: PPD evaluation from the command line.

  generate  sample every checkpoint for every user on a prompt set (same seeds) -> OUT/<ckpt>/<user>/<i>.png
  score     score OUT's images with reward models (and optionally a VLM judge) -> results.json, report.md
  run       generate, then score
  sweep     pick the best-β run by its mean validation reward -> sweep.json, sweep.md
"""

from __future__ import annotations

import argparse
import sys

from ppd_engine.cli.common import (
    DefaultsFormatter, UsageError, add_checkpoint, add_debug, add_device, add_judge, add_progress, cli_errors,
    make_judge_backend, resolve_device)

from .reward_args import add_reward_args, load_named_reward, reward_names


def _generation_args(p: argparse.ArgumentParser, checkpoints: bool = True) -> None:
    g = p.add_argument_group("generation")
    if checkpoints:
        g.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR",
                       help="a training run folder to evaluate, optionally named; repeat for each run "
                            "(e.g. --run ppd=runs/ppd --run dpo=runs/dpo). NAME=base is the frozen base "
                            "without adapters (same prompts, seeds, scheduler, guidance); every run's win "
                            "rate is against it. Otherwise the first listed is 'first' in win rates. A "
                            "run's kind (ppd | dpo | sft) is read from its config.yaml and state.json")
        add_checkpoint(g)
        g.add_argument("--base-config", default=None,
                       help="config.yaml the base model of NAME=base is built from (default: the first "
                            "listed run's)")
        g.add_argument("--caption-profile", action="append", default=[], metavar="NAME",
                       help="sample checkpoint NAME with the user's parsed 'User Profile' appended to every "
                            "caption, cut to the text encoder's token limit (the prompted-base baseline: "
                            "--run prompted=base --caption-profile prompted); repeatable")
        g.add_argument("--no-user", action="append", default=[], metavar="NAME",
                       help="a checkpoint trained non-personalized (the Diffusion-DPO baseline): "
                            "sample it with the zero user embedding it was trained with; repeatable. "
                            "Runs whose checkpoint records personalized=false are detected without it")
    g.add_argument("--store", required=True,
                   help="user-embedding store (.safetensors written by python -m ppd_engine.embed)")
    g.add_argument("--users", nargs="+", default=None, metavar="USER",
                   help="seen | unseen | all (by the role a run's users.json or the store records) or "
                        "user ids (default: all)")
    g.add_argument("--num-users", type=int, default=None,
                   help="evaluate the first N of the selected users (default: all)")
    g.add_argument("--embed-index", type=int, default=0,
                   help="which of a user's K stored few-shot embeddings conditions sampling (default 0)")
    g.add_argument("--prompts", default="parti",
                   help="'parti' (PartiPrompts, 1632, shipped), 'pickapic' (validation_unique captions, "
                        "needs --pickapic-dir), or a .tsv (Prompt column) / .txt (one per line) file")
    g.add_argument("--pickapic-dir", default=None,
                   help="Pick-a-Pic's captions: a folder of parquet files (files under a 'validation_unique' "
                        "path are used when present), or a `datasets` folder, hub id or URL (its "
                        "validation_unique split)")
    g.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of prompt i is SEED + i, for every checkpoint and user (default 0)")
    g.add_argument("--gen-batch-size", type=int, default=4, help="images per sampler call (default 4)")
    g.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    g.add_argument("--guidance", type=float, default=5.0, help="text classifier-free guidance (default 5)")
    g.add_argument("--user-guidance", type=float, default=0.0,
                   help="extra guidance over the user embedding (default 0 = off)")
    g.add_argument("--user-scale", type=float, default=1.0,
                   help="multiplies the user branch's trained strength (adapters.scale): 1 = as trained (default 1)")


def _synthetic_users_arg(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--synthetic-users", required=required, default=None, metavar="synthetic_users.json",
                   help="the users file `python -m ppd_engine.rewards_users relabel` wrote: adds each user's "
                        "own reward ('own': its weighted standardised reward, from the --rewards it weighs)")


def _judge_args(p: argparse.ArgumentParser, with_store: bool) -> None:
    g = add_judge(p, required=False)
    g.add_argument("--judge-data", default=None,
                   help="Pick-a-Pic parquet folder holding the users' few-shot pairs shown to the judge")
    g.add_argument("--judge-split", default=None, help="only --judge-data files named SPLIT-*.parquet")
    if with_store:
        g.add_argument("--store", default=None,
                       help="user-embedding store: the judge is shown the pairs recorded as the shots "
                            "of the embedding used for sampling")


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (images, manifest.json, results.json, report.md)")
    add_device(p, "device for sampling and scoring")
    add_progress(p)
    add_debug(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ppd_engine.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", formatter_class=DefaultsFormatter, help="sample every checkpoint for every user (same seeds)")
    _common_args(gen)
    _generation_args(gen)
    sc = sub.add_parser("score", formatter_class=DefaultsFormatter, help="score OUT's images: reward models, VLM judge, report")
    _common_args(sc)
    add_reward_args(sc)
    _judge_args(sc, with_store=True)
    run = sub.add_parser("run", formatter_class=DefaultsFormatter, help="generate, then score")
    _common_args(run)
    _generation_args(run)
    add_reward_args(run)
    _judge_args(run, with_store=False)
    for sp in (sc, run):
        _synthetic_users_arg(sp)
    ip = sub.add_parser("interpolate", formatter_class=DefaultsFormatter,
                        help="sample e = (1-λ) e_A + λ e_B over a λ grid; own rewards of A and B, Spearman ρ")
    _common_args(ip)
    ip.add_argument("--run", required=True, metavar="NAME=RUN_DIR", help="the personalized run to interpolate with")
    add_checkpoint(ip)
    ip.add_argument("--between", required=True, nargs=2, metavar=("USER_A", "USER_B"), help="the two users")
    ip.add_argument("--lambdas", default="0,0.25,0.5,0.75,1", help="comma-separated λ grid")
    _generation_args(ip, checkpoints=False)
    add_reward_args(ip)
    _synthetic_users_arg(ip, required=True)
    sw = sub.add_parser("sweep", formatter_class=DefaultsFormatter, help="pick the best-β run by its mean validation reward")
    _common_args(sw)
    sw.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR",
                    help="run folders trained with different β (β read from each config.yaml)")
    _generation_args(sw, checkpoints=False)
    add_reward_args(sw, single=True)
    return parser


def _score_all(args, out: str, manifest: dict) -> dict:
    from .evaluate import release_memory, score_images

    scores = {}
    for name in reward_names(args):
        reward = load_named_reward(args, name)
        scores[name] = score_images(out, manifest, reward, progress=args.progress)
        del reward
        release_memory()
    return scores


def _generate(args, checkpoints) -> dict:
    from ppd_engine.embed.store import EmbeddingStore

    from .evaluate import clip_tokenizer, run_generation
    from .prompts import load_prompts
    from .users import ProfileCaptions, check_unseen_embeddings, select_users, user_roles

    prompt_set = load_prompts(args.prompts, args.limit, args.pickapic_dir)
    store = EmbeddingStore(args.store)
    roles, source = user_roles([c.run_dir for c in checkpoints if not c.is_base], store)
    users = select_users(store.users(), args.users, args.num_users, roles)
    check_unseen_embeddings(users, roles, store, args.embed_index)
    n_unseen = sum(roles.get(u, {}).get("role") == "unseen" for u in users)
    print(f"{len(prompt_set.prompts)} prompts ({prompt_set.name}), {len(users)} users "
          f"({n_unseen} unseen{', roles from ' + source if source else ', no roles recorded'}), "
          f"{len(checkpoints)} checkpoints -> {args.out}")
    return run_generation(checkpoints, prompt_set, users, store, args.out, seed=args.seed,
                          batch_size=args.gen_batch_size, embed_index=args.embed_index,
                          device=resolve_device(args.device), progress=args.progress, steps=args.steps,
                          guidance=args.guidance, user_guidance=args.user_guidance,
                          user_scale=args.user_scale, base_config=getattr(args, "base_config", None),
                          roles=roles, profile_captions=lambda cfg: ProfileCaptions(
                              clip_tokenizer(cfg), store, args.embed_index))


def _print_summary(results: dict, out: str) -> None:
    ckpts = list(results["checkpoints"])
    for reward, r in results["rewards"].items():
        means = ", ".join(f"{c} {r['mean'][c]:.4f}" for c in ckpts)
        wins = ", ".join(f"{k.replace('_vs_', ' vs ')} {v['overall']:.3f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"
                         for k, v in r["win_rates"].items())
        print(f"{reward}: mean {means}" + (f"; win rate {wins}" if wins else ""))
    for pair, j in (results.get("judge") or {}).items():
        print(f"judge {pair.replace('_vs_', ' vs ')}: win rate {j['win_rate']:.3f} "
              f"({j['kept']} kept, {j['dropped']} dropped as order-inconsistent)")
    print(f"wrote {out}/results.json and {out}/report.md")


def _run_judge(args, manifest: dict) -> dict:
    from .evaluate import judge_images
    from ppd_engine.judge import Judge

    from .judging import load_judge_shots, make_judge_fn

    if not args.judge_data:
        raise UsageError("--judge needs --judge-data (the Pick-a-Pic folder with the users' few-shot pairs)")
    store = None
    if args.store:
        from ppd_engine.embed.store import EmbeddingStore

        store = EmbeddingStore(args.store)
    shots = load_judge_shots(args.judge_data, manifest["users"], store,
                             manifest.get("sampler", {}).get("embed_index", 0), args.judge_shots,
                             args.judge_seed, args.judge_split, progress=args.progress)
    judge = Judge(make_judge_backend(args, resolve_device(args.device)), template=args.judge_template,
                  seed=args.judge_seed)
    return judge_images(args.out, manifest, make_judge_fn(judge, shots, args.judge_batch),
                        progress=args.progress)


def _score(args) -> dict:
    from .evaluate import read_manifest, write_results

    manifest = read_manifest(args.out)
    scores = _add_own_reward(args, _score_all(args, args.out, manifest), manifest["users"])
    judge = None
    if args.judge:
        judge = _run_judge(args, manifest)
    if not scores and judge is None:
        raise UsageError("nothing to score: --rewards none and no --judge")
    results = write_results(args.out, manifest, scores, judge)
    _print_summary(results, args.out)
    return results


def _synthetic_users(args):
    import json

    from ppd_engine.rewards_users import SyntheticUsers

    with open(args.synthetic_users, encoding="utf-8") as fh:
        return SyntheticUsers.from_json(json.load(fh))


def _add_own_reward(args, scores: dict, users) -> dict:
    """scores + scores["own"] (each synthetic user's own reward of every image) with --synthetic-users."""
    from ppd_engine.rewards_users import own_reward_scores

    if not getattr(args, "synthetic_users", None):
        return scores
    su = _synthetic_users(args)
    missing = [u for u in users if u not in su.weights]
    if missing:
        raise UsageError(f"--synthetic-users {args.synthetic_users}: evaluated user(s) {missing[:5]} are not "
                         "synthetic users (evaluate only the users the file defines)")
    need = [r for r in su.rewards if r not in scores]
    if need:
        raise UsageError(f"--synthetic-users: the users weigh {need}; add them to --rewards")
    return {**scores, "own": own_reward_scores({r: scores[r] for r in su.rewards}, su)}


def _interpolate(args) -> dict:
    from ppd_engine.embed.store import EmbeddingStore

    from .evaluate import read_manifest, run_generation
    from .generate import parse_checkpoints
    from .interpolate import InterpolatedStore, interpolation_summary, write_interpolation
    from .prompts import load_prompts

    (ck,) = parse_checkpoints([args.run], checkpoint=args.checkpoint)
    if not ck.personalized:
        raise UsageError(f"--run {args.run}: interpolating users needs a personalized run")
    try:
        lambdas = [float(x) for x in args.lambdas.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--lambdas {args.lambdas!r}: expected comma-separated numbers") from None
    if len(lambdas) < 2:
        raise UsageError("--lambdas: give at least two values")
    su = _synthetic_users(args)
    a, b = args.between
    for u in (a, b):
        if u not in su.weights:
            raise UsageError(f"--between: {u!r} is not a user of {args.synthetic_users}")
    store = InterpolatedStore(EmbeddingStore(args.store), a, b, lambdas, args.embed_index)
    prompt_set = load_prompts(args.prompts, args.limit, args.pickapic_dir)
    run_generation([ck], prompt_set, store.users(), store, args.out, seed=args.seed, batch_size=args.gen_batch_size,
                   device=resolve_device(args.device), progress=args.progress, steps=args.steps,
                   guidance=args.guidance, user_guidance=args.user_guidance, user_scale=args.user_scale)
    manifest = read_manifest(args.out)
    if any(r not in reward_names(args) for r in su.rewards):
        raise UsageError(f"--rewards must include every reward the users weigh: {su.rewards}")
    scores = _score_all(args, args.out, manifest)
    summary = interpolation_summary({r: scores[r] for r in su.rewards}, ck.name, a, b, lambdas, su)
    files = write_interpolation(args.out, summary)
    rho = summary["spearman"]
    print(f"Spearman ρ(λ, own reward): {a} {rho[a]:+.3f}, {b} {rho[b]:+.3f}; wrote {', '.join(files)} in {args.out}")
    return summary


def _sweep(args) -> dict:
    from .evaluate import read_manifest, write_results
    from .generate import parse_checkpoints
    from .report import write_json, write_text
    from .sweep import build_entries, run_beta, sweep_report

    ckpts = parse_checkpoints(args.runs)
    betas = {c.name: run_beta(c.run_dir) for c in ckpts}
    _generate(args, ckpts)
    manifest = read_manifest(args.out)
    results = write_results(args.out, manifest, _score_all(args, args.out, manifest))
    entries = build_entries(results["rewards"], args.reward, {c.name: c.run_dir for c in ckpts}, betas)
    data, md = sweep_report(entries, args.reward, manifest["prompts"]["source"])
    write_json(f"{args.out}/sweep.json", data)
    write_text(f"{args.out}/sweep.md", md)
    print(md.rstrip())
    print(f"wrote {args.out}/sweep.json and {args.out}/sweep.md")
    return data


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("generate", "run"):
        from .generate import parse_checkpoints

        if not args.run:
            raise UsageError("give at least one --run NAME=RUN_DIR")
        _generate(args, parse_checkpoints(args.run, args.no_user, checkpoint=args.checkpoint,
                                          caption_profile=args.caption_profile))
    if args.command in ("score", "run"):
        _score(args)
    if args.command == "sweep":
        _sweep(args)
    if args.command == "interpolate":
        _interpolate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
