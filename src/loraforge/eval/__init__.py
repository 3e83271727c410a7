"""Evaluation: did a fine-tune help, and what did it break? ``evaluate`` scores the base model and any
number of adapters side by side; ``write_report`` writes markdown, JSON and a bar chart."""

from loraforge.eval.choices import ChoiceQuestion
from loraforge.eval.data import general_knowledge, read_eval_data
from loraforge.eval.evaluate import (
    BASE_LABEL,
    EvalError,
    EvalOptions,
    EvalResult,
    InModel,
    evaluate,
)
from loraforge.eval.metrics import METRICS, Normalization
from loraforge.eval.report import write_report

__all__ = [
    "BASE_LABEL",
    "METRICS",
    "ChoiceQuestion",
    "EvalError",
    "EvalOptions",
    "EvalResult",
    "InModel",
    "Normalization",
    "evaluate",
    "general_knowledge",
    "read_eval_data",
    "write_report",
]
