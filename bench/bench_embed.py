"""User-embedding generation throughput: compiled decode (static KV cache + torch.compile, the engine's
`--compile`) vs the eager decode a user gets from plain `model.generate`, same model, prompts and
batch, measured in one process. One call = one batch of users: prefill, greedy decode of exactly
--new-tokens tokens (EOS suppressed so both sides decode the same length), and the extra forward that
reads the final token's hidden states. Reports end-to-end tokens/s and users/s, and the decode loop's
own tokens/s (the call minus the same call with one new token); the compiled side's first call
(compilation) is warm-up and reported separately.

    python -m bench.bench_embed                                   # CPU: tiny random VLM, ~2 min
    python -m bench.bench_embed --device cuda --arch qwen2-0.5b   # GPU: real 0.5B shapes, random weights
    python -m bench.bench_embed --device cuda --model llava-hf/llava-onevision-qwen2-7b-ov-hf --dtype bf16
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import markdown_table, measure, row, write_rows


def make_prompts(n_users: int, shots: int, image_side: int, seed: int = 0):
    from types import SimpleNamespace

    from PIL import Image

    from ppd_engine.embed.prompt import ProfileTemplate

    rng = np.random.default_rng(seed)
    img = lambda: Image.fromarray(rng.integers(0, 255, (image_side, image_side, 3), dtype=np.uint8))  # noqa: E731
    t = ProfileTemplate()
    return [t.render([SimpleNamespace(caption=f"user {u} caption {i}: a castle at dusk, oil painting",
                                      image_w=img(), image_l=img(), uid_w=f"{u}{i}w", uid_l=f"{u}{i}l")
                      for i in range(shots)]) for u in range(n_users)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    ap.add_argument("--model", default=None, help="hub id / folder of a real LLaVA-OneVision (default: random --arch)")
    ap.add_argument("--arch", default=None, choices=["tiny", "qwen2-0.5b"],
                    help="random model shapes when --model is not given (default: tiny on cpu, qwen2-0.5b on cuda)")
    ap.add_argument("--dtype", default=None, help="fp32 / bf16 / fp16 (default: fp32 on cpu, bf16 on cuda)")
    ap.add_argument("--users", type=int, default=4, help="users (prompts) per batch")
    ap.add_argument("--shots", type=int, default=4, help="pairs per prompt")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per user (default 32 cpu / 256 cuda)")
    ap.add_argument("--runs", type=int, default=None, help="timed calls per provider (default 3 cpu / 5 cuda)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: 1 for the tiny random model, whose matrices are too small to "
                         "split, torch's default otherwise)")
    args = ap.parse_args(argv)

    from ppd_engine.embed.generate import GenerationSettings, VLMGenerator
    from ppd_engine.embed.vlm import load_vlm, parse_dtype
    from ppd_engine.testing.tiny_vlm import build_tiny_llava

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible")
    threads = args.threads or (1 if not cuda and not args.model and args.arch in (None, "tiny") else None)
    if threads:
        torch.set_num_threads(threads)
    dtype = parse_dtype(args.dtype or ("bf16" if cuda else "fp32"))
    new_tokens = args.new_tokens or (256 if cuda else 32)
    runs = args.runs or (5 if cuda else 3)
    if args.model:
        model, processor = load_vlm(args.model, device=args.device, dtype=dtype)
        source = args.model
    else:
        arch = args.arch or ("qwen2-0.5b" if cuda else "tiny")
        model, processor = build_tiny_llava(arch=arch, device=args.device, dtype=dtype)
        source = f"random:{arch}"
    side = processor.image_processor.size["height"]
    prompts = make_prompts(args.users, args.shots, image_side=max(side, 64))
    shape = f"model={source},users={args.users},shots={args.shots},new={new_tokens}"

    rows, outputs = [], {}
    for provider, compiled in (("eager", False), ("ppd_compiled", True)):
        gen = VLMGenerator(model, processor, GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                                greedy=True, compile=compiled, layers="last"))
        t0 = time.perf_counter()
        out = gen.generate(prompts, pad_batch_to=args.users)  # first call: compiles on the compiled side
        if cuda:
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        outputs[provider] = out
        tokens = sum(len(t) for t in out.tokens)
        with torch.inference_mode():
            t = measure(lambda: gen.generate(prompts, pad_batch_to=args.users), args.device, warmup=1, runs=runs)
            # The same call with one new token is prefill + the final-state forward alone; the
            # difference isolates the decode loop, which is what compilation targets.
            gen.settings.max_new_tokens = gen.settings.min_new_tokens = 1
            t1 = measure(lambda: gen.generate(prompts, pad_batch_to=args.users), args.device, warmup=1, runs=runs)
        sec = t.median_ms / 1e3
        decode_s = max(t.median_ms - t1.median_ms, 1e-6) / 1e3
        decode_tps = args.users * (new_tokens - 1) / decode_s
        rows.append(row("embed_generate", provider, shape, dtype, args.device, t,
                        tokens_per_s=round(tokens / sec, 2), users_per_s=round(args.users / sec, 4),
                        decode_tokens_per_s=round(decode_tps, 2), prefill_ms=round(t1.median_ms, 2),
                        first_call_s=round(first_s, 2), prompt_tokens=max(out.prompt_lengths)))
        print(f"{provider}: {t.median_ms:.1f} ms/batch, {tokens / sec:.1f} tokens/s, {args.users / sec:.3f} users/s; "
              f"decode loop alone {decode_tps:.1f} tokens/s (prefill + state forward {t1.median_ms:.1f} ms); "
              f"first call {first_s:.1f} s", flush=True)
    e, c = outputs["eager"], outputs["ppd_compiled"]
    same = sum(torch.equal(a, b) for a, b in zip(e.tokens, c.tokens))
    diff = (e.states - c.states).abs().max().item()
    for r in rows:
        r.extra.update(tokens_match=f"{same}/{len(e.tokens)}", max_state_diff=round(diff, 6))
    path = write_rows(rows, f"embed_{args.device}.jsonl")
    print(markdown_table(rows, "eager", extra_cols=("tokens_per_s", "users_per_s", "decode_tokens_per_s",
                                                     "first_call_s", "tokens_match")))
    print(f"greedy tokens identical for {same}/{len(e.tokens)} users; max |state diff| {diff:.2e}; rows -> {path}")


if __name__ == "__main__":
    main()
