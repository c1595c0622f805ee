"""Activation memory of a Stage C PPD step without a GPU: the bytes autograd saves for backward in
the policy pass (the reference pass runs under no_grad and saves nothing), at the real shapes.

    python -m bench.cascade_memory --prior prior_lite --device cpu --pairs 1               # ~2 min here
    python -m bench.cascade_memory --prior prior --device meta --pairs 4 --checkpointing    # seconds

Random weights built from the published configs (ppd_engine.cascade.PRIOR_CONFIGS), user adapters
from a 3584-wide embedding, 24x24 latents (768 px), 77 text tokens, bf16. On the meta device no
kernel runs, so attention is counted as its math path (it saves the attention matrix): an upper
bound without checkpointing; with checkpointing only block inputs are saved and meta equals CPU.
The README's Stable Cascade memory paragraph quotes these numbers.
"""
from __future__ import annotations

import argparse
import json

import torch

USER_DIM = 3584


def saved_bytes(config: dict, device: str, pairs: int, side: int, checkpointing: bool) -> int:
    from diffusers import StableCascadeUNet

    from ppd_engine.adapters import add_user_adapters, user_conditioning

    with torch.device(device):
        torch.manual_seed(0)
        prior = StableCascadeUNet(**config).to(torch.bfloat16)
        add_user_adapters(prior, user_dim=USER_DIM, num_tokens=4, dtype=torch.float32)
    if checkpointing:
        prior.enable_gradient_checkpointing()
    prior.train()
    rows, c, bf16 = 2 * pairs, prior.config, torch.bfloat16
    x = torch.randn(rows, 16, side, side, device=device, dtype=bf16)
    kw = dict(clip_text_pooled=torch.randn(rows, 1, c.clip_text_pooled_in_channels, device=device, dtype=bf16),
              clip_text=torch.randn(rows, 77, c.clip_text_in_channels, device=device, dtype=bf16),
              clip_img=torch.zeros(rows, 1, c.clip_image_in_channels, device=device, dtype=bf16))
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            user_conditioning(prior, torch.randn(rows, 1, USER_DIM, device=device)):
        prior(x, torch.rand(rows, device=device, dtype=bf16), **kw)
    return total


def main() -> None:
    from ppd_engine.cascade import PRIOR_CONFIGS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prior", choices=sorted(PRIOR_CONFIGS), default="prior_lite")
    p.add_argument("--device", choices=["cpu", "meta"], default="meta")
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--side", type=int, default=24, help="Stage C latent side (24 = 768 px)")
    p.add_argument("--checkpointing", action="store_true")
    a = p.parse_args()
    n = saved_bytes(PRIOR_CONFIGS[a.prior], a.device, a.pairs, a.side, a.checkpointing)
    print(json.dumps({"prior": a.prior, "device": a.device, "pairs": a.pairs, "side": a.side,
                      "checkpointing": a.checkpointing, "saved_gib": round(n / 2**30, 3)}))


if __name__ == "__main__":
    main()
