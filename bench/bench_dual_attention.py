"""Fused dual cross-attention (`ppd::dual_cross_attention`) vs the composition a user writes instead:
two `F.scaled_dot_product_attention` calls plus the gated sum (`reference.dual_cross_attention_reference`,
the same function the tests take as ground truth), forward and forward+backward.

Shapes are the cross-attention layers of the real denoisers at their training resolution, 77 text
tokens and 4 user tokens: SD1.5 at 512 px (8 heads; head_dim 40 / 80 / 160 at 4096 / 1024 / 256
queries) and SDXL at 1024 px (head_dim 64; 10 heads at 4096 queries, 20 heads at 1024). The text
K/V is shared by the batch (Bt = 1), as in the paired forward; gradients flow to q and the user K/V
only (frozen text projections), as in training.

    python -m bench.bench_dual_attention --quick               # CPU, under ~2 minutes
    python -m bench.bench_dual_attention --device cuda         # GPU: full batch, bf16
"""
from __future__ import annotations

import argparse
import math

import torch

from bench.common import markdown_table, measure, row, write_rows
from ppd_engine.ops import reference
from ppd_engine.ops.dual_attention import dual_attention_supported, dual_cross_attention

TEXT_TOKENS = 77
USER_TOKENS = 4
# (name, heads, query tokens, head_dim)
LAYERS = [
    ("sd15_down0", 8, 4096, 40),
    ("sd15_down1", 8, 1024, 80),
    ("sd15_down2", 8, 256, 160),
    ("sdxl_down1", 10, 4096, 64),
    ("sdxl_down2", 20, 1024, 64),
]


def make_inputs(batch, heads, lq, d, dtype, device, grad):
    """q / K / V as diffusers' processors hand them over: (B, L, H*D) projections viewed as (B, H, L, D)."""
    def proj(b, length, requires_grad):
        x = torch.randn(b, length, heads * d, dtype=dtype, device=device) / math.sqrt(2)
        return x.view(b, length, heads, d).transpose(1, 2).detach().requires_grad_(requires_grad)

    q = proj(batch, lq, grad)
    kt, vt = proj(1, TEXT_TOKENS, False), proj(1, TEXT_TOKENS, False)
    ku, vu = proj(batch, USER_TOKENS, grad), proj(batch, USER_TOKENS, grad)
    gate = torch.ones(batch, device=device)
    gate[batch // 2:] = 0.0  # half policy rows, half reference rows, as in the stacked paired forward
    return q, kt, vt, ku, vu, gate


def sdpa2(q, kt, vt, ku, vu, gate):
    return reference.dual_cross_attention_reference(q, kt, vt, ku, vu, gate)


def runner(fn, inputs, backward):
    if not backward:
        def fwd():
            with torch.no_grad():
                fn(*inputs)
        return fwd
    grad_out = torch.randn_like(inputs[0])
    leaves = [x for x in inputs if x.requires_grad]

    def fwd_bwd():
        out = fn(*inputs)
        torch.autograd.grad(out, leaves, grad_out)
    return fwd_bwd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="input dtype (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size (default: 8 on CUDA, 2 on CPU, 1 with --quick on CPU)")
    ap.add_argument("--layers", nargs="*", default=None, choices=[n for n, *_ in LAYERS],
                    help="layer shapes to run (default: all)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per case (default: 50 CUDA, 5 CPU)")
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke sizes: batch 1, 3 runs, SDXL layers with half the heads (~1-2 minutes)")
    ap.add_argument("--out", default=None, help="JSON rows file name (default: dual_attention_<device>.jsonl "
                    "under bench/results or $PPD_BENCH_OUT)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batch = args.batch or (8 if device.type == "cuda" else 1 if args.quick else 2)
    runs = args.runs or (50 if device.type == "cuda" else 3 if args.quick else 5)
    layers = [spec for spec in LAYERS if args.layers is None or spec[0] in args.layers]
    if args.quick:
        layers = [(n, h // 2 if n.startswith("sdxl") else h, lq, d) for n, h, lq, d in layers]

    from tqdm import tqdm  # here, not at the top: bench/gpu_correctness.py imports LAYERS without tqdm

    rows, skipped = [], []
    cases = [(spec, backward) for spec in layers for backward in (False, True)]
    for (name, heads, lq, d), backward in tqdm(cases, desc="dual attention", unit="case"):
        torch.manual_seed(0)
        inputs = make_inputs(batch, heads, lq, d, dtype, device, grad=backward)
        if not dual_attention_supported(inputs[0], inputs[1], inputs[3]):
            skipped.append(name)
            continue
        shape = f"B{batch} H{heads} Lq{lq} D{d} Lt{TEXT_TOKENS} Lu{USER_TOKENS}"
        op = f"{name}_{'fwd_bwd' if backward else 'fwd'}"
        for provider, fn in (("sdpa2", sdpa2), ("ppd_fused", dual_cross_attention)):
            t = measure(runner(fn, inputs, backward), device, warmup=1 if device.type == "cpu" else 5, runs=runs)
            rows.append(row(op, provider, shape, dtype, device, t))

    path = write_rows(rows, args.out or f"dual_attention_{device.type}.jsonl")
    print(markdown_table(rows, baseline="sdpa2"))
    if skipped:
        print(f"no kernel for {device.type}/{dtype} at: {', '.join(sorted(set(skipped)))} (skipped)")
    print(f"rows written to {path}")


if __name__ == "__main__":
    main()
