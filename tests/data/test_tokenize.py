import pytest

from loraforge.data.formats import Conversation
from loraforge.data.readers import DataError
from loraforge.data.tokenize import IGNORE_INDEX, prompt_ids, tokenize_conversations
from loraforge.models.tiny import tiny_tokenizer

# Like SmolLM2's template: a default system prompt appears when the conversation has none.
INJECTING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named Tiny.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def conv(*turns, origin="d.jsonl:1"):
    roles = ["user", "assistant"] * len(turns)
    return Conversation([{"role": r, "content": t} for r, t in zip(roles, turns)], origin)


def labelled_runs(tokenizer, sample):
    """Decoded runs of consecutive labelled tokens."""
    runs, run = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tokenizer.decode(r) for r in runs]


def test_loss_only_on_assistant_reply_and_end_token():
    tokenizer = tiny_tokenizer()
    (sample,), _ = tokenize_conversations(tokenizer, [conv("What is 2+2?", "It is 4. ✓")], "auto", 512, False)
    assert labelled_runs(tokenizer, sample) == ["It is 4. ✓<|im_end|>"]
    assert tokenizer.decode(sample.input_ids).startswith("<|im_start|>user\nWhat is 2+2?<|im_end|>")


def test_every_assistant_turn_is_trained():
    tokenizer = tiny_tokenizer()
    conversation = conv("a", "first", "b", "second", "c", "third")
    (sample,), _ = tokenize_conversations(tokenizer, [conversation], "auto", 512, False)
    assert labelled_runs(tokenizer, sample) == ["first<|im_end|>", "second<|im_end|>", "third<|im_end|>"]


def test_train_on_prompt_labels_all_but_first_token():
    tokenizer = tiny_tokenizer()
    (sample,), _ = tokenize_conversations(tokenizer, [conv("q", "a")], "auto", 512, True)
    assert sample.labels[0] == IGNORE_INDEX
    assert sample.labels[1:] == sample.input_ids[1:]


def test_template_that_injects_a_default_system_prompt():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = INJECTING_TEMPLATE
    (sample,), _ = tokenize_conversations(tokenizer, [conv("q1", "r1", "q2", "r2")], "auto", 512, False)
    text = tokenizer.decode(sample.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named Tiny.")
    assert text.count("named Tiny") == 1
    assert labelled_runs(tokenizer, sample) == ["r1<|im_end|>", "r2<|im_end|>"]
    first_reply = sample.labels.index(ord("r"))
    assert prompt_ids(tokenizer, conv("q1", "r1").messages[:1], "auto") == sample.input_ids[:first_reply]


def test_chatml_forced_and_fallback_agree():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = INJECTING_TEMPLATE
    (forced,), _ = tokenize_conversations(tokenizer, [conv("q", "a")], "chatml", 512, False)
    tokenizer.chat_template = None
    (fallback,), _ = tokenize_conversations(tokenizer, [conv("q", "a")], "auto", 512, False)
    assert forced == fallback
    assert "system" not in tokenizer.decode(forced.input_ids)


def test_prompt_ids_are_the_start_of_the_training_sample():
    tokenizer = tiny_tokenizer()
    conversation = conv("q1", "r1", "q2", "r2")
    (sample,), _ = tokenize_conversations(tokenizer, [conversation], "auto", 512, False)
    ids = prompt_ids(tokenizer, conversation.messages[:-1], "auto")
    assert sample.input_ids[: len(ids)] == ids
    assert tokenizer.decode(ids).endswith("q2<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(sample.input_ids[len(ids) :]) == "r2<|im_end|>\n"


def test_cutoff_truncates_keeps_start_and_drops_samples_without_labels():
    tokenizer = tiny_tokenizer()
    # The ChatML prompt of conv("q", ...) is 20 tokens: "short<|im_end|>\n" brings it to 27.
    conversations = [conv("q", "short"), conv("q", "a long reply that will be cut"), conv("q" * 40, "lost")]
    samples, report = tokenize_conversations(tokenizer, conversations, "auto", 28, False)
    assert (report.samples, report.truncated, report.dropped, report.kept) == (3, 2, 1, 2)
    assert [len(s.input_ids) for s in samples] == [27, 28]
    assert labelled_runs(tokenizer, samples[1]) == ["a long r"]
    assert (report.tokens, report.label_tokens) == (27 + 28, 6 + 8)


def test_unstable_template_error_names_origin():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(DataError, match=r"^d.jsonl:5: the chat template is not prefix-stable"):
        tokenize_conversations(tokenizer, [conv("q", "a", origin="d.jsonl:5")], "auto", 512, False)


def test_tokenizer_without_offsets_is_an_error():
    class NoOffsets:
        def __init__(self):
            self.inner = tiny_tokenizer()
            self.chat_template = self.inner.chat_template

        def apply_chat_template(self, *args, **kwargs):
            return self.inner.apply_chat_template(*args, **kwargs)

        def __call__(self, text, **kwargs):
            return {"input_ids": self.inner(text, add_special_tokens=False)["input_ids"]}

    with pytest.raises(DataError, match=r"d.jsonl:1: NoOffsets cannot return character offsets"):
        tokenize_conversations(NoOffsets(), [conv("q", "a")], "auto", 512, False)
