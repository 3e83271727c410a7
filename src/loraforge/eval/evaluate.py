"""``evaluate``: did the fine-tune help, and what did it break? Scores the base model and any number of
adapters on one data set (and on a general regression set), side by side.

    model, tokenizer = load_model("default")
    result = evaluate(model, tokenizer, read_eval_data("test.jsonl"), {"support": "runs/support/adapter"})
    write_report(result, "eval-report")

Perplexity and multiple choice score log-likelihoods with every model in the same batches
(``eval/loglik.py``); exact/contains match, BLEU and ROUGE score greedy answers generated for every
model in one engine pass (``eval/generation.py``). The model is given back as it came: adapters
loaded for the evaluation are removed again.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from loraforge.adapters import AdapterFormatError, delete_adapter, load_adapter
from loraforge.data.formats import Conversation
from loraforge.data.tokenize import prompt_ids, tokenize_conversations
from loraforge.eval.choices import (
    ChoiceQuestion,
    accuracy_by_subject,
    choice_samples,
    picks,
)
from loraforge.eval.generation import BACKENDS, Candidate, generate_answers
from loraforge.eval.loglik import labelled_logprobs
from loraforge.eval.metrics import (
    CONVERSATION_METRICS,
    GENERATION_METRICS,
    METRICS,
    Normalization,
    generation_scores,
)

BASE_LABEL = "base"


class EvalError(ValueError):
    """An evaluation that can't run as asked; the message says what would be right."""


@dataclass(frozen=True)
class InModel:
    """An adapter that is already on the model in memory, by its name (the trainer's)."""

    name: str


AdapterSource = str | os.PathLike | InModel


@dataclass(frozen=True)
class EvalOptions:
    """How ``evaluate`` scores; every default lives here."""

    metrics: tuple[str, ...] | None = None
    """Names from ``metrics.METRICS``; None: every metric that fits the data."""
    normalize: Normalization = field(default_factory=Normalization)
    """How exact and contains match compare answers with references."""
    max_new_tokens: int = 64
    """Greedy answer length limit."""
    template: str = "auto"
    """Chat template for conversations (``data.template``)."""
    cutoff_len: int = 1024
    """Perplexity counts the first ``cutoff_len`` tokens of each conversation."""
    batch_size: int = 16
    """Rows per log-likelihood batch; sequences decoded together by the engine."""
    backend: str = "engine"
    """``engine``: all models' answers in one serving-engine batch; ``transformers``: ``generate``, one model
    after another."""
    pool_bytes: int = 1 << 30
    """The engine's memory pool (KV cache and adapter weights)."""
    examples: int = 10
    """Most items kept in the report where the models' answers differ."""

    def __post_init__(self):
        problems = []
        unknown = [m for m in self.metrics or () if m not in METRICS]
        if unknown:
            problems.append(f"unknown metrics {unknown}; choose from {list(METRICS)}")
        if self.metrics is not None and not self.metrics:
            problems.append(f"metrics is empty; choose from {list(METRICS)}")
        if self.backend not in BACKENDS:
            problems.append(f"backend {self.backend!r} is not one of {list(BACKENDS)}")
        for name in ("max_new_tokens", "cutoff_len", "batch_size", "pool_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} must be a positive integer")
        if isinstance(self.examples, bool) or not isinstance(self.examples, int) or self.examples < 0:
            problems.append(f"examples={self.examples!r} must be an integer >= 0")
        if problems:
            raise EvalError("invalid evaluation options: " + "; ".join(problems))


@dataclass
class EvalResult:
    """Scores per model label (``base`` first, then the adapters in the order given).

    ``scores[label]`` maps a score name to its value: ``loss`` and ``perplexity``; ``exact_match``,
    ``contains`` (fractions), ``bleu`` (0-100), ``rouge1``/``rouge2``/``rougeL`` (F, 0-1);
    ``multiple_choice`` (overall accuracy); ``regression`` (accuracy on the regression set).
    ``subjects[label]`` and ``regression_subjects[label]`` hold multiple-choice accuracy per subject.
    ``answers[label]`` holds the greedy answer to each item (generation metrics only). ``examples`` are
    items where the models' answers differ: ``origin``, ``prompt``, ``reference`` and ``answers`` by label.
    """

    labels: list[str]
    scores: dict[str, dict[str, float]]
    subjects: dict[str, dict[str, float]] = field(default_factory=dict)
    regression_subjects: dict[str, dict[str, float]] = field(default_factory=dict)
    answers: dict[str, list[str]] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    items: int = 0
    regression_items: int = 0
    backend: str = ""

    def changes(self) -> dict[str, dict[str, float]]:
        """Per adapter label, each score minus the base's (empty when the base was not scored)."""
        if BASE_LABEL not in self.scores:
            return {}
        base = self.scores[BASE_LABEL]
        return {label: {k: v - base[k] for k, v in self.scores[label].items() if k in base}
                for label in self.labels if label != BASE_LABEL}

    def to_dict(self) -> dict:
        return {**asdict(self), "changes": self.changes()}


def evaluate(model: nn.Module, tokenizer, data: Sequence[Conversation] | Sequence[ChoiceQuestion],
             adapters: Mapping[str, AdapterSource] | None = None, options: EvalOptions = EvalOptions(), *,
             regression: Sequence[ChoiceQuestion] | None = None, include_base: bool = True,
             model_source: str | None = None) -> EvalResult:
    """Score the base model (unless ``include_base`` is False) and each adapter on ``data``, and on the
    ``regression`` questions when given.

    ``adapters`` maps a label to a PEFT adapter folder, or to ``InModel(name)`` for an adapter already on
    the model. ``model_source`` is the base's source string, to warn about a folder trained on another.

    Raises:
        EvalError: metrics that don't fit the data, an adapter labelled ``base``, no model to score.
        AdapterFormatError: an adapter folder that is unreadable or doesn't fit this base model.
        DataError: a conversation the chat template can't render.
    """
    adapters = dict(adapters or {})
    metrics = _metrics_for(data, options.metrics)
    if BASE_LABEL in adapters and include_base:
        raise EvalError(f"the adapter label {BASE_LABEL!r} is taken by the base model; give the adapter another name")
    if not adapters and not include_base:
        raise EvalError("nothing to evaluate: give an adapter, or include the base model")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _loaded(model, adapters, model_source) as candidates:
            if include_base:
                candidates = [Candidate(BASE_LABEL), *candidates]
            result = _Scoring(model, tokenizer, candidates, options, device).run(data, metrics, regression)
    finally:
        model.train(was_training)
    return result


def _metrics_for(data: Sequence, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    if not data:
        raise EvalError("the evaluation data is empty")
    questions = isinstance(data[0], ChoiceQuestion)
    fitting = ("multiple_choice",) if questions else CONVERSATION_METRICS
    if requested is None:
        return fitting
    wrong = [m for m in requested if m not in fitting]
    if wrong:
        kind = ("multiple-choice questions (question, choices, answer)" if questions
                else "conversations (a prompt and a reference reply)")
        raise EvalError(f"metrics {wrong} don't fit the data: it holds {kind}, which take {list(fitting)}")
    return tuple(requested)


@contextmanager
def _loaded(model: nn.Module, adapters: Mapping[str, AdapterSource], model_source: str | None):
    """Load each adapter folder onto ``model`` (under a private name), yield the candidates, remove them."""
    loaded: list[str] = []
    candidates = []
    try:
        for k, (label, source) in enumerate(adapters.items()):
            if isinstance(source, InModel):
                candidates.append(Candidate(label, source.name))
                continue
            name = f"eval_{k}"
            try:
                load_adapter(model, source, name, base_model_name_or_path=model_source)
            except AdapterFormatError as err:
                raise AdapterFormatError(f"adapter {label!r} ({source}) does not fit this base model"
                                         f"{f' ({model_source})' if model_source else ''}: {err}") from None
            loaded.append(name)
            candidates.append(Candidate(label, name, Path(source)))
        yield candidates
    finally:
        for name in loaded:
            delete_adapter(model, name)


class _Scoring:
    """One evaluation run over the candidates; each ``_*`` method fills in its part of the result."""

    def __init__(self, model: nn.Module, tokenizer, candidates: list[Candidate], options: EvalOptions,
                 device: torch.device):
        self.model, self.tokenizer, self.candidates, self.options, self.device = (
            model, tokenizer, candidates, options, device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        labels = [c.label for c in candidates]
        self.result = EvalResult(labels, {label: {} for label in labels})

    def run(self, data: Sequence, metrics: tuple[str, ...], regression: Sequence[ChoiceQuestion] | None
            ) -> EvalResult:
        self.result.items = len(data)
        if "perplexity" in metrics:
            self._perplexity(data)
        if any(m in GENERATION_METRICS for m in metrics):
            self._generation(data, [m for m in metrics if m in GENERATION_METRICS])
        if "multiple_choice" in metrics:
            self.result.subjects = self._choices(data, "multiple_choice", keep_examples=True)
        if regression:
            self.result.regression_items = len(regression)
            self.result.regression_subjects = self._choices(regression, "regression", keep_examples=False)
        return self.result

    def _logprobs(self, samples: Sequence) -> dict[str, list[tuple[float, int]]]:
        """``labelled_logprobs`` of every sample under every candidate, in one batched pass."""
        rows = [(sample, c.adapter) for c in self.candidates for sample in samples]
        scored = labelled_logprobs(self.model, rows, self.options.batch_size, self.pad_id, self.device)
        n = len(samples)
        return {c.label: scored[k * n : (k + 1) * n] for k, c in enumerate(self.candidates)}

    def _perplexity(self, conversations: Sequence[Conversation]) -> None:
        samples, _ = tokenize_conversations(self.tokenizer, conversations, self.options.template,
                                            self.options.cutoff_len, train_on_prompt=False)
        if not samples:
            raise EvalError(f"perplexity: no conversation keeps a reply token within cutoff_len="
                            f"{self.options.cutoff_len}; raise it")
        for label, scored in self._logprobs(samples).items():
            loss = -sum(s for s, _ in scored) / sum(n for _, n in scored)
            self.result.scores[label].update(loss=loss, perplexity=math.exp(min(loss, 50)))

    def _generation(self, conversations: Sequence[Conversation], metrics: list[str]) -> None:
        prompts = [prompt_ids(self.tokenizer, c.messages[:-1], self.options.template) for c in conversations]
        references = [c.messages[-1]["content"] for c in conversations]
        answers, self.result.backend = generate_answers(
            self.model, self.tokenizer, prompts, self.candidates, self.options.max_new_tokens, self.options.backend,
            self.options.batch_size, self.options.pool_bytes, self.device)
        self.result.answers = answers
        for label, texts in answers.items():
            self.result.scores[label].update(generation_scores(metrics, texts, references, self.options.normalize))
        normalize = self.options.normalize
        for i, conversation in enumerate(conversations):
            if len({normalize(answers[c.label][i]) for c in self.candidates}) > 1:
                self._example(conversation.origin, conversation.messages[-2]["content"], references[i],
                              {c.label: answers[c.label][i].strip() for c in self.candidates})

    def _choices(self, questions: Sequence[ChoiceQuestion], score: str, keep_examples: bool
                 ) -> dict[str, dict[str, float]]:
        per_question = choice_samples(self.tokenizer, questions)
        flat = [sample for samples in per_question for sample in samples]
        subjects = {}
        chosen: dict[str, list[int]] = {}
        for label, scored in self._logprobs(flat).items():
            it = iter(scored)
            chosen[label] = picks([[next(it)[0] for _ in samples] for samples in per_question])
            subjects[label] = accuracy_by_subject(questions, chosen[label])
            self.result.scores[label][score] = subjects[label]["overall"]
        if keep_examples:
            for i, question in enumerate(questions):
                if len({chosen[c.label][i] for c in self.candidates}) > 1:
                    self._example(question.origin, question.question, question.choices[question.answer],
                                  {c.label: question.choices[chosen[c.label][i]] for c in self.candidates})
        return subjects

    def _example(self, origin: str, prompt: str, reference: str, answers: dict[str, str]) -> None:
        if len(self.result.examples) < self.options.examples:
            self.result.examples.append({"origin": origin, "prompt": prompt, "reference": reference,
                                         "answers": answers})
