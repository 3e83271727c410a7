"""Chat templates: render a conversation to text and find the assistant replies in it.

``template`` (the ``data.template`` key) picks the Jinja chat template:

- ``auto``: the tokenizer's own ``chat_template``. A tokenizer without one falls back to ChatML.
- ``chatml``: always ChatML.

ChatML renders each message as ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, and the generation
prompt as ``<|im_start|>assistant\\n``. It inserts no default system prompt. When the tokenizer has
no ``<|im_start|>``/``<|im_end|>`` special tokens, these markers are split into ordinary text tokens,
and the model learns to end its replies with the text ``<|im_end|>``.

Assistant replies are found by rendering incremental prefixes of the conversation: for the
assistant message ``i``, ``messages[:i]`` with the generation prompt must be a prefix of
``messages[:i + 1]``, which in turn must be a prefix of the next rendering. The difference is the
reply: its content and the template's end-of-turn marker. Whitespace after the marker (ChatML's
newline) is template glue and is not part of the reply. Text that the template injects, such as a
default system prompt, lands in the prompt spans.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loraforge.data.readers import DataError

TEMPLATES = ("auto", "chatml")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resolve_template(tokenizer: Any, template: str) -> str:
    """The Jinja source that ``template`` (``auto`` or ``chatml``) selects for ``tokenizer``."""
    if template == "chatml":
        return CHATML_TEMPLATE
    if template == "auto":
        return getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
    raise DataError(f"unknown chat template {template!r}; choose one of {list(TEMPLATES)}")


def render(tokenizer: Any, messages: Sequence[dict[str, str]], chat_template: str, add_generation_prompt: bool) -> str:
    """Render ``messages`` with ``chat_template`` to text; a template error becomes a DataError."""
    try:
        return tokenizer.apply_chat_template(
            list(messages),
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as e:  # jinja2 raises TemplateError subclasses, and templates call raise_exception()
        raise DataError(f"the chat template failed: {e}") from None


def assistant_spans(
    tokenizer: Any, messages: Sequence[dict[str, str]], chat_template: str
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation that ends with an assistant reply; return the text and the replies' spans.

    Each span is ``(start, end)`` in characters of the text and covers one assistant reply with its
    end-of-turn marker.

    Raises:
        DataError: the template is not prefix-stable (rendering a longer conversation changes the
            text of a shorter one), or it renders an assistant reply as nothing.
    """
    text = ""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], chat_template, add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], chat_template, add_generation_prompt=False)
        if not prompt.startswith(text):
            raise DataError(_unstable(f"messages[:{i}] with the generation prompt", text, prompt))
        if not full.startswith(prompt):
            raise DataError(_unstable(f"messages[:{i + 1}]", prompt, full))
        reply = full[len(prompt) :].rstrip()
        if not reply:
            raise DataError(f"the chat template rendered assistant message {i} as nothing")
        spans.append((len(prompt), len(prompt) + len(reply)))
        text = full
    return text, spans


def _unstable(what: str, before: str, after: str) -> str:
    at = next((k for k, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
    return (
        f"the chat template is not prefix-stable: the rendering of {what} does not extend the previous one "
        f"(they differ at character {at}: {before[at : at + 40]!r} vs {after[at : at + 40]!r}), so prompt "
        "and reply tokens cannot be told apart; set `template: chatml` or fix the tokenizer's chat_template"
    )
