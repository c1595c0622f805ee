"""Custom ops of the `ppd` library: thin wrappers with shape checks, fake kernels and autograd.

Importing this package registers every op with torch (the compiled kernels when the extension is
built, their fake kernels and autograd formulas always), so `torch.ops.ppd.*` is ready for eager
use, `torch.compile` and `opcheck`. The wrappers live in their modules (`ops.dpo_loss.dpo_loss`,
`ops.dpo_loss.paired_mse`, `ops.dual_attention.dual_cross_attention`); the package does not rebind
a module's name to a function, so `ppd_engine.ops.dpo_loss` stays the module.
"""

from ppd_engine.ops import dpo_loss, dual_attention  # noqa: F401  (registration happens on import)
from ppd_engine.ops.dpo_loss import paired_mse
from ppd_engine.ops.dual_attention import dual_cross_attention

__all__ = ["dpo_loss", "dual_attention", "dual_cross_attention", "paired_mse"]
