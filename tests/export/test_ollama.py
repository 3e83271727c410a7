"""``loraforge export --format ollama``: the Modelfile follows Ollama's documented format (docs/modelfile.md:
``INSTRUCTION arguments``, ``#`` comments, ``\"\"\"`` multi-line values; docs/template.md: Go templates over
``.System`` and ``.Messages``), its FROM and ADAPTER load together in llama.cpp, and its TEMPLATE renders
conversations as the model's Jinja chat template does.

Ollama is not installed here, so two small readers stand in for it, each written from Ollama's documents and
sources (parser/parser.go, template/template.go), not from our writer."""

import json
import re

import pytest
from gguf_helpers import llama_cpp

from loraforge.cli.main import main
from loraforge.export.gguf_writer import GGUFExportError
from loraforge.export.ollama import chat_parts
from loraforge.models import tiny_tokenizer
from loraforge.models.gguf_native import open_gguf, read_field
from loraforge.models.sources import default_gguf_path

COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires"}
"""parser.go's isValidCommand."""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Colours?"},
     {"role": "assistant", "content": "Rouge, vert."}, {"role": "user", "content": "More"}],
    [{"role": "user", "content": "a {{ b }}"}, {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}],
]


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """``(command, argument)`` pairs as Ollama's parser reads them: the instruction name case-insensitive,
    PARAMETER's name joined to it, values unquoted from \"\"\"...\"\"\" (may span lines) or \"...\"."""
    commands, rest = [], text
    while rest:
        rest = rest.lstrip(" \t\r\n")
        if not rest:
            break
        if rest.startswith("#"):
            rest = rest.split("\n", 1)[1] if "\n" in rest else ""
            continue
        name, rest = re.match(r"([A-Za-z]+)[ \t]+", rest).group(1).lower(), rest[re.match(r"[A-Za-z]+[ \t]+", rest).end():]
        assert name in COMMANDS, name
        if name == "parameter":
            parameter = re.match(r"([A-Za-z0-9_]+)[ \t]+", rest)
            name, rest = parameter.group(1), rest[parameter.end():]
        if rest.startswith('"""'):
            value, rest = rest[3:].split('"""', 1)
        elif rest.startswith('"'):
            value, rest = rest[1:].split('"', 1)
        else:
            value, _, rest = rest.partition("\n")
            value = value.strip()
        commands.append(("model" if name == "from" else name, value))
    assert any(name == "model" for name, _ in commands), "no FROM line"
    return commands


def render_go_template(template: str, system: str, messages: list[dict]) -> str:
    """Go's text/template for the actions an Ollama chat template uses: ``if``/``else if``/``end`` over
    ``.System`` or ``eq .Role "..."``, ``range .Messages``, ``{{ .Field }}`` and ``{{ "literal" }}``."""
    tokens = re.split(r"({{-?\s*.*?\s*-?}})", template)

    def evaluate(condition: str, scope: dict) -> bool:
        if m := re.fullmatch(r'eq \.(\w+) "(.*)"', condition):
            return scope[m.group(1)] == m.group(2)
        return bool(scope[re.fullmatch(r"\.(\w+)", condition).group(1)])

    def run(i: int, scope: dict, out: list[str], active: bool) -> int:
        """Render tokens from ``i`` until the ``end`` that closes this block; returns that token's index."""
        while i < len(tokens):
            token = tokens[i]
            action = re.fullmatch(r"{{-?\s*(.*?)\s*-?}}", token)
            if not action:
                if active:
                    out.append(token)
                i += 1
                continue
            body = action.group(1)
            if body == "end" or body.startswith("else"):
                return i
            if body.startswith("if "):
                taken = False
                i += 1
                condition = body[3:]
                while True:
                    branch = active and not taken and (condition is None or evaluate(condition, scope))
                    i = run(i, scope, out, branch)
                    taken = taken or branch
                    closing = re.fullmatch(r"{{-?\s*(.*?)\s*-?}}", tokens[i]).group(1)
                    i += 1
                    if closing == "end":
                        break
                    condition = closing[len("else if "):] if closing.startswith("else if ") else None
                continue
            if body == "range .Messages":
                start = i + 1
                for message in (messages if active else [None]):
                    i = run(start, {**scope, **(message or {})}, out, active and message is not None)
                i += 1
                continue
            if active:
                literal = re.fullmatch(r'"(.*)"', body)
                out.append(literal.group(1) if literal else scope[re.fullmatch(r"\.(\w+)", body).group(1)])
            i += 1
        return i

    out: list[str] = []
    run(0, {"System": system}, out, True)
    return "".join(out)


def ollama_render(template: str, default_system: str | None, messages: list[dict]) -> str:
    """Ollama's chat prompt: the Modelfile's SYSTEM joins as a system message when the request has none
    (server/prompt.go); ``.System`` is the system messages joined, ``.Messages`` keeps them with the rest
    (template.go's collate), each with a capitalised ``Role``/``Content``."""
    if default_system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": default_system}] + messages
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return render_go_template(template, system, [{"Role": m["role"], "Content": m["content"]} for m in messages])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    rows = [{"instruction": f"say {w}", "output": w.upper()} for w in ["cat", "dog", "sun", "sky"]]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "c.yaml").write_text(
        "model: {source: tiny-llama, threads: 1}\nadapter: {method: lora, r: 4, init: gaussian}\n"
        "data: {train_files: train.jsonl, cutoff_len: 64}\n"
        f"train: {{max_steps: 3, batch_size: 2, lr: 0.05}}\noutput: {{dir: {root / 'run'}}}\n")
    assert main(["train", str(root / "c.yaml")]) == 0
    return root / "run"


def test_export_writes_an_ollama_folder_that_llama_cpp_loads(run_dir, tmp_path, capsys):
    out = tmp_path / "ollama"
    assert main(["export", "--run", str(run_dir), "--format", "ollama", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'adapter.gguf'}" in printed and f"ollama create ollama -f {out / 'Modelfile'}" in printed
    commands = parse_modelfile((out / "Modelfile").read_text())
    values = dict(commands)
    base, adapter = out / values["model"], out / values["adapter"]
    assert values["model"] == "./base.gguf" and values["adapter"] == "./adapter.gguf"
    assert read_field(open_gguf(base), "general.type") == "model"
    assert read_field(open_gguf(adapter), "general.type") == "adapter"
    assert read_field(open_gguf(adapter), "general.architecture") == read_field(open_gguf(base), "general.architecture")
    assert [v for k, v in commands if k == "stop"] == ["<|im_end|>"]
    llm = llama_cpp(base, n_ctx=64, lora_path=str(adapter))
    assert llm.tokenize(b"<|im_end|>", add_bos=False, special=True) == [tiny_tokenizer().eos_token_id]
    tokenizer = tiny_tokenizer()
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ollama_render(values["template"], values.get("system"), messages) == expected


def test_a_default_system_prompt_becomes_system(tmp_path):
    """SmolLM2's own template inserts a system prompt when none is given: Ollama gets it as SYSTEM."""
    tokenizer = tiny_tokenizer()
    template = read_field(open_gguf(default_gguf_path()), "tokenizer.chat_template")
    parts = chat_parts(tokenizer, template)
    assert parts.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                 tokenize=False)
        assert ollama_render(parts.go_template(), parts.default_system, messages) == expected


LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_other_per_role_templates_and_refusals():
    tokenizer = tiny_tokenizer()
    tokenizer.bos_token = "<|endoftext|>"
    parts = chat_parts(tokenizer, LLAMA3)
    assert parts.head == "<|endoftext|>" and parts.stops("<|im_end|>") == ["<|eot_id|>", "<|im_end|>"]
    for messages in CONVERSATIONS[:2]:
        expected = tokenizer.apply_chat_template(messages, chat_template=LLAMA3, add_generation_prompt=True,
                                                 tokenize=False)
        assert ollama_render(parts.go_template(), None, messages) == expected
    shouting = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '\n' }}{% endfor %}"
    with pytest.raises(GGUFExportError, match="write the TEMPLATE of the Modelfile by hand"):
        chat_parts(tokenizer, shouting)
