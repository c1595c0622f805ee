"""Correctness of the compiled kernels at the real SD1.5 / SDXL shapes, against float64.

The rule (flash-attention's, as in tests/): in a given dtype the kernel's largest error against a
float64 reference may be at most twice PyTorch's own error (the eager formula run in that same
dtype on the same inputs), plus a floor of a few ulps of the result's magnitude (both compute in
fp32, so either can be "lucky" by a rounding). Gradients of the dual attention are checked with the
text K/V frozen (what training runs: `text_grads=False` in the kernel) and with text gradients on.

The kernel path is asserted, not assumed: a case whose inputs the kernel would not take (the op
would fall back to the PyTorch reference and pass against itself) is a failure.

    python -m bench.gpu_correctness --device cuda --out correctness_cuda.jsonl   # bench/gpu_check.sh
    python -m bench.gpu_correctness --device cuda --tiny                         # under compute-sanitizer
    python -m bench.gpu_correctness --device cpu --tiny                          # rehearsal here

Imports only torch and ppd_engine's op wrappers (nothing the GPU image lacks). Prints one line per
check and a table; exits 1 when any check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from bench.bench_dual_attention import LAYERS, TEXT_TOKENS, USER_TOKENS
from ppd_engine import _ext
from ppd_engine.ops import reference as R
from ppd_engine.ops.dpo_loss import dpo_loss
from ppd_engine.ops.dual_attention import dual_attention_supported, dual_cross_attention

# Cross-attention layers of the denoisers at their training resolution (name, heads, queries, head_dim),
# the benchmark's own list.
ATTN_LAYERS = LAYERS
# Diffusion-DPO loss inputs (2B, C, H, W): SD1.5 at 512 px, SDXL at 1024 px.
LOSS_SHAPES = [("sd15_16pairs", (32, 4, 64, 64)), ("sdxl_4pairs", (8, 4, 128, 128))]
# Tiny shapes for compute-sanitizer (every kernel and its edge paths, a few seconds under memcheck):
# odd sizes, a 16-byte-vector size (multiple of 8), an empty batch.
TINY_ATTN = [("tiny_d40", 2, 37, 40), ("tiny_d72_odd", 3, 5, 72)]
TINY_LOSS = [("tiny_vec", (4, 4, 8, 10)), ("tiny_odd", (6, 3, 5, 7))]

NAMES = ("q", "k_text", "v_text", "k_user", "v_user", "user_scale")


def err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def floor_of(ref: torch.Tensor, dtype: torch.dtype) -> float:
    mag = ref.abs().max().item() if ref.numel() else 0.0
    return 8 * torch.finfo(torch.float32).eps * mag + (torch.finfo(dtype).eps * mag if dtype != torch.float32 else 0.0)


class Checker:
    def __init__(self):
        self.rows = []

    def add(self, check, case, dtype, tensor, ours, torch_err, bound, note=""):
        ok = ours <= bound
        self.rows.append(dict(check=check, case=case, dtype=str(dtype).replace("torch.", ""), tensor=tensor,
                              err=ours, torch_err=torch_err, bound=bound, ok=ok, note=note))
        if not ok:
            print(f"FAIL {check} {case} {dtype} {tensor}: err {ours:.3e} > bound {bound:.3e} "
                  f"(PyTorch's own error {torch_err:.3e}) {note}", flush=True)

    def fail(self, check, case, dtype, why):
        self.rows.append(dict(check=check, case=case, dtype=str(dtype).replace("torch.", ""), tensor="-",
                              err=float("nan"), torch_err=float("nan"), bound=float("nan"), ok=False, note=why))
        print(f"FAIL {check} {case} {dtype}: {why}", flush=True)


def grads(fn, inputs, needs, grad_out):
    leaves = [x.detach().clone().requires_grad_(n) for x, n in zip(inputs, needs)]
    out = fn(*leaves)
    want = [x for x in leaves if x.requires_grad]
    gs = torch.autograd.grad(out, want, grad_out.to(out.dtype))
    it = iter(gs)
    return out.detach(), [next(it) if n else None for n in needs]


def check_attention(c: Checker, device, layers, dtypes, batch):
    for name, heads, lq, d in layers:
        for dtype in dtypes:
            for text_grads in (False, True):
                torch.manual_seed(0)
                case = f"{name} B{batch} H{heads} Lq{lq} D{d} text_grads={text_grads}"

                def proj(b, length):
                    x = torch.randn(b, length, heads * d, device=device, dtype=dtype)
                    return x.view(b, length, heads, d).transpose(1, 2)

                q, kt, vt = proj(batch, lq), proj(1, TEXT_TOKENS), proj(1, TEXT_TOKENS)
                ku, vu = proj(batch, USER_TOKENS), proj(batch, USER_TOKENS)
                us = torch.rand(batch, device=device) + 0.5
                us[batch // 2:] = 0.0  # reference rows (gate 0) inside the batch, as in the paired forward
                inputs = (q, kt, vt, ku, vu, us)
                needs = (True, text_grads, text_grads, True, True, True)
                probe_kt = kt.detach().requires_grad_(text_grads)
                if not dual_attention_supported(q, probe_kt, ku):
                    c.fail("dual_attention", case, dtype, "no kernel takes these inputs (would fall back)")
                    continue
                go = torch.randn_like(q)
                ours, our_g = grads(dual_cross_attention, inputs, needs, go)
                eager, eager_g = grads(R.dual_cross_attention_reference, inputs, needs, go)
                inputs64 = tuple(x.double().contiguous() for x in inputs)
                exact, exact_g = grads(R.dual_cross_attention_reference, inputs64, needs, go.double())
                e_t = err(eager, exact)
                c.add("dual_attention", case, dtype, "out", err(ours, exact), e_t, 2 * e_t + floor_of(exact, dtype))
                for tname, g, eg, xg in zip(NAMES, our_g, eager_g, exact_g):
                    if xg is None:
                        continue
                    e_t = err(eg, xg)
                    c.add("dual_attention", case, dtype, f"d{tname}", err(g, xg), e_t, 2 * e_t + floor_of(xg, dtype))


def check_loss(c: Checker, device, shapes, dtypes, beta=5000.0):
    for name, shape in shapes:
        for dtype in dtypes:
            torch.manual_seed(0)
            case = f"{name} {tuple(shape)} beta={beta:g}"
            n = shape[0]
            target = torch.randn(shape, device=device)
            model = (target + 0.5 * torch.randn(shape, device=device)).to(dtype)
            ref = (target + 0.5 * torch.randn(shape, device=device)).to(dtype)
            target = target.to(dtype)
            weight = torch.rand(n // 2, device=device) + 0.5
            if not _ext.has_kernel("dpo_loss", device.type):
                c.fail("dpo_loss", case, dtype, "no dpo_loss kernel for this device (would fall back)")
                continue

            def run(fn, m, r, t, w):
                m = m.detach().clone().requires_grad_()
                outs = fn(m, r, t, w, beta)
                outs[0].backward()
                return [o.detach() for o in outs[:3]], m.grad

            ours, g = run(lambda m, r, t, w, b: dpo_loss(m, r, t, weight=w, beta=b), model, ref, target, weight)
            eager, eg = run(R.dpo_loss_reference, model, ref, target, weight)
            exact, xg = run(R.dpo_loss_reference, model.double(), ref.double(), target.double(), weight.double())
            for tname, o, e, x in zip(("loss", "inside", "model_mse"), ours, eager, exact):
                e_t = err(e, x)
                c.add("dpo_loss", case, dtype, tname, err(o, x), e_t, 2 * e_t + floor_of(x, torch.float32))
            e_t = err(eg, xg)
            c.add("dpo_loss", case, dtype, "grad", err(g, xg), e_t, 2 * e_t + floor_of(xg, dtype))


def check_edges(c: Checker, device):
    """Paths the real shapes do not reach: an empty batch / zero heads through the backward."""
    for b, h in ((0, 2), (2, 0)):
        case = f"empty B{b} H{h}"
        q = torch.randn(b, h, 5, 16, device=device, requires_grad=True)
        kt = torch.randn(1, h, 3, 16, device=device)
        ku = torch.randn(b, h, 2, 16, device=device, requires_grad=True)
        vu = torch.randn(b, h, 2, 16, device=device, requires_grad=True)
        try:
            out = dual_cross_attention(q, kt, kt, ku, vu, torch.ones(b, device=device))
            out.sum().backward()
            ok = out.shape == q.shape and q.grad.shape == q.shape and ku.grad.shape == ku.shape
            c.add("dual_attention", case, torch.float32, "shapes", 0.0 if ok else 1.0, 0.0, 0.0)
        except Exception as exc:  # noqa: BLE001  (the failure is the finding)
            c.fail("dual_attention", case, torch.float32, f"{type(exc).__name__}: {exc}")


def table(rows) -> str:
    lines = ["| check | case | dtype | tensor | err | PyTorch err | bound | ok |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['case']} | {r['dtype']} | {r['tensor']} | {r['err']:.2e} | "
                     f"{r['torch_err']:.2e} | {r['bound']:.2e} | {'yes' if r['ok'] else '**NO**'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (compute-sanitizer, CPU rehearsal)")
    ap.add_argument("--dtypes", nargs="*", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 float16 float32 (tiny: float32 bfloat16)")
    ap.add_argument("--batch", type=int, default=4, help="attention batch (half of it gate-0 rows)")
    ap.add_argument("--out", default=None, help="JSON rows file (relative names go under $PPD_BENCH_OUT)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    names = args.dtypes or (["float32", "bfloat16"] if args.tiny else ["bfloat16", "float16", "float32"])
    dtypes = [getattr(torch, n) for n in names]
    t0 = time.time()
    c = Checker()
    check_attention(c, device, TINY_ATTN if args.tiny else ATTN_LAYERS, dtypes, 2 if args.tiny else args.batch)
    check_loss(c, device, TINY_LOSS if args.tiny else LOSS_SHAPES, dtypes)
    check_edges(c, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    bad = [r for r in c.rows if not r["ok"]]
    print(table(c.rows))
    print(f"correctness: {len(c.rows) - len(bad)}/{len(c.rows)} checks within bounds on "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} in {time.time() - t0:.1f} s")
    if args.out:
        path = args.out if os.path.isabs(args.out) else os.path.join(os.environ.get("PPD_BENCH_OUT", "."), args.out)
        with open(path, "w") as f:
            for r in c.rows:
                f.write(json.dumps({**r, "device": device.type, "torch": torch.__version__}) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
