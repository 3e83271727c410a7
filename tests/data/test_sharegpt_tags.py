"""sharegpt turns spelled with other keys and speakers (LLaMA-Factory's dataset_info.json ``tags``)."""

import pytest

from loraforge.data.formats import to_conversations
from loraforge.data.readers import DataError, Record

TAGS = {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer", "assistant_tag": "agent",
        "system_tag": "instructions"}


def messages(fields, columns):
    return to_conversations([Record(fields, "f.jsonl:1")], "sharegpt", columns, None)[0].messages


def test_custom_keys_and_speakers_map_to_roles():
    record = {"dialog": [{"speaker": "instructions", "text": "Help."}, {"speaker": "customer", "text": "Hi"},
                         {"speaker": "agent", "text": "Hello"}]}
    assert messages(record, {"conversations": "dialog", **TAGS}) == [
        {"role": "system", "content": "Help."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}]


def test_the_default_speakers_still_read_with_custom_keys():
    record = {"conversations": [{"speaker": "human", "text": "Hi"}, {"speaker": "gpt", "text": "Hello"}]}
    roles = [m["role"] for m in messages(record, {"role_tag": "speaker", "content_tag": "text"})]
    assert roles == ["user", "assistant"]


def test_a_turn_without_the_custom_keys_names_them():
    record = {"conversations": [{"from": "human", "value": "Hi"}]}
    with pytest.raises(DataError, match="f.jsonl:1: conversations\\[0\\] must be an object with 'speaker' and 'text'"):
        messages(record, TAGS)


def test_an_unknown_speaker_lists_the_known_ones():
    record = {"conversations": [{"speaker": "observation", "text": "{}"}]}
    with pytest.raises(DataError, match="unknown speaker 'observation'; use one of .*'customer', 'agent'"):
        messages(record, TAGS)


def test_tags_apply_to_sharegpt_only():
    with pytest.raises(DataError, match="columns: 'role_tag' is not a field of format 'alpaca'"):
        to_conversations([Record({"instruction": "q", "output": "a"}, "f:1")], "alpaca", {"role_tag": "x"}, None)
