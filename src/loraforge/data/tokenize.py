"""Tokenize conversations into training samples with loss masks, and prompts for generation.

A conversation is rendered once with its chat template and tokenized once (with character
offsets, so the tokenizer sees exactly the text the model will see). A token carries a label when
it starts inside an assistant reply (see ``template.assistant_spans``); every other label is -100.
With ``train_on_prompt`` every token carries a label.

The first label of a sample is always -100: nothing precedes that token, so it is never a
prediction target. Packing relies on this, so that no segment learns to predict the first token of
the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loraforge.data.formats import Conversation, Message
from loraforge.data.readers import DataError
from loraforge.data.template import assistant_spans, render, resolve_template

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Sample:
    """One training row.

    ``input_ids`` and ``labels`` have the same length; ``labels`` is -100 where there is no loss and
    is not shifted (the model or trainer shifts it). ``position_ids`` is set only on packed rows,
    where it restarts at 0 at the start of every packed sample.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None


@dataclass
class SplitReport:
    """What tokenization did to one split: ``samples`` conversations in, ``truncated`` of them cut to
    ``cutoff_len``, ``dropped`` because no labelled token was left; ``tokens`` and ``label_tokens``
    count what was kept."""

    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    label_tokens: int = 0

    @property
    def kept(self) -> int:
        return self.samples - self.dropped

    def admit(self, input_ids: list[int], labels: list[int]) -> bool:
        """Count a tokenized sample: kept (True) when some token carries a label, else dropped (False)."""
        label_tokens = sum(label != IGNORE_INDEX for label in labels)
        if label_tokens == 0:
            self.dropped += 1
            return False
        self.tokens += len(input_ids)
        self.label_tokens += label_tokens
        return True


def encode_conversation(
    tokenizer: Any, messages: Sequence[Message], chat_template: str, train_on_prompt: bool
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation that ends with an assistant reply.

    Raises:
        DataError: the template is not prefix-stable, or the tokenizer cannot report character offsets.
    """
    text, spans = assistant_spans(tokenizer, messages, chat_template)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if "offset_mapping" not in encoding:  # Python-backend tokenizers ignore the request
        raise DataError(
            f"{type(tokenizer).__name__} cannot return character offsets, which label masking needs; "
            "load the model's tokenizers-backed (fast) tokenizer"
        )
    input_ids = list(encoding["input_ids"])
    if train_on_prompt:
        labels = list(input_ids)
    else:
        labels = [IGNORE_INDEX] * len(input_ids)
        span = 0
        for k, (start, _) in enumerate(encoding["offset_mapping"]):
            while span < len(spans) and start >= spans[span][1]:
                span += 1
            if span < len(spans) and start >= spans[span][0]:
                labels[k] = input_ids[k]
    if labels:
        labels[0] = IGNORE_INDEX
    return input_ids, labels


def tokenize_conversations(
    tokenizer: Any,
    conversations: Sequence[Conversation],
    template: str,
    cutoff_len: int,
    train_on_prompt: bool,
) -> tuple[list[Sample], SplitReport]:
    """Tokenize conversations, keeping the first ``cutoff_len`` tokens of each.

    A sample left with no labelled token after truncation is dropped and counted in the report.

    Raises:
        DataError: unknown ``template``, or a conversation the template cannot split (with its origin).
    """
    chat_template = resolve_template(tokenizer, template)
    samples = []
    report = SplitReport(samples=len(conversations))
    for conversation in conversations:
        try:
            input_ids, labels = encode_conversation(tokenizer, conversation.messages, chat_template, train_on_prompt)
        except DataError as e:
            raise DataError(f"{conversation.origin}: {e}") from None
        if len(input_ids) > cutoff_len:
            report.truncated += 1
            input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
        if report.admit(input_ids, labels):
            samples.append(Sample(input_ids, labels))
    return samples, report


def prompt_ids(tokenizer: Any, messages: Sequence[Message], template: str) -> list[int]:
    """Token ids of ``messages`` (a conversation without its final assistant reply) followed by the
    generation prompt: the input for generating the reply.

    These are the same ids that start the training sample of the full conversation whenever the
    generation prompt ends at a token boundary, as ChatML's newline does."""
    text = render(tokenizer, messages, resolve_template(tokenizer, template), add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
