"""An Ollama model folder: ``Modelfile`` + GGUF LoRA adapter (+ the base GGUF when there is no file to point at).

The ``Modelfile`` (https://github.com/ollama/ollama/blob/main/docs/modelfile.md) says ``FROM`` the base
GGUF, ``ADAPTER`` the GGUF LoRA, ``TEMPLATE`` the chat template in Ollama's Go-template syntax
(docs/template.md: ``.System``, ``.Messages`` with ``.Role`` and ``.Content``), ``SYSTEM`` a default
system prompt the chat template inserts on its own, and a ``PARAMETER stop`` per end-of-turn marker.

The Go template is derived from the model's Jinja chat template, not from a list of known templates:
a probe conversation of marker strings is rendered, and the text around each message gives every role's
prefix and suffix, the generation prompt and any default system prompt. The parts are then recomposed
and must reproduce the Jinja rendering of probe conversations exactly; a template that doesn't (content
transforms, per-position logic) is refused with the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loraforge.data.template import render
from loraforge.export.gguf_writer import GGUFExportError

MODELFILE = "Modelfile"
ADAPTER_FILE = "adapter.gguf"
BASE_FILE = "base.gguf"

_MARK = {"system": "SYSTEMq7zx", "user1": "USERONEq7zx", "assistant": "ASSISTANTq7zx", "user2": "USERTWOq7zx"}


@dataclass(frozen=True)
class ChatParts:
    """A chat template as plain text around each message: ``head`` always opens the prompt; a system prompt
    is ``system_prefix + text + system_suffix``; a user turn ``user_prefix + text + user_suffix``; then
    ``generation`` opens the assistant's reply, which ends with ``assistant_suffix``."""

    head: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    generation: str
    assistant_suffix: str
    default_system: str | None

    def compose(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """What the template renders for ``messages`` (system first, if any), as Ollama's template does."""
        system = next((m["content"] for m in messages if m["role"] == "system"), self.default_system)
        text = self.head + (f"{self.system_prefix}{system}{self.system_suffix}" if system else "")
        for message in messages:
            if message["role"] == "user":
                text += f"{self.user_prefix}{message['content']}{self.user_suffix}"
            elif message["role"] == "assistant":
                text += f"{self.generation}{message['content']}{self.assistant_suffix}"
        return text + (self.generation if add_generation_prompt else "")

    def go_template(self) -> str:
        """The Ollama ``TEMPLATE``: the assistant's opening follows each user turn, as in ``compose``."""
        g = _go_text
        return (
            f"{g(self.head)}{{{{ if .System }}}}{g(self.system_prefix)}{{{{ .System }}}}{g(self.system_suffix)}{{{{ end }}}}"
            f'{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{g(self.user_prefix)}{{{{ .Content }}}}'
            f'{g(self.user_suffix)}{g(self.generation)}{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}'
            f"{g(self.assistant_suffix)}{{{{ end }}}}{{{{ end }}}}"
        )

    def stops(self, eos_token: str | None) -> list[str]:
        """End-of-turn markers: the assistant suffix without its whitespace, and the EOS token."""
        stops = [s for s in (self.assistant_suffix.strip(), eos_token) if s]
        return list(dict.fromkeys(stops))


def chat_parts(tokenizer, chat_template: str) -> ChatParts:
    """Split ``chat_template`` into :class:`ChatParts` by rendering probe conversations.

    Raises:
        GGUFExportError: the template isn't a per-role prefix/suffix template (the message says where).
    """
    m = _MARK
    system, user1, reply, user2 = ({"role": role, "content": m[key]} for role, key in
                                   (("system", "system"), ("user", "user1"), ("assistant", "assistant"), ("user", "user2")))
    full = render(tokenizer, [system, user1, reply, user2], chat_template, add_generation_prompt=True)
    without_prompt = render(tokenizer, [system, user1, reply, user2], chat_template, add_generation_prompt=False)
    ends_with_reply = render(tokenizer, [system, user1, reply], chat_template, add_generation_prompt=False)
    no_system = render(tokenizer, [user1], chat_template, add_generation_prompt=True)
    spans = _between(full, [m["system"], m["user1"], m["assistant"], m["user2"]])
    system_prefix, system_user, user_reply, reply_user, tail = spans
    assistant_suffix = ends_with_reply.split(m["assistant"], 1)[1]
    user_suffix = without_prompt.split(m["user2"], 1)[1]
    if not (tail.startswith(user_suffix) and reply_user.startswith(assistant_suffix) and user_reply == tail):
        raise _not_per_role("the text between messages depends on their position")
    generation = tail[len(user_suffix):]
    user_prefix = reply_user[len(assistant_suffix):]
    if not system_user.endswith(user_prefix):
        raise _not_per_role("the system prompt's end and the user turn's start don't separate")
    system_suffix = system_user[: len(system_user) - len(user_prefix)]
    lead = no_system.split(m["user1"], 1)[0]
    if not lead.endswith(user_prefix):
        raise _not_per_role("a conversation without a system prompt opens differently")
    lead = lead[: len(lead) - len(user_prefix)]
    head, default_system = _head_and_default_system(lead, system_prefix, system_suffix)
    parts = ChatParts(head, system_prefix[len(head):], system_suffix, user_prefix, user_suffix, generation,
                      assistant_suffix, default_system)
    _check(parts, tokenizer, chat_template)
    return parts


def _between(text: str, marks: list[str]) -> list[str]:
    """The text before, between and after ``marks``, which must each occur once, in order."""
    pieces, rest = [], text
    for mark in marks:
        if text.count(mark) != 1 or mark not in rest:
            raise _not_per_role(f"a message's content ({mark!r}) is not rendered once, as it is")
        before, rest = rest.split(mark, 1)
        pieces.append(before)
    return pieces + [rest]


def _head_and_default_system(lead: str, system_prefix: str, system_suffix: str) -> tuple[str, str | None]:
    """What opens every prompt, and the system prompt the template inserts when none is given."""
    if system_prefix.startswith(lead):
        return lead, None
    if lead.startswith(system_prefix) and lead.endswith(system_suffix) and len(lead) > len(system_prefix + system_suffix):
        return "", lead[len(system_prefix): len(lead) - len(system_suffix)]
    raise _not_per_role("a conversation without a system prompt opens with text that is no system prompt")


def _check(parts: ChatParts, tokenizer, chat_template: str) -> None:
    """The recomposed parts must render conversations exactly as the Jinja template does."""
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
         {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
    ]
    for messages in conversations:
        for prompt in (True, False):
            if render(tokenizer, messages, chat_template, prompt) != parts.compose(messages, prompt):
                raise _not_per_role(f"recomposing {len(messages)} messages differs from its rendering")


def _not_per_role(why: str) -> GGUFExportError:
    return GGUFExportError(
        f"the model's chat template can't be written as an Ollama TEMPLATE automatically: {why}. loraforge "
        "turns templates that wrap each message in a fixed per-role prefix and suffix (ChatML, Llama 3, "
        "Mistral-style ...) into Go templates; write the TEMPLATE of the Modelfile by hand for this one")


def _go_text(text: str) -> str:
    """``text`` as literal Go-template text: only the action delimiter needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def modelfile(base: str, adapter: str, parts: ChatParts, eos_token: str | None) -> str:
    """The Modelfile text: ``base`` and ``adapter`` are paths as Ollama resolves them (absolute, or
    relative to the Modelfile)."""
    template = parts.go_template()
    if '"""' in template or (parts.default_system and '"""' in parts.default_system):
        raise GGUFExportError('the chat template contains """, which a Modelfile can\'t quote; write it by hand')
    lines = [
        "# Written by loraforge export --format ollama. Create the model with:",
        "#   ollama create NAME -f Modelfile",
        f"FROM {base}",
        f"ADAPTER {adapter}",
        f'TEMPLATE """{template}"""',
    ]
    if parts.default_system:
        lines.append(f'SYSTEM """{parts.default_system}"""')
    for stop in parts.stops(eos_token):
        if '"' in stop:
            raise GGUFExportError(f"stop marker {stop!r} contains a double quote, which a Modelfile can't quote")
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def reference_path(path: str | os.PathLike, folder: Path) -> str:
    """``path`` as the Modelfile in ``folder`` names it: ``./name`` inside the folder, absolute elsewhere."""
    path = Path(path)
    return f"./{path.name}" if path.parent == folder else str(path.resolve())
