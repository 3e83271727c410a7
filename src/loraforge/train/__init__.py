"""The training loop, checkpoints and logging."""

from loraforge.train.run import RunResult, TrainingError, run_training

__all__ = ["RunResult", "TrainingError", "run_training"]
