"""Fused Diffusion-DPO loss (`ppd::dpo_loss` + its backward) vs the eager PyTorch formula a training
script writes instead (`reference.dpo_loss_reference`, the same function the tests take as ground
truth: upcast to float32, F.mse_loss, mean over non-batch dims, logsigmoid), forward and
forward+backward, at latent sizes from tiny to SDXL (2B = 32, 4x128x128). The generic path of the
loss library (`preference_loss("hinge", ...)`: ppd::paired_mse with float64 MSEs, then the loss on
(B,) vectors) is timed against the same formula written eagerly, in rows named <size>_hinge_*.

GB/s counts the bytes the op must touch: forward reads model_pred, ref_pred and target once;
backward reads model_pred and target and writes the gradient. On CUDA the table also gives the
device copy bandwidth measured in the same run (a clone of a buffer of the same size) and the
fused op's share of it.

    python -m bench.bench_dpo_loss --quick                 # CPU, well under 2 minutes
    python -m bench.bench_dpo_loss --device cuda           # GPU sizes, plus torch.compile baseline
"""
from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from bench.common import markdown_table, measure, row, write_rows
from ppd_engine.losses import preference_loss
from ppd_engine.ops import reference
from ppd_engine.ops.dpo_loss import dpo_loss

# (name, 2B, latent shape, CPU runs, CPU runs with --quick)
SIZES = [
    ("tiny", 2, (4, 8, 8), 50, 20),
    ("sd15_256px", 8, (4, 32, 32), 30, 10),
    ("sd15_512px", 16, (4, 64, 64), 10, 5),
    ("sdxl_1024px", 32, (4, 128, 128), 5, 3),
]
BETA = 5000.0


def make_inputs(n, latent, dtype, device):
    target = torch.randn((n, *latent), device=device)
    model = (target + 0.3 * torch.randn_like(target)).to(dtype).requires_grad_()
    ref = (target + 0.3 * torch.randn_like(target)).to(dtype)
    weight = torch.rand(n // 2, device=device) + 0.5
    return model, ref, target.to(dtype), weight


def eager_hinge(model, ref, target, weight, beta):
    return reference.preference_loss_reference("hinge", model, ref, target, beta=beta, weight=weight)


def ppd_generic_hinge(model, ref, target, weight, beta):
    return (preference_loss("hinge", model, ref, target, beta=beta, weight=weight).loss,)


def compiled(fn):
    """torch.compile of fn for one case. Dynamo is reset first: with one compiled function reused
    over every shape and dtype it passes its recompile limit after a few cases and silently runs
    the remaining ones eagerly."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def runner(fn, inputs, backward):
    model, ref, target, weight = inputs
    if not backward:
        def fwd():
            with torch.no_grad():
                fn(model, ref, target, weight, BETA)
        return fwd

    def fwd_bwd():
        loss = fn(model, ref, target, weight, BETA)[0]
        torch.autograd.grad(loss, model)
    return fwd_bwd


def copy_bandwidth_gbs(nbytes, device, runs):
    """Device copy bandwidth (read + write) for a buffer of `nbytes`, GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    t = measure(lambda: src.clone(), device, warmup=5, runs=runs)
    return 2 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16", "float16"], help="input dtypes (default: float32 bfloat16)")
    ap.add_argument("--sizes", nargs="*", default=None, choices=[s[0] for s in SIZES], help="sizes (default: all)")
    ap.add_argument("--runs", type=int, default=None,
                    help="timed runs per case (default: 100 on CUDA; on CPU per size, fewer for big sizes)")
    ap.add_argument("--quick", action="store_true", help="fewer runs (CPU: about a minute in total)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also time torch.compile of the eager formula (default: on for CUDA, off for CPU, "
                         "where Inductor's C++ compile takes minutes)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (torch.set_num_threads; default: torch's). 1 gives steadier numbers on a "
                         "busy shared machine, where threads wait on descheduled peers")
    ap.add_argument("--out", default=None, help="JSON rows file name (default: dpo_loss_<device>.jsonl under "
                    "bench/results or $PPD_BENCH_OUT)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    families = {"": (reference.dpo_loss_reference, ("ppd_fused", dpo_loss)),
                "_hinge": (eager_hinge, ("ppd_generic", ppd_generic_hinge))}

    sizes = [s for s in SIZES if args.sizes is None or s[0] in args.sizes]
    cases = [(s, dt, bw, fam) for s in sizes for dt in args.dtypes for bw in (False, True) for fam in families]
    rows = []
    for (name, n, latent, cpu_runs, quick_runs), dtype_name, backward, fam in tqdm(cases, desc="dpo loss",
                                                                                    unit="case"):
        eager_fn, ours = families[fam]
        providers = [("eager", eager_fn), ours]
        if use_compile:
            providers.insert(1, ("eager_compiled", compiled(eager_fn)))
        dtype = getattr(torch, dtype_name)
        runs = args.runs or (100 if device.type == "cuda" else quick_runs if args.quick else cpu_runs)
        torch.manual_seed(0)
        inputs = make_inputs(n, latent, dtype, device)
        elems = inputs[0].numel()
        nbytes = (6 if backward else 3) * elems * inputs[0].element_size()
        shape = f"2B{n} {'x'.join(map(str, latent))}"
        op = f"{name}{fam}_{'fwd_bwd' if backward else 'fwd'}"
        copy_gbs = copy_bandwidth_gbs(nbytes // 2, device, runs) if device.type == "cuda" else None
        for provider, fn in providers:
            t = measure(runner(fn, inputs, backward), device, warmup=2 if device.type == "cpu" else 10, runs=runs)
            gbs = nbytes / (t.median_ms * 1e-3) / 1e9
            extra = {"GB/s": round(gbs, 1), "MB touched": round(nbytes / 1e6, 2)}
            if copy_gbs:
                extra.update({"copy GB/s": round(copy_gbs, 1), "% of copy": round(100 * gbs / copy_gbs, 1)})
            rows.append(row(op, provider, shape, dtype, device, t, **extra))

    path = write_rows(rows, args.out or f"dpo_loss_{device.type}.jsonl")
    cols = ("GB/s", "MB touched") + (("copy GB/s", "% of copy") if device.type == "cuda" else ())
    print(markdown_table(rows, baseline="eager", extra_cols=cols))
    print(f"device: {rows[0].device if rows else device}; rows written to {path}")


if __name__ == "__main__":
    main()
