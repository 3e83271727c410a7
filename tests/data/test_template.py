import pytest

from loraforge.data.readers import DataError
from loraforge.data.template import CHATML_TEMPLATE, assistant_spans, resolve_template
from loraforge.models.tiny import tiny_tokenizer

CHAT = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "ciao"},
]


def test_spans_cover_each_reply_and_its_end_marker():
    text, spans = assistant_spans(tiny_tokenizer(), CHAT, CHATML_TEMPLATE)
    assert [text[a:b] for a, b in spans] == ["hello<|im_end|>", "ciao<|im_end|>"]
    assert text.endswith("ciao<|im_end|>\n")


def test_auto_uses_tokenizer_template_and_falls_back_to_chatml():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_template(tokenizer, "auto") == tokenizer.chat_template
    assert resolve_template(tokenizer, "chatml") == CHATML_TEMPLATE
    tokenizer.chat_template = None
    assert resolve_template(tokenizer, "auto") == CHATML_TEMPLATE


def test_unknown_template_name():
    with pytest.raises(DataError, match=r"unknown chat template 'llama'; choose one of \['auto', 'chatml'\]"):
        resolve_template(tiny_tokenizer(), "llama")


def test_template_that_is_not_prefix_stable():
    # Earlier assistant replies are rendered differently once they are history (as reasoning templates do).
    template = (
        "{% for m in messages %}"
        "{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n[old]<|im_end|>\n"
        "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    expected = r"not prefix-stable.*differ at character \d+: 'hello<\|im_end\|>\\n' vs '\[old\]"
    with pytest.raises(DataError, match=expected):
        assistant_spans(tiny_tokenizer(), CHAT, template)


def test_template_errors_become_data_errors():
    template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match="the chat template failed: roles must alternate"):
        assistant_spans(tiny_tokenizer(), CHAT, template)
