"""Text metrics on greedy answers: exact and contains match (with normalisation), BLEU and ROUGE.

BLEU and ROUGE come from the maintained libraries (sacrebleu's corpus BLEU, 0-100; rouge-score's
F-measures averaged over the answers, 0-1), never our own copies.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

METRICS = ("perplexity", "exact_match", "contains", "bleu", "rouge", "multiple_choice")
"""What ``loraforge eval --metrics`` takes. ``perplexity``, ``multiple_choice`` score log-likelihoods;
the others score greedy answers against the references."""

GENERATION_METRICS = ("exact_match", "contains", "bleu", "rouge")
CONVERSATION_METRICS = ("perplexity", *GENERATION_METRICS)
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class Normalization:
    """How answers and references are compared by exact and contains match."""

    strip: bool = True
    """Ignore surrounding whitespace, and collapse inner runs of whitespace to one space."""
    case: bool = False
    """Ignore letter case."""
    punctuation: bool = False
    """Ignore ASCII punctuation."""

    def __call__(self, text: str) -> str:
        if self.case:
            text = text.casefold()
        if self.punctuation:
            text = text.translate(_PUNCTUATION)
        if self.strip:
            text = " ".join(text.split())
        return text


def exact_match(answers: Sequence[str], references: Sequence[str], normalize: Normalization) -> list[bool]:
    """Per answer: does it equal its reference once both are normalised."""
    return [normalize(a) == normalize(r) for a, r in zip(answers, references, strict=True)]


def contains_match(answers: Sequence[str], references: Sequence[str], normalize: Normalization) -> list[bool]:
    """Per answer: does it contain its (non-empty) reference once both are normalised."""
    return [bool(normalize(r)) and normalize(r) in normalize(a) for a, r in zip(answers, references, strict=True)]


def bleu(answers: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100) of the answers against one reference each."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(answers), [list(references)]).score)


def rouge(answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """rouge-score's F-measures (``rouge1``, ``rouge2``, ``rougeL``; Porter stemming), averaged over answers."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for answer, reference in zip(answers, references, strict=True):
        for kind, score in scorer.score(reference, answer).items():
            totals[kind] += score.fmeasure
    return {kind: total / max(len(answers), 1) for kind, total in totals.items()}


def generation_scores(metrics: Sequence[str], answers: Sequence[str], references: Sequence[str],
                      normalize: Normalization) -> dict[str, float]:
    """The requested ``GENERATION_METRICS`` of one model's answers, by score name."""
    scores: dict[str, float] = {}
    if "exact_match" in metrics:
        scores["exact_match"] = _mean(exact_match(answers, references, normalize))
    if "contains" in metrics:
        scores["contains"] = _mean(contains_match(answers, references, normalize))
    if "bleu" in metrics:
        scores["bleu"] = bleu(answers, references)
    if "rouge" in metrics:
        scores.update(rouge(answers, references))
    return scores


def _mean(hits: Sequence[bool]) -> float:
    return sum(hits) / max(len(hits), 1)
