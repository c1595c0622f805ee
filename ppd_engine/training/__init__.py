"""The training engine: `Trainer` (the loop), checkpoints, distributed adapters, `load_run`.

    from ppd_engine.training import Trainer, TrainResult, load_run
"""

from ppd_engine.training.run import build_model, load_run
from ppd_engine.training.trainer import BadStepsError, Trainer, TrainResult

__all__ = ["BadStepsError", "Trainer", "TrainResult", "build_model", "load_run"]
