"""The training loop, checkpoints and logging."""

from loraforge.train.checkpoint import CheckpointError
from loraforge.train.run import RunResult, TrainingError, run_training

__all__ = ["CheckpointError", "RunResult", "TrainingError", "run_training"]
