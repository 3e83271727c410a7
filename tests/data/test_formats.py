import pytest

from loraforge.data.formats import to_conversations
from loraforge.data.readers import DataError, Record


def rec(origin="f.jsonl:1", **fields):
    return Record(fields, origin)


def messages(records, format, columns=None, system_prompt=None):
    return [c.messages for c in to_conversations(records, format, columns, system_prompt)]


def test_alpaca_full_record():
    record = rec(instruction="Add", input="2 3", output="5", system="Be terse.", history=[["Hi", "Hello"]])
    assert messages([record], "alpaca") == [
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Add\n2 3"},
            {"role": "assistant", "content": "5"},
        ]
    ]


def test_alpaca_optional_fields_absent_empty_or_null():
    records = [rec(instruction="Q", output="A"), rec(instruction="Q", input="", output="A", system=None)]
    expected = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert messages(records, "alpaca") == [expected, expected]


def test_conversation_keeps_origin():
    (conversation,) = to_conversations([rec("data.csv:7", instruction="Q", output="A")], "alpaca", None, None)
    assert conversation.origin == "data.csv:7"


def test_sharegpt_roles_and_system_field():
    record = rec(
        system="S",
        conversations=[
            {"from": "human", "value": "a"},
            {"from": "gpt", "value": "b"},
            {"from": "user", "value": "c"},
            {"from": "assistant", "value": "d"},
        ],
    )
    roles = [m["role"] for m in messages([record], "sharegpt")[0]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]


def test_sharegpt_unknown_speaker():
    record = rec(conversations=[{"from": "bot", "value": "a"}])
    with pytest.raises(DataError, match=r"f.jsonl:1: conversations\[0\]: unknown speaker 'bot'"):
        to_conversations([record], "sharegpt", None, None)


def test_openai_messages():
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert messages([rec(messages=chat)], "openai") == [chat]


def test_columns_mapping():
    records = [rec(question="Q", answer="A")]
    assert messages(records, "alpaca", {"instruction": "question", "output": "answer"}) == [
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    ]
    chat = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert messages([rec(chat=chat)], "openai", {"messages": "chat"}) == [chat]


def test_columns_mapping_to_missing_column_lists_columns():
    expected = r"instruction is mapped to column 'prompt'.*columns found: \['answer', 'question'\]"
    with pytest.raises(DataError, match=expected):
        to_conversations([rec(question="Q", answer="A")], "alpaca", {"instruction": "prompt"}, None)


def test_columns_mapping_of_unknown_field():
    with pytest.raises(DataError, match=r"'query' is not a field of format 'alpaca'"):
        to_conversations([rec(question="Q")], "alpaca", {"query": "question"}, None)


def test_unknown_format_lists_formats():
    expected = r"unknown data format 'alpacca'; choose one of \['alpaca', 'openai', 'sharegpt'\]"
    with pytest.raises(DataError, match=expected):
        to_conversations([rec(instruction="Q", output="A")], "alpacca", None, None)


def test_missing_required_field_names_origin_and_fields():
    records = [rec(instruction="Q", output="A"), rec("d.jsonl:2", instruction="Q", answer="A")]
    expected = r"d.jsonl:2: missing required field 'output'; the record has \['answer', 'instruction'\]"
    with pytest.raises(DataError, match=expected):
        to_conversations(records, "alpaca", None, None)


def test_wrong_type():
    with pytest.raises(DataError, match=r"f.jsonl:1: field 'output' must be a str, got int 5"):
        to_conversations([rec(instruction="Q", output=5)], "alpaca", None, None)


def test_empty_assistant_reply():
    with pytest.raises(DataError, match=r"f.jsonl:1: message 1 is an empty assistant reply"):
        to_conversations([rec(instruction="Q", output="  ")], "alpaca", None, None)


@pytest.mark.parametrize(
    "roles, problem",
    [
        (["user", "user", "assistant"], "message 1 has role 'user', expected 'assistant'"),
        (["assistant"], "message 0 has role 'assistant', expected 'user'"),
        (["user", "assistant", "user"], "the last message has role 'user', expected 'assistant'"),
        (["user", "system", "assistant"], "message 1 has role 'system', expected 'assistant'"),
        (["user", "assistant", "tool"], "message 2 has role 'tool', expected 'user'"),
    ],
)
def test_wrong_role_order(roles, problem):
    chat = [{"role": role, "content": "x"} for role in roles]
    with pytest.raises(DataError, match=f"f.jsonl:1: {problem}"):
        to_conversations([rec(messages=chat)], "openai", None, None)


def test_system_prompt_sets_missing_system_only():
    records = [rec(instruction="Q", output="A"), rec(instruction="Q", output="A", system="own")]
    systems = [m[0] for m in messages(records, "alpaca", system_prompt="default")]
    assert systems == [{"role": "system", "content": "default"}, {"role": "system", "content": "own"}]


def test_object_where_a_list_is_expected_names_file_and_line(tmp_path):
    from loraforge.data.readers import read_records

    path = tmp_path / "d.jsonl"
    path.write_text('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n'
                    '{"conversations": {"from": "human", "value": "hi"}}\n')
    with pytest.raises(DataError) as err:
        to_conversations(read_records(path), "sharegpt", None, None)
    assert str(err.value) == f"{path}:2: field 'conversations' must be a list, got dict {{'from': 'human', 'value': 'hi'}}"
