"""Mixed precision of the training step: the autocast dtype, fp16 loss scaling, TF32.

    train.mixed_precision   no | bf16 | fp16  (fp32 = no, the older spelling)
    train.allow_tf32        TF32 matmuls/convolutions on Ampere+ GPUs

bf16 needs no loss scaling (its exponent range is fp32's). fp16 (V100/T4/RTX 20xx, which have no
bf16 units) does: gradients of small losses underflow to zero in fp16. `LossScaler` follows the
rules of `torch.amp.GradScaler` (start at 2^16, halve on an overflowing step and skip it, double
after `growth_interval` good steps) but works on plain gradients after they are reduced, so it
serves FSDP2 shards, replicated adapters and bitsandbytes' 8-bit optimizers alike, where GradScaler's
`unscale_(optimizer)` would need to see the optimizer's own parameter views. Adapter masters stay
fp32 in every mode; only the compute runs in the low precision.
"""
from __future__ import annotations

import torch

AUTOCAST = {"no": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(mode: str) -> torch.dtype | None:
    return AUTOCAST[mode]


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions when enabled; otherwise torch's own defaults stay
    (matmuls off, cuDNN convolutions on), so `false` never slows the convolutions torch speeds up."""
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class LossScaler:
    """Dynamic loss scale for fp16 (identity when disabled). The trainer multiplies the loss by
    `scale` before backward, divides the reduced gradients by it, and calls `update(overflow)`."""

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.good_steps = 0
        self.overflows = 0

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.overflows += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps,
                "overflows": self.overflows}

    def load_state_dict(self, state: dict | None) -> None:
        if not state or not self.enabled:
            return
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
        self.overflows = int(state.get("overflows", 0))


ACCELERATE_MIXED = {"no": "no", "fp16": "fp16", "bf16": "bf16", "fp8": None}
# accelerate-launch variables that would change what a run computes: (the value that changes
# nothing, what to use instead).
ACCELERATE_REFUSED = {
    "ACCELERATE_USE_FSDP": ("false", "dist.adapters=shard (the engine's own FSDP2 over the adapters)"),
    "ACCELERATE_USE_DEEPSPEED": ("false", "dist.adapters=shard or replicate under torchrun"),
    "ACCELERATE_USE_MEGATRON_LM": ("false", "torchrun with dist.adapters=shard or replicate"),
    "ACCELERATE_DYNAMO_BACKEND": ("no", "train.compile"),
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": ("1", "train.pairs_per_step and train.micro_batch"),
}


def accelerate_overrides(environ, overrides: list[str]) -> list[str]:
    """The config overrides `accelerate launch` asks for through its environment, or ValueError.

    ACCELERATE_MIXED_PRECISION becomes train.mixed_precision unless an override already sets that key
    to another value (refused: two settings for one thing). Variables the engine cannot honour are
    refused naming the config key that does the job, so none is ignored silently."""
    out = []
    mixed = environ.get("ACCELERATE_MIXED_PRECISION")
    if mixed is not None:
        mode = ACCELERATE_MIXED.get(mixed.strip().lower())
        if mode is None:
            raise ValueError(f"ACCELERATE_MIXED_PRECISION={mixed}: not supported; train.mixed_precision takes "
                             "no | bf16 | fp16")
        given = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "train.mixed_precision"]
        if given and {"fp32": "no"}.get(given[-1], given[-1]) != mode:
            raise ValueError(f"ACCELERATE_MIXED_PRECISION={mixed} (accelerate launch) but train.mixed_precision="
                             f"{given[-1]} on the command line; give one of them")
        if not given:
            out.append(f"train.mixed_precision={mode}")
    for var, (neutral, instead) in ACCELERATE_REFUSED.items():
        value = environ.get(var)
        if value is not None and value.strip().lower() not in (neutral, ""):
            raise ValueError(f"{var}={value} (accelerate launch) is not honoured by ppd_engine; use {instead}")
    return out
